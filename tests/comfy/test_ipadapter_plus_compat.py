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


def test_noise_image_equals_ipadapter_plus(result):
    assert result["noise_image"] <= 1e-5



def test_the_nodes_answer_as_comfyui_calls_them(result):
    """execute and validate_inputs of both nodes, in the same ComfyUI process (see node_checks)."""
    assert result["node_checks"] == [], result["node_checks"]
