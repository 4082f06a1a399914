"""IPAdapter_plus's own example workflows, end to end: each original (IPAdapter_plus loaded from the vendored
archive as a custom node) and its twin converted by ``python -m omniid convert`` run in the same real ComfyUI on
identical random weights, and their sampled latents agree to 1e-4 relative. CI runs a subset (QUICK, SD1.5: the
unified loader; FaceID Plus v2 with its LoRA, then a Full-Face apply on its aligned face); ``benchmarks/
ipadapter_plus_check.py --examples`` runs every example that converts fully, SDXL's included
(tests/support/ipadapter_plus_examples.py)."""
import json
import os
import subprocess
from pathlib import Path

import pytest

from omniid.cli.server import comfyui_python
from support.ipadapter_plus_examples import QUICK
from support.ipadapter_plus_ref import ARCHIVE

SCRIPT = Path(__file__).resolve().parents[2] / "benchmarks" / "ipadapter_plus_check.py"
BOUND = 1e-4


@pytest.fixture(scope="module")
def result(comfyui):
    if not ARCHIVE.is_file():
        pytest.skip(f"IPAdapter_plus's archive is not at {ARCHIVE}")
    env = {**os.environ, "COMFYUI_PATH": str(comfyui)}
    done = subprocess.run([comfyui_python(comfyui), str(SCRIPT), "--examples", "--quick"], capture_output=True,
                          text=True, timeout=900, env=env)
    assert done.returncode == 0, done.stderr[-4000:]
    last = done.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT ")
    return json.loads(last[len("RESULT "):])


def test_each_example_ran_fully_converted(result):
    ran = result["examples"]
    assert set(ran) == {name[:-len(".json")] for name in QUICK}
    assert all(example["converted"] and example["pairs"] and example["finite"] for example in ran.values()), ran


def test_every_image_equals_ipadapter_plus(result):
    worse = {name: pairs for name, example in result["examples"].items()
             for pairs in [example["pairs"]] if not max(pairs.values()) <= BOUND}
    assert not worse, worse


def test_ipadapter_plus_changes_every_image_so_equality_means_something(result):
    small = {name: effect for name, example in result["examples"].items()
             for effect in [example["effect"]] if not min(effect.values()) > 10 * BOUND}
    assert not small, small
