"""RB-Guidance in a real ComfyUI: a GUIDER for SamplerCustomAdvanced on the tiny SD1.5 checkpoint."""
from pathlib import Path

import pytest

from omniid.cli.client import ExecutionFailed
from support.graph import Graph
from support.testing import images_of


PROMPT = "a photo of a man"


def guided_graph(steps=6, strength=8.5, prefix="rb/image", size=64, face_analysis=True, **options):
    """The paper's defaults: the node finds the subject word in the prompt it is given."""
    g = Graph()
    ckpt = g.checkpoint()
    pos = g.add("CLIPTextEncode", clip=g.out(ckpt, 1), text=PROMPT)
    neg = g.add("CLIPTextEncode", clip=g.out(ckpt, 1), text="blurry")
    options = {"clip": g.out(ckpt, 1), "prompt": PROMPT, **options}
    if face_analysis:
        options["face_analysis"] = g.out(g.add("OmniIdentityFaceAnalysisLoader", backend="dlib", provider="CPU",
                                               det_size=640))
    guider = g.add("OmniIdentityRBGuidance", model=g.out(ckpt, 0), positive=g.out(pos), negative=g.out(neg), cfg=5.0,
                   reference=g.out(g.add("LoadImage", image="id_1.png")), vae=g.out(ckpt, 2), strength=strength,
                   start_fraction=0.6, t0=671, feature_block=1, **{k: v for k, v in options.items() if v is not None})
    sampler = g.add("SamplerCustomAdvanced",
                    noise=g.out(g.add("RandomNoise", noise_seed=3)), guider=g.out(guider, 0),
                    sampler=g.out(g.add("KSamplerSelect", sampler_name="euler")),
                    sigmas=g.out(g.add("BasicScheduler", model=g.out(ckpt, 0), scheduler="normal", steps=steps,
                                       denoise=1.0)),
                    latent_image=g.out(g.add("EmptyLatentImage", width=size, height=size, batch_size=1)))
    decode = g.add("VAEDecode", samples=g.out(sampler, 0), vae=g.out(ckpt, 2))
    save = g.add("SaveImage", images=g.out(decode), filename_prefix=prefix)
    preview = g.add("SaveImage", images=g.out(guider, 1), filename_prefix=prefix + "_mask")
    return g, save, preview


def sampled_latent(comfy_server, g, prefix):
    """Add a SaveLatent of the sampler's output to ``g``; a function reading it back after the run."""
    sampler = next(n for n, node in g.nodes.items() if node["class_type"] == "SamplerCustomAdvanced")
    g.add("SaveLatent", samples=g.out(sampler, 0), filename_prefix=prefix)

    def read():
        from safetensors.torch import load_file
        folder = comfy_server.base_directory / "output" / Path(prefix).parent
        return load_file(str(sorted(folder.glob(f"{Path(prefix).name}_0*.latent"))[-1]))["latent_tensor"]
    return read


def test_guider_samples_and_previews_the_reference_mask(comfy, comfy_server):
    g, save, preview = guided_graph()
    guided_latent = sampled_latent(comfy_server, g, "rb/guided_latent")
    result = comfy.run(g.nodes, timeout=600)
    image = images_of(comfy, result, save)[0]
    assert image.shape == (64, 64, 3)
    mask_preview = images_of(comfy, result, preview)[0].astype(int)
    assert mask_preview.shape[1] == 512 and mask_preview.shape[0] > 512             # the photo, then the caption
    reddish = (mask_preview[:512, :, 0] - mask_preview[:512, :, 1]) > 60
    assert 0.05 < reddish.mean() < 0.6                                  # the face is tinted, not the whole photo
    off, off_save, _ = guided_graph(strength=0.0, prefix="rb/off")
    plain_latent = sampled_latent(comfy_server, off, "rb/off_latent")
    plain = images_of(comfy, comfy.run(off.nodes, timeout=600), off_save)[0]
    # On the tiny model the push is below the 8-bit image's resolution (measured: 18 of 12288 values one
    # grey level apart at p = 8.5, 209 at p = 100), so it is measured on the sampled latent: 5.2e-5 of its
    # largest value at p = 8.5 (1.04e-4 at p = 17: linear in p, as E = p / (1 + S) makes it), far above
    # the 1e-7 of float32 round-off
    change = float((guided_latent() - plain_latent()).abs().max() / plain_latent().abs().max())
    assert change > 1e-5, change


def test_cancel_mid_run_stops_cleanly_and_the_next_prompt_runs(comfy):
    """Cancel as soon as ComfyUI reports the first sampling step (its progress event over the websocket):
    the run ends interrupted inside the sampling loop, and the next prompt runs."""
    g, _, _ = guided_graph(steps=400, prefix="rb/cancelled", face_analysis=False)
    sampler = next(n for n, node in g.nodes.items() if node["class_type"] == "SamplerCustomAdvanced")
    steps = []

    def on_event(kind, data):
        if kind == "progress" and data.get("node") == sampler and data.get("max") == 400:
            steps.append(data["value"])
            if len(steps) == 1:
                comfy.interrupt()

    events = comfy.open_events()
    assert events is not None, "no websocket: ComfyUI's progress events are needed to cancel mid-run"
    try:
        prompt_id = comfy.queue_prompt(g.nodes)
        with pytest.raises(ExecutionFailed) as failure:
            comfy.wait(prompt_id, timeout=300, on_event=on_event, events=events)
    finally:
        events.close()
    assert failure.value.interrupted
    assert steps and 1 <= steps[0] and max(steps) < 400, steps        # stopped inside the loop, not at its end
    g2, save, _ = guided_graph(steps=3, prefix="rb/after_cancel", face_analysis=False)
    assert images_of(comfy, comfy.run(g2.nodes, timeout=600), save)[0].shape == (64, 64, 3)


def test_guidance_on_a_model_with_an_identity_adapter(comfy, comfy_server):
    """The tracked pass runs through the adapter's patches, whose K/V were made in inference mode."""
    import shutil
    g = Graph()
    embeds = g.add("OmniIdentityEncode",
                   encoder=g.out(g.add("OmniIdentityEncoderLoader", encoder_name="omniid_tiny_omni_id.safetensors")),
                   clip_vision=g.out(g.add("CLIPVisionLoader", clip_name="omniid_random_clip_vit_h.safetensors")),
                   images=g.photos("id_1.png"))
    g.add("OmniIdentitySaveEmbeds", embeds=g.out(embeds), filename_prefix="rb/omni")
    comfy.run(g.nodes, timeout=600)
    source = sorted((comfy_server.base_directory / "output" / "rb").glob("omni_0*.safetensors"))[-1]
    shutil.copy(source, comfy_server.base_directory / "input" / "rb_omni.safetensors")

    g, save, _ = guided_graph(steps=4, prefix="rb/with_adapter", face_analysis=False)
    guider = next(n for n, node in g.nodes.items() if node["class_type"] == "OmniIdentityRBGuidance")
    ckpt = next(n for n, node in g.nodes.items() if node["class_type"] == "CheckpointLoaderSimple")
    patched = g.add("OmniIdentityApplyAdapter", model=g.out(ckpt, 0),
                    adapter=g.out(g.add("OmniIdentityAdapterLoader", adapter_name="omniid_tiny_sd15_omni.safetensors")),
                    embeds=g.out(g.add("OmniIdentityLoadEmbeds", embeds_file="rb_omni.safetensors")),
                    weight=1.0, start_at=0.0, end_at=1.0)
    g.nodes[guider]["inputs"]["model"] = g.out(patched)
    assert images_of(comfy, comfy.run(g.nodes, timeout=600), save)[0].shape == (64, 64, 3)


def _text(result, node_id):
    return "\n".join(result.outputs.get(node_id, {}).get("text", []))


def test_masks_default_to_the_bundled_detector_and_the_subject_words_attention(comfy):
    """Without a face analysis the reference's face comes from the bundled detector, and the generated face's
    mask from the subject word's attention, found in the prompt; the preview says so."""
    g, save, preview = guided_graph(steps=3, prefix="rb/paper_masks", face_analysis=False)
    guider = next(n for n, node in g.nodes.items() if node["class_type"] == "OmniIdentityRBGuidance")
    result = comfy.run(g.nodes, timeout=600)
    text = _text(result, guider)
    assert "reference mask: bundled dlib detector" in text
    assert "generated-face mask: attention of 'man' at token 5 of the prompt" in text
    shown = images_of(comfy, result, preview)[0].astype(int)[:512]
    assert 0.05 < ((shown[..., 0] - shown[..., 1]) > 60).mean() < 0.6           # a face, not the whole photo
    named, _, _ = guided_graph(steps=2, prefix="rb/named", face_analysis=False, subject="photo")
    guider = next(n for n, node in named.nodes.items() if node["class_type"] == "OmniIdentityRBGuidance")
    assert "'photo' at token 2" in _text(comfy.run(named.nodes, timeout=600), guider)


def test_without_a_prompt_the_mask_source_must_be_chosen_and_is_reported(comfy):
    silent, _, _ = guided_graph(steps=2, prefix="rb/no_prompt", face_analysis=False, clip=None, prompt=None)
    with pytest.raises(ExecutionFailed, match="needs the subject's token"):
        comfy.run(silent.nodes, timeout=600)
    asked, _, _ = guided_graph(steps=2, prefix="rb/asked", face_analysis=False, clip=None, prompt=None,
                               mask_source="reference similarity", reference_region="whole image")
    guider = next(n for n, node in asked.nodes.items() if node["class_type"] == "OmniIdentityRBGuidance")
    text = _text(comfy.run(asked.nodes, timeout=600), guider)
    assert "reference mask: whole image" in text and "resemblance to the reference face" in text
