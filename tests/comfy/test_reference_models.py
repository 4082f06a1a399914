"""Every IP-Adapter format, injected by the pack into ComfyUI's own models, equals its reference
implementation on identical random weights (whole model, CFG batch, weights, masks), PuLID-FLUX one
whole denoising step of the authors' Flux model with PuLID, and InfiniteYou two Euler steps of the authors'
pipeline: runs benchmarks/compat.py (in process with ComfyUI) and checks its RESULT line."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from omniid.cli.server import comfyui_python
from support.ip_layouts import FLUX_KINDS, H94_KINDS, LAYOUTS

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "compat.py"
TOLERANCE = 1e-5           # float32 round-off of models this size is ~1e-6


@pytest.fixture(scope="module")
def result(comfyui):
    env = {**os.environ, "COMFYUI_PATH": str(comfyui)}
    done = subprocess.run([comfyui_python(comfyui), str(SCRIPT)], capture_output=True, text=True, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT ")
    return json.loads(last[len("RESULT "):])


def test_every_format_is_measured(result):
    expected = ({f"h94_{kind}_{layout}" for kind in H94_KINDS for layout in LAYOUTS} | set(FLUX_KINDS)
                | {"pulid_flux", "infiniteyou"})
    assert set(result["formats"]) == expected
    assert result["masked_unet_runs"] and result["seeds"] == 3


def test_every_format_equals_its_reference_to_float32_round_off(result):
    worst = {name: value for name, value in result["formats"].items() if not value <= TOLERANCE}
    assert not worst, worst


def test_the_identity_changes_the_reference_so_equality_means_something(result):
    assert min(result["identity_effect"].values()) > 1e-2, result["identity_effect"]
