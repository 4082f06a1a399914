"""The diffusers host and the ComfyUI host agree; the ComfyUI path never imports diffusers.

A file trained by `omniid train --stage flow` on a diffusers UNet (tests/comfy's small SD1.5
layout) loads in ComfyUI's ApplyAdapter with identity K/V bit-equal to the diffusers host's
for the same tokens, on the same layers with the same block weights; and the whole UNet,
ComfyUI's with the node's patches and diffusers' with the pack's processors (weights
converted by ComfyUI's own key map), gives the same output, plain and with the identity.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from omniid.cli.server import comfyui_python
from support.testing import facts_in_comfyui
from support.tiny_diffusers import write_model_folder, write_smoke_data

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = Path(__file__).with_name("diffusers_parity.py")


@pytest.fixture(scope="module")
def facts(comfyui, tmp_path_factory):
    root = tmp_path_factory.mktemp("parity")
    data = Path(write_smoke_data(root / "data"))
    folder = write_model_folder("comfy_sd15", root / "model")
    adapter = root / "trained" / "adapter.safetensors"
    train = [sys.executable, "-m", "omniid", "train", "--stage", "flow", "--model", folder, "--data",
             str(data / "identities"), "--clip", f"open_clip:{data / 'tiny_vit.json'}", "--encoder-config",
             (data / "encoder.json").read_text(), "--out", str(adapter), "--image-size", "32", "--steps", "1",
             "--batch", "1", "--targets", "1", "--threads", "1", "--lr", "1e-2"]
    done = subprocess.run(train, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return facts_in_comfyui(SCRIPT, comfyui, "--folder", folder, "--adapter", str(adapter))


def test_comfyui_apply_adapter_gets_the_diffusers_hosts_identity_kv(facts):
    assert facts["comfy_layers"] == facts["diffusers_layers"] == [["input", 1], ["output", 0], ["output", 1],
                                                                    ["middle", 0]]
    assert facts["kv_equal"] == [True] * 4
    assert facts["weights"] == [[w, w] for w in (0.8, 0.8, 0.4, 0.8 * 1.5)]


def test_the_two_hosts_give_the_same_unet_output(facts):
    assert facts["converted"] > 100 and facts["missing"] == 0 and facts["unexpected"] == 0
    assert facts["identity_effect"] > 1e-2                     # the identity changes the output...
    assert facts["plain_diff"] < 1e-5 * facts["scale"] * 10   # ...and both hosts agree, plain and with it
    assert facts["identity_diff"] < 1e-5 * facts["scale"] * 10


def test_masks_and_the_sigma_window_mean_the_same_in_both_hosts(facts):
    """ApplyAdapter with attn_mask, start_at 0.2, end_at 0.6; the diffusers host with the same mask and the
    sigmas the node chose: equal outputs inside the window, and the plain model's outside it."""
    start, end = facts["window"]
    assert start > end > 0
    assert facts["own_window"] == pytest.approx([start, end], rel=1e-5)     # diffusers_host.unet_sigma_window
    for comfy_sigma, own in facts["flux_sigmas"]:                           # and flux_percent_to_sigma
        assert own == pytest.approx(comfy_sigma, rel=1e-6, abs=1e-9)
    masked = facts["masked"]
    assert masked["inside_effect"] > 1e-2 and masked["outside_effect"] == 0.0
    assert masked["inside"] < 1e-4 * facts["scale"] and masked["outside"] < 1e-4 * facts["scale"]


PROBE = r'''
import importlib, json, pkgutil, sys
sys.path.insert(0, sys.argv[1])
sys.argv = sys.argv[:1]
import comfy.cli_args
comfy.cli_args.args.cpu = True
import comfy.model_management, comfy.samplers, comfy.sd, comfy_api.latest, folder_paths  # noqa: F401
before = sorted(m for m in sys.modules if m == "diffusers" or m.startswith("diffusers."))
import omniid, omniid.nodes, omniid.comfy_host
import asyncio
asyncio.run(omniid.comfy_entrypoint())
for package in (omniid.nodes, omniid.comfy_host):
    for info in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{package.__name__}.{info.name}")
after = sorted(m for m in sys.modules if m == "diffusers" or m.startswith("diffusers."))
print(json.dumps({"before": before, "after": after,
                  "nodes": sorted(m for m in sys.modules if m.startswith("omniid.nodes.")) != []}))
'''


def test_the_comfyui_path_never_imports_diffusers(comfyui):
    """Root __init__ (with its entrypoint run), every module of nodes/ and comfy_host/: no diffusers module."""
    done = subprocess.run([comfyui_python(comfyui), "-c", PROBE, str(comfyui)], capture_output=True, text=True,
                          timeout=600, env={**os.environ})
    assert done.returncode == 0, done.stderr[-3000:]
    facts = json.loads(done.stdout.strip().splitlines()[-1])
    assert facts["nodes"]
    assert facts["after"] == facts["before"] == [], facts
