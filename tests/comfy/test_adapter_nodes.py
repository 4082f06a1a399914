"""Identity adapters on the tiny SD1.5 checkpoint in a real ComfyUI."""
import shutil

import numpy as np
import pytest

from support.assets import TEST_ARCFACE_ONNX
from omniid.cli.client import ComfyClient, ExecutionFailed
from support.graph import Graph
from support.testing import image_change, images_of

CLIP = "omniid_random_clip_vit_h.safetensors"
OMNI_ADAPTER = "omniid_tiny_sd15_omni.safetensors"
PLUS_ADAPTER = "omniid_tiny_sd15_plus_h94.safetensors"
FACEID_ADAPTER = "omniid_tiny_sd15_faceid_plusv2_h94.safetensors"


@pytest.fixture(scope="module")
def embeds_files(comfy_server):
    """Omni-ID, CLIP and ArcFace+CLIP identities of one photo, saved once and copied to input/."""
    comfy = ComfyClient(comfy_server.url)
    g = Graph()
    clip = g.out(g.add("CLIPVisionLoader", clip_name=CLIP))
    faces = g.out(g.add("OmniIdentityFaceAnalysisLoader", backend="dlib", provider="CPU", det_size=640,
                        arcface_model=TEST_ARCFACE_ONNX))
    photo = g.photos("id_1.png")
    encoder = g.out(g.add("OmniIdentityEncoderLoader", encoder_name="omniid_tiny_omni_id.safetensors"))
    made = {
        "omni": g.add("OmniIdentityEncode", encoder=encoder, clip_vision=clip, images=photo, face_analysis=faces),
        "clip": g.add("OmniIdentityEncodeBaseline", method="clip", images=photo, face_analysis=faces, clip_vision=clip),
        "arcface_clip": g.add("OmniIdentityEncodeBaseline", method="arcface_clip", images=photo,
                              face_analysis=faces, clip_vision=clip),
    }
    for name, node in made.items():
        g.add("OmniIdentitySaveEmbeds", embeds=g.out(node), filename_prefix=f"adapter_embeds/{name}")
    comfy.run(g.nodes, timeout=600)
    names = {}
    for name in made:
        source = sorted((comfy_server.base_directory / "output" / "adapter_embeds").glob(f"{name}_0*.safetensors"))[-1]
        shutil.copy(source, comfy_server.base_directory / "input" / f"test_{name}.safetensors")
        names[name] = f"test_{name}.safetensors"
    return names


def apply(g, model, adapter, embeds_file, **options):
    inputs = dict(weight=1.0, start_at=0.0, end_at=1.0)
    inputs.update(options)
    adapter_node = g.out(g.add("OmniIdentityAdapterLoader", adapter_name=adapter))
    embeds = g.out(g.add("OmniIdentityLoadEmbeds", embeds_file=embeds_file))
    return g.out(g.add("OmniIdentityApplyAdapter", model=model, adapter=adapter_node, embeds=embeds, **inputs))


def sample(comfy, g, branches):
    result = comfy.run(g.nodes, timeout=600)
    return {name: images_of(comfy, result, ids["save"])[0].astype(int) for name, ids in branches.items()}, result


def test_identity_changes_the_image_and_weight_zero_does_not(comfy, embeds_files):
    g = Graph()
    ckpt = g.checkpoint()
    model = g.out(ckpt, 0)
    branches = {
        "plain": g.sd_sampling(ckpt=ckpt, prefix="ad/plain"),
        "one": g.sd_sampling(model=apply(g, model, OMNI_ADAPTER, embeds_files["omni"]), ckpt=ckpt, prefix="ad/one"),
        "halves": g.sd_sampling(model=apply(g, apply(g, model, OMNI_ADAPTER, embeds_files["omni"], weight=0.5),
                                            OMNI_ADAPTER, embeds_files["omni"], weight=0.5), ckpt=ckpt,
                                prefix="ad/halves"),
        "zero": g.sd_sampling(model=apply(g, model, OMNI_ADAPTER, embeds_files["omni"], weight=0.0), ckpt=ckpt,
                              prefix="ad/zero"),
        "never": g.sd_sampling(model=apply(g, model, OMNI_ADAPTER, embeds_files["omni"], start_at=1.0, end_at=1.0),
                               ckpt=ckpt, prefix="ad/never"),
        "masked_out": g.sd_sampling(model=apply(g, model, OMNI_ADAPTER, embeds_files["omni"], attn_mask=g.out(
            g.add("SolidMask", value=0.0, width=64, height=64))), ckpt=ckpt, prefix="ad/masked_out"),
        "no_blocks": g.sd_sampling(model=apply(g, model, OMNI_ADAPTER, embeds_files["omni"], blocks="all=0"),
                                   ckpt=ckpt, prefix="ad/no_blocks"),
    }
    images, _ = sample(comfy, g, branches)
    # the identity moves the whole image (measured: mean 5.4 grey levels, 93% of the values), not a few
    # round-off pixels
    mean, changed = image_change(images["one"], images["plain"])
    assert mean > 2.0 and changed > 0.5, (mean, changed)
    # the identity term is linear in the weight: the same identity applied twice at 0.5 is weight 1
    assert np.array_equal(images["halves"], images["one"])
    for same in ("zero", "never", "masked_out", "no_blocks"):
        assert np.array_equal(images[same], images["plain"]), same


def test_nothing_leaks_into_later_prompts(comfy, embeds_files):
    g = Graph()
    ckpt = g.checkpoint()
    patched = apply(g, g.out(ckpt, 0), OMNI_ADAPTER, embeds_files["omni"], weight=1.5)
    branches = {"plain": g.sd_sampling(ckpt=ckpt, seed=7, prefix="leak/plain"),
                "patched": g.sd_sampling(model=patched, ckpt=ckpt, seed=7, prefix="leak/patched")}
    first, _ = sample(comfy, g, branches)
    mean, changed = image_change(first["patched"], first["plain"])
    assert mean > 2.0 and changed > 0.5, (mean, changed)          # the patch was really there to leak
    comfy.free()                                     # drop cached outputs: the next prompt really runs
    g2 = Graph()
    again = {"plain": g2.sd_sampling(seed=7, prefix="leak/plain_again")}
    second, result = sample(comfy, g2, again)
    assert again["plain"]["sampler"] not in result.cached_nodes()
    assert np.array_equal(second["plain"], first["plain"])


def test_h94_projections_change_the_image_and_chained_adapters_add_their_terms(comfy, embeds_files):
    g = Graph()
    ckpt = g.checkpoint()
    model = g.out(ckpt, 0)
    omni = apply(g, model, OMNI_ADAPTER, embeds_files["omni"])
    plus = apply(g, model, PLUS_ADAPTER, embeds_files["clip"])
    branches = {
        "plain": g.sd_sampling(ckpt=ckpt, seed=3, prefix="h94/plain"),
        "plus": g.sd_sampling(model=plus, ckpt=ckpt, seed=3, prefix="h94/plus"),
        "faceid": g.sd_sampling(model=apply(g, model, FACEID_ADAPTER, embeds_files["arcface_clip"],
                                            faceid_v2_scale=1.5), ckpt=ckpt, seed=3, prefix="h94/faceid"),
        "chained": g.sd_sampling(model=apply(g, omni, PLUS_ADAPTER, embeds_files["clip"]), ckpt=ckpt, seed=3,
                                 prefix="h94/chained"),
        "reversed": g.sd_sampling(model=apply(g, plus, OMNI_ADAPTER, embeds_files["omni"]), ckpt=ckpt, seed=3,
                                  prefix="h94/reversed"),
    }
    images, _ = sample(comfy, g, branches)
    # each projection moves the whole image (measured: mean 4.8 to 5.4 grey levels, 92% of the values)
    for name in ("plus", "faceid", "chained"):
        mean, changed = image_change(images[name], images["plain"])
        assert mean > 2.0 and changed > 0.5, (name, mean, changed)
    # chaining adds each adapter's term to the attention output, so the order does not matter (to
    # float32 round-off: measured 1 value of 12288 off by one level); had the second adapter replaced
    # the first, or been dropped, the two orders would give the Plus image and the Omni-ID image
    mean, changed = image_change(images["chained"], images["reversed"])
    assert np.abs(images["chained"] - images["reversed"]).max() <= 1 and changed < 0.01, (mean, changed)
    mean, changed = image_change(images["chained"], images["plus"])
    assert mean > 2.0 and changed > 0.5, (mean, changed)          # the Omni-ID term is in the chain


def test_mismatches_name_the_adapter_the_embeds_and_the_model(comfy, embeds_files):
    for adapter, embeds, problem in ((OMNI_ADAPTER, embeds_files["clip"], "does not fit these embeds"),
                                     ("omniid_tiny_other_unet.safetensors", embeds_files["omni"],
                                      "does not fit the model")):
        g = Graph()
        ckpt = g.checkpoint()
        g.sd_sampling(model=apply(g, g.out(ckpt, 0), adapter, embeds), ckpt=ckpt, prefix="never")
        with pytest.raises(ExecutionFailed) as failure:
            comfy.run(g.nodes, timeout=300)
        message = failure.value.error["exception_message"]
        assert failure.value.error["node_type"] == "OmniIdentityApplyAdapter"
        assert problem in message
        assert f"adapter: '{adapter}'" in message and "embeds: " in message and "model: " in message
        assert "4 unet attention layers of widths [320, 320, 320, 320]" in message
