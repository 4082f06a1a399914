"""The adapters users already have, in a real ComfyUI: the example FLUX workflow with an XLabs-layout
IP-Adapter on the tiny FLUX (CLIP-L pooled embedding, one double block), wrong pairings named, and
the encode options (crop modes, unconditional image) on the real CLIP vision loader."""
import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from omniid.cli.client import ExecutionFailed
from support.graph import Graph
from support.assets import RANDOM_CLIP_L, TINY_FLUX_XLABS
from support.testing import image_change, images_of, load_workflow
from support.tiny_prompts import tiny

CLIP_H = "omniid_random_clip_vit_h.safetensors"


def branch(prompt: dict, source: dict, model: list, weight: float, prefix: str) -> str:
    """Another sampler on the same prompt, text and latent as the workflow's, with ``model``."""
    nodes = {k: v for k, v in source.items() if v["class_type"] in ("KSampler", "VAEDecode", "SaveImage")}
    ids = {old: f"{prefix}{old}" for old in nodes}
    for old, node in nodes.items():
        inputs = {k: ([ids.get(v[0], v[0]), v[1]] if isinstance(v, list) else v) for k, v in node["inputs"].items()}
        prompt[ids[old]] = {**node, "inputs": inputs}
    sampler = next(ids[k] for k, v in nodes.items() if v["class_type"] == "KSampler")
    prompt[sampler]["inputs"]["model"] = model
    save = next(ids[k] for k, v in nodes.items() if v["class_type"] == "SaveImage")
    prompt[save]["inputs"]["filename_prefix"] = f"xlabs/{prefix}"
    if weight is not None:
        apply = f"{prefix}apply"
        prompt[apply] = json.loads(json.dumps(source["9"]))
        prompt[apply]["inputs"]["weight"] = weight
        prompt[sampler]["inputs"]["model"] = [apply, 0]
    return save


def test_xlabs_workflow_runs_on_the_tiny_flux_and_the_identity_changes_the_image(comfy):
    source = tiny(load_workflow("api/start_flux_xlabs.json"))
    assert source["8"]["inputs"]["adapter_name"] == TINY_FLUX_XLABS and source["2"]["inputs"]["clip_name"] == RANDOM_CLIP_L
    prompt = json.loads(json.dumps(source))
    zero = branch(prompt, source, ["5", 0], 0.0, "zero_")
    plain = branch(prompt, source, ["5", 0], None, "plain_")
    result = comfy.run(prompt, timeout=900)
    images = {name: images_of(comfy, result, node)[0].astype(int) for name, node in
              (("xlabs", "16"), ("zero", zero), ("plain", plain))}
    # the identity moves the whole image, not a few round-off pixels
    mean, changed = image_change(images["xlabs"], images["plain"])
    assert mean > 1.0 and changed > 0.5, (mean, changed)
    assert np.array_equal(images["zero"], images["plain"])


def fit_error(comfy, prompt) -> str:
    with pytest.raises(ExecutionFailed) as failure:
        comfy.run(prompt, timeout=600)
    assert failure.value.error["node_type"] == "OmniIdentityApplyAdapter"
    return failure.value.error["exception_message"]


def test_a_wrong_pairing_names_encoder_adapter_and_model(comfy):
    source = tiny(load_workflow("api/start_flux_xlabs.json"))
    wrong_encoder = json.loads(json.dumps(source))
    wrong_encoder["2"]["inputs"]["clip_name"] = CLIP_H            # CLIP-H: pooled 1024, XLabs reads CLIP-L's 768
    message = fit_error(comfy, wrong_encoder)
    assert "does not fit these embeds" in message and "pooled features of width 768" in message
    assert f"adapter: '{TINY_FLUX_XLABS}'" in message and "xlabs flux adapter with 1 layers (double blocks)" in message
    assert "embeds: clip identity" in message and "image encoder: CLIP vision model" in message and "pooled 1024" in message
    assert "model: Flux" in message

    g = Graph()
    ckpt = g.checkpoint()
    clip = g.out(g.add("CLIPVisionLoader", clip_name=RANDOM_CLIP_L))
    embeds = g.out(g.add("OmniIdentityEncodeBaseline", method="clip", images=g.photos("id_1.png"), clip_vision=clip))
    adapter = g.out(g.add("OmniIdentityAdapterLoader", adapter_name=TINY_FLUX_XLABS))
    model = g.out(g.add("OmniIdentityApplyAdapter", model=g.out(ckpt, 0), adapter=adapter, embeds=embeds, weight=1.0,
                        start_at=0.0, end_at=1.0))
    g.sd_sampling(model=model, ckpt=ckpt, prefix="never")
    message = fit_error(comfy, g.nodes)
    assert "does not fit the model" in message and f"adapter: '{TINY_FLUX_XLABS}'" in message
    assert "pooled 768" in message and "4 unet attention layers" in message


def test_encode_options_crop_and_unconditional(comfy, comfy_server):
    g = Graph()
    clip = g.out(g.add("CLIPVisionLoader", clip_name=RANDOM_CLIP_L))
    wide = g.out(g.add("ImageScale", image=g.photos("obama.jpg"), upscale_method="bilinear", width=320, height=160,
                       crop="disabled"))
    runs = {"center": dict(clip_crop="center"), "squash": dict(clip_crop="squash"), "pad": dict(clip_crop="pad"),
            "black": dict(clip_crop="center", unconditional="black")}
    # references built with ComfyUI's own image nodes, encoded square (where center crops nothing): the
    # photo on a black square (what "pad" makes of it) and a black image (the "black" unconditional)
    black_square = g.out(g.add("EmptyImage", width=320, height=320, batch_size=1, color=0))
    references = {"padded_by_hand": g.out(g.add("ImageCompositeMasked", destination=black_square, source=wide,
                                                x=0, y=80, resize_source=False)),
                  "black_image": g.out(g.add("EmptyImage", width=224, height=224, batch_size=1, color=0))}
    for name, options in runs.items():
        embeds = g.out(g.add("OmniIdentityEncodeBaseline", method="clip", images=wide, clip_vision=clip, **options))
        g.add("OmniIdentitySaveEmbeds", embeds=embeds, filename_prefix=f"encode_options/{name}")
    for name, image in references.items():
        embeds = g.out(g.add("OmniIdentityEncodeBaseline", method="clip", images=image, clip_vision=clip,
                             clip_crop="center"))
        g.add("OmniIdentitySaveEmbeds", embeds=embeds, filename_prefix=f"encode_options/{name}")
    comfy.run(g.nodes, timeout=600)
    folder = comfy_server.base_directory / "output" / "encode_options"
    saved = {name: load_file(str(sorted(folder.glob(f"{name}_0*.safetensors"))[-1])) for name in (*runs, *references)}
    center = saved["center"]
    assert center["pooled"].shape == (1, 768) and center["clip"].shape == (1, 257, 1024)
    assert float(center["pooled_uncond"].abs().max()) == 0.0                   # h94: a zero pooled embedding
    # pad: the photo centred on a black square, as built by hand; squash sees the whole photo, center its middle
    for key in ("clip", "pooled"):
        torch.testing.assert_close(saved["pad"][key], saved["padded_by_hand"][key], rtol=1e-5, atol=1e-5)
    assert not np.allclose(saved["squash"]["clip"].numpy(), center["clip"].numpy())
    black = saved["black"]
    assert np.array_equal(black["clip"].numpy(), center["clip"].numpy())
    # the unconditional is the encoding of a black image, for the tokens and the pooled embedding
    torch.testing.assert_close(black["clip_uncond"], saved["black_image"]["clip"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(black["pooled_uncond"], saved["black_image"]["pooled"], rtol=1e-5, atol=1e-5)
