"""Identity encoding in a real ComfyUI: a full-size random CLIP-H and small random encoder files."""
import pytest
import torch
from safetensors import safe_open

from support.assets import TEST_ARCFACE_ONNX
from omniid.cli.client import ExecutionFailed
from support.graph import Graph

CLIP = "omniid_random_clip_vit_h.safetensors"
OMNI = "omniid_tiny_omni_id.safetensors"


def shared(graph, arcface_model="none"):
    clip = graph.out(graph.add("CLIPVisionLoader", clip_name=CLIP))
    faces = graph.out(graph.add("OmniIdentityFaceAnalysisLoader", backend="dlib", provider="CPU", det_size=640,
                                arcface_model=arcface_model))
    return clip, faces


def read_embeds(comfy_server, subfolder_prefix):
    files = sorted((comfy_server.base_directory / "output").glob(f"{subfolder_prefix}_[0-9]*.safetensors"))
    assert files, f"nothing saved as {subfolder_prefix}"
    with safe_open(str(files[-1]), "pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, handle.metadata(), files[-1]


def ids(n):
    return [f"id_{i + 1}.png" for i in range(n)]


def test_encode_1_3_7_photos_then_reload_bit_exactly(comfy, comfy_server):
    g = Graph()
    clip, faces = shared(g)
    encoder = g.out(g.add("OmniIdentityEncoderLoader", encoder_name=OMNI))
    for n in (1, 3, 7):
        embeds = g.out(g.add("OmniIdentityEncode", encoder=encoder, clip_vision=clip, images=g.photos(*ids(n)),
                             face_analysis=faces))
        g.add("OmniIdentitySaveEmbeds", embeds=embeds, filename_prefix=f"enc/n{n}")
    comfy.run(g.nodes, timeout=600)
    saved = {n: read_embeds(comfy_server, f"enc/n{n}") for n in (1, 3, 7)}
    for n, (tensors, metadata, _) in saved.items():
        assert tensors["tokens"].shape == (256, 1280) and torch.isfinite(tensors["tokens"]).all()
        assert f'"num_images": {n}' in metadata["omni_identity"]
    assert (saved[1][0]["tokens"] - saved[7][0]["tokens"]).abs().max() > 1e-3

    name = saved[7][2].name
    reload = Graph()
    loaded = reload.out(reload.add("OmniIdentityLoadEmbeds", embeds_file=f"enc/{name} [output]"))
    reload.add("OmniIdentitySaveEmbeds", embeds=loaded, filename_prefix="enc/reloaded")
    comfy.run(reload.nodes, timeout=300)
    again, _, _ = read_embeds(comfy_server, "enc/reloaded")
    assert again.keys() == saved[7][0].keys()
    assert torch.equal(again["tokens"], saved[7][0]["tokens"])


def test_photos_without_a_face_are_skipped_and_reported(comfy, comfy_server):
    g = Graph()
    clip, faces = shared(g)
    encoder = g.out(g.add("OmniIdentityEncoderLoader", encoder_name=OMNI))
    encode = g.add("OmniIdentityEncode", encoder=encoder, clip_vision=clip, face_analysis=faces,
                   images=g.photos("id_1.png", "no_face.png", "id_2.png", "no_face.png"))
    g.add("OmniIdentitySaveEmbeds", embeds=g.out(encode), filename_prefix="enc/skips")
    result = comfy.run(g.nodes, timeout=600)
    text = result.outputs[encode]["text"][0]
    assert "from 2 photo(s)" in text and "skipped photo(s) 2, 4 of 4: no face found" in text
    assert "Encode: no face found in image 2 of 4; skipped it" in comfy_server.log_text()
    _, metadata, _ = read_embeds(comfy_server, "enc/skips")
    assert '"skipped_images": [1, 3]' in metadata["omni_identity"]


def test_unchanged_photos_are_not_re_encoded(comfy):
    g = Graph()
    clip, faces = shared(g)
    encoder = g.out(g.add("OmniIdentityEncoderLoader", encoder_name=OMNI))
    crops = g.out(g.add("OmniIdentityFaceCrop", image=g.photos("id_2.png", "id_4.png", "id_6.png"),
                        face_analysis=faces, crop_size=224, padding=0.25, selection="largest"))
    first = g.add("OmniIdentityEncode", encoder=encoder, clip_vision=clip, images=crops)
    g.add("OmniIdentitySaveEmbeds", embeds=g.out(first), filename_prefix="enc/cache_a")
    result = comfy.run(g.nodes, timeout=600)
    assert "CLIP encoded" in result.outputs[first]["text"][0]
    # one more photo: only it goes through CLIP
    more = g.out(g.add("OmniIdentityFaceCrop", image=g.photos("id_2.png", "id_4.png", "id_6.png", "id_5.png"),
                       face_analysis=faces, crop_size=224, padding=0.25, selection="largest"))
    second = g.add("OmniIdentityEncode", encoder=encoder, clip_vision=clip, images=more)
    g.add("OmniIdentitySaveEmbeds", embeds=g.out(second), filename_prefix="enc/cache_b")
    result = comfy.run(g.nodes, timeout=600)
    assert "CLIP encoded 1 new photo(s), reused 3" in result.outputs[second]["text"][0]


def test_baselines(comfy, comfy_server):
    g = Graph()
    clip, faces = shared(g, arcface_model=TEST_ARCFACE_ONNX)
    photos = g.photos(*ids(3))
    raw_clip = g.add("OmniIdentityEncodeBaseline", method="clip", images=photos, face_analysis=faces, clip_vision=clip)
    g.add("OmniIdentitySaveEmbeds", embeds=g.out(raw_clip), filename_prefix="base/clip")
    arc_encoder = g.out(g.add("OmniIdentityEncoderLoader", encoder_name="omniid_tiny_arcface.safetensors"))
    arc = g.add("OmniIdentityEncodeBaseline", method="arcface", images=photos, face_analysis=faces,
                encoder=arc_encoder, arcface_merge="concat")
    g.add("OmniIdentitySaveEmbeds", embeds=g.out(arc), filename_prefix="base/arcface")
    both_encoder = g.out(g.add("OmniIdentityEncoderLoader", encoder_name="omniid_tiny_arcface_clip.safetensors"))
    both = g.add("OmniIdentityEncodeBaseline", method="arcface_clip", images=photos, face_analysis=faces,
                 clip_vision=clip, encoder=both_encoder)
    g.add("OmniIdentitySaveEmbeds", embeds=g.out(both), filename_prefix="base/arcface_clip")
    comfy.run(g.nodes, timeout=600)
    clip_t, _, _ = read_embeds(comfy_server, "base/clip")
    assert set(clip_t) == {"clip", "clip_uncond", "pooled", "pooled_uncond"} and clip_t["clip"].shape == (3, 257, 1280)
    assert clip_t["clip_uncond"].shape == (1, 257, 1280)
    assert clip_t["pooled"].shape == (3, 1024) and clip_t["pooled_uncond"].abs().max() == 0   # h94: zero pooled
    arc_t, _, _ = read_embeds(comfy_server, "base/arcface")
    assert arc_t["arcface"].shape == (3, 512) and arc_t["tokens"].shape == (3 * 16, 1280)
    both_t, _, _ = read_embeds(comfy_server, "base/arcface_clip")
    assert both_t["tokens"].shape == (16, 1280) and both_t["clip"].shape == (3, 257, 1280)


def test_arcface_baseline_without_arcface_embeddings_says_how(comfy):
    g = Graph()
    _, faces = shared(g)
    arc = g.add("OmniIdentityEncodeBaseline", method="arcface", images=g.photos("id_1.png"), face_analysis=faces)
    g.add("OmniIdentitySaveEmbeds", embeds=g.out(arc), filename_prefix="base/never")
    with pytest.raises(ExecutionFailed) as failure:
        comfy.run(g.nodes, timeout=300)
    assert "ArcFace embeddings are needed" in failure.value.error["exception_message"]
    assert "arcface_model" in failure.value.error["exception_message"]


def test_combine_concat_and_average(comfy, comfy_server):
    g = Graph()
    clip, faces = shared(g)
    encoder = g.out(g.add("OmniIdentityEncoderLoader", encoder_name=OMNI))
    a = g.out(g.add("OmniIdentityEncode", encoder=encoder, clip_vision=clip, images=g.photos("id_1.png"),
                    face_analysis=faces))
    b = g.out(g.add("OmniIdentityEncode", encoder=encoder, clip_vision=clip, images=g.photos("id_2.png"),
                    face_analysis=faces))
    for mode in ("concat", "average"):
        combined = g.out(g.add("OmniIdentityCombineEmbeds", embeds_1=a, embeds_2=b, mode=mode, weight_1=3.0))
        g.add("OmniIdentitySaveEmbeds", embeds=combined, filename_prefix=f"comb/{mode}")
    for name, source in (("a", a), ("b", b)):
        g.add("OmniIdentitySaveEmbeds", embeds=source, filename_prefix=f"comb/{name}")
    comfy.run(g.nodes, timeout=600)
    tensors = {k: read_embeds(comfy_server, f"comb/{k}")[0]["tokens"] for k in ("a", "b", "concat", "average")}
    assert torch.equal(tensors["concat"], torch.cat([tensors["a"], tensors["b"]]))
    torch.testing.assert_close(tensors["average"], (3 * tensors["a"] + tensors["b"]) / 4)


def test_foreign_and_truncated_encoder_files_are_named(comfy, comfy_server):
    folder = comfy_server.base_directory / "models" / "omni_identity"
    vae = comfy_server.base_directory / "models" / "vae" / "omniid_tiny_taesd.safetensors"
    (folder / "not_an_encoder.safetensors").write_bytes(vae.read_bytes())
    (folder / "cut.safetensors").write_bytes((folder / OMNI).read_bytes()[:4096])
    for name, expected in (("not_an_encoder.safetensors", "is not an OmniIdentity encoder"),
                           ("cut.safetensors", "not a readable safetensors file")):
        g = Graph()
        g.add("OmniIdentitySaveEmbeds", filename_prefix="never", embeds=g.out(g.add(
            "OmniIdentityEncode", encoder=g.out(g.add("OmniIdentityEncoderLoader", encoder_name=name)),
            clip_vision=g.out(g.add("CLIPVisionLoader", clip_name=CLIP)), images=g.photos("id_1.png"))))
        with pytest.raises(ExecutionFailed) as failure:
            comfy.run(g.nodes, timeout=300)
        assert failure.value.error["node_type"] == "OmniIdentityEncoderLoader"
        message = failure.value.error["exception_message"]
        assert name in message and expected in message
    assert comfy.system_stats()
