"""IPAdapter_plus itself (loaded from the vendored archive into the same real ComfyUI) against the pack's
IPAdapter_plus compatible apply, on identical random weights: the sampled latents are equal to 1e-4
relative for every case of the CI subset (SD1.5 and SDXL block structures; Plus, Full-Face, base,
FaceID, FaceID Plus v1 and v2; a mask, a start/end window, weight 0.5, two photos, a negative image,
the C-penalty scalings, ease in and style transfer precise). Runs benchmarks/ipadapter_plus_check.py
--quick in ComfyUI's Python and checks its RESULT line."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from omniid.cli.client import PromptRejected
from omniid.cli.server import comfyui_python
from support.ipadapter_plus_ref import ARCHIVE, QUICK

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ipadapter_plus_check.py"
BOUND = 1e-4


@pytest.fixture(scope="module")
def result(comfyui):
    if not ARCHIVE.is_file():
        pytest.skip(f"IPAdapter_plus's archive is not at {ARCHIVE}")
    env = {**os.environ, "COMFYUI_PATH": str(comfyui)}
    done = subprocess.run([comfyui_python(comfyui), str(SCRIPT), "--quick"], capture_output=True, text=True,
                          timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT ")
    return json.loads(last[len("RESULT "):])


def test_every_case_ran(result):
    assert set(result["cases"]) == QUICK


def test_the_latents_equal_ipadapter_plus(result):
    worse = {case: value for case, value in result["cases"].items() if not value <= BOUND}
    assert not worse, worse


def test_ipadapter_plus_changes_the_latent_so_equality_means_something(result):
    small = {case: value for case, value in result["effect"].items() if not value > 10 * BOUND}
    assert not small, small


def test_faceid_face_images_equal_ipadapter_plus(result):
    assert result["face_images"] and max(result["face_images"].values()) <= 1e-6, result["face_images"]



def test_the_converter_lays_out_the_nodes_as_their_schemas_do(result):
    """cli/convert.py writes editor nodes without ComfyUI: its widget orders, sockets and outputs must be the
    schemas' (the frontend maps widgets_values by position); checked in the same ComfyUI process."""
    assert result["converter_layout"] == [], result["converter_layout"]


def test_prep_image_equals_ipadapter_plus(result):
    assert result["prep_image"] <= 1e-6


def test_the_nodes_run_in_the_server(comfy):
    """The compatible apply and the image prep through ComfyUI's executor (queue-time checks, run, outputs):
    the adapter changes the image, weight 0 leaves it as the plain model's, a bad layer_weights is refused
    when the prompt is queued."""
    import numpy as np
    from support.graph import Graph
    from support.testing import image_change, images_of
    g = Graph()
    ckpt = g.checkpoint()
    clip = g.out(g.add("CLIPVisionLoader", clip_name="omniid_random_clip_vit_h.safetensors"))
    adapter = g.out(g.add("OmniIdentityAdapterLoader", adapter_name="omniid_tiny_sd15_plus_h94.safetensors"))
    photo = g.out(g.add("OmniIdentityPrepImageForClipVision", image=g.photos("id_1.png"), interpolation="LANCZOS",
                        crop_position="top", sharpening=0.3))

    def applied(weight):
        return g.out(g.add("OmniIdentityApplyIPAdapterCompat", model=g.out(ckpt), adapter=adapter, clip_vision=clip,
                           image=photo, weight=weight, weight_type="ease in", combine_embeds="concat", start_at=0.0,
                           end_at=1.0, embeds_scaling="V only"))

    branches = {"plain": g.sd_sampling(ckpt=ckpt, seed=3, prefix="compat/plain"),
                "applied": g.sd_sampling(model=applied(1.0), ckpt=ckpt, seed=3, prefix="compat/applied"),
                "zero": g.sd_sampling(model=applied(0.0), ckpt=ckpt, seed=3, prefix="compat/zero")}
    prep_save = g.add("SaveImage", images=photo, filename_prefix="compat/prep")
    result = comfy.run(g.nodes, timeout=600)
    images = {name: images_of(comfy, result, ids["save"])[0] for name, ids in branches.items()}
    assert images_of(comfy, result, prep_save)[0].shape == (224, 224, 3)
    mean, changed = image_change(images["applied"], images["plain"])
    assert mean > 1.0 and changed > 0.3, (mean, changed)
    assert np.array_equal(images["zero"], images["plain"])
    bad = Graph()
    rejected = bad.add("OmniIdentityApplyIPAdapterCompat", model=bad.out(bad.checkpoint()),
            adapter=bad.out(bad.add("OmniIdentityAdapterLoader", adapter_name="omniid_tiny_sd15_plus_h94.safetensors")),
            clip_vision=bad.out(bad.add("CLIPVisionLoader", clip_name="omniid_random_clip_vit_h.safetensors")),
            image=bad.photos("id_1.png"), weight=1.0, weight_type="linear", combine_embeds="concat", start_at=0.0,
            end_at=1.0, embeds_scaling="V only", layer_weights="3=1")
    bad.sd_sampling(model=bad.out(rejected), prefix="compat/bad")
    with pytest.raises(PromptRejected, match="layer_weights"):
        comfy.run(bad.nodes, timeout=600)
