"""Helpers for tests and benchmarks that drive a real ComfyUI with this pack."""
from __future__ import annotations

import io
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import Optional

import numpy as np

from . import assets
from omniid.cli import main as cli
from omniid.cli.client import ComfyClient, RunResult
from omniid.cli.server import PACK_ROOT, ComfyServer, comfyui_python

WORKFLOWS = PACK_ROOT / "workflows"
LOADED_WORKFLOWS: set[str] = set()          # what load_workflow read in this test session


def load_workflow(name: str, *overrides: str) -> dict:
    """An API workflow from workflows/, with ``NODE.INPUT=VALUE`` overrides applied (recorded in
    LOADED_WORKFLOWS, for the check that every example workflow is run by a test)."""
    LOADED_WORKFLOWS.add(name)
    return cli.apply_overrides(cli.load_api_workflow(WORKFLOWS / name), list(overrides))


def populate_base(base: Path, tiny_models: Path, input_files: dict[str, Path]) -> Path:
    """A ComfyUI base directory with the tiny checkpoints and the pack's test models linked
    in, and the input files copied."""
    for kind, names in assets.tiny_model_files(tiny_models).items():
        (base / "models" / kind).mkdir(parents=True, exist_ok=True)
        for name in names:
            (base / "models" / kind / name).symlink_to(tiny_models / kind / name)
    pack_models = assets.pack_test_models()
    for source in sorted(p for p in pack_models.rglob("*") if p.is_file() and p.name != "done"):
        target = base / "models" / source.relative_to(pack_models)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(source)
    (base / "input").mkdir(parents=True, exist_ok=True)
    for name, path in input_files.items():
        shutil.copy(path, base / "input" / name)
    return base


def install_models(base_directory: Path, files: Path, entries) -> None:
    """Link ``files / name`` into ``base_directory / models / folder`` for each (folder, name) of a running server
    (ComfyUI lists a model folder's files afresh on each request)."""
    for folder, name in entries:
        path = base_directory / "models" / folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.symlink_to(files / name)


def start_server(comfyui: Path, base: Path, **kwargs) -> ComfyServer:
    """A CPU ComfyUI on a free port over ``base``, logging to ``base/comfyui.log``."""
    server = ComfyServer(comfyui, base_directory=base, log_path=base / "comfyui.log",
                         extra_args=["--database-url", "sqlite:///:memory:"], **kwargs)
    return server.start()


def facts_in_comfyui(script: Path, comfyui: Path, *args: str) -> dict:
    """Run a check script with ComfyUI's own Python (``--comfyui`` and ``args``) and read the JSON line it
    prints last."""
    done = subprocess.run([comfyui_python(comfyui), str(script), "--comfyui", str(comfyui), *args],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


NEWER_THAN_OLDEST_HOST = {"flux2", "z_image"}      # DiT families ComfyUI 0.3.64's detection does not know


def family_facts(facts: dict, family: str) -> Optional[dict]:
    """A family's facts from an in-process script that records {"built": False, "reason", "host_has_class"}
    where this ComfyUI's detection does not know the family, or None there: allowed only for a family newer
    than the oldest host, on a host without that family's model class."""
    f = facts[family]
    if not f["built"]:
        assert family in NEWER_THAN_OLDEST_HOST and "does not detect these weights" in f["reason"], f["reason"]
        assert not f["host_has_class"]           # a host with the family's model class must build it
        return None
    return f


def images_of(client: ComfyClient, result: RunResult, node_id: str) -> list[np.ndarray]:
    """The images a SaveImage/PreviewImage node reported, as RGB uint8 arrays."""
    from PIL import Image
    return [np.asarray(Image.open(io.BytesIO(client.view(f))).convert("RGB"))
            for f in result.files() if f["node"] == node_id]


def image_change(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """How much image ``a`` differs from ``b`` (uint8 RGB): (mean absolute difference in grey
    levels, fraction of values that differ). A real change of the tiny models' sampling moves most
    of the image by several levels; float round-off moves a few values by one."""
    difference = np.abs(a.astype(np.int64) - b.astype(np.int64))
    return float(difference.mean()), float((difference > 0).mean())


def reference_attention(q, k, v, heads: int):
    """Multi-head attention written out in float64, per head: softmax(q k^T / sqrt(d)) v.

    (B, N, heads * d) inputs; the independent reference the attention patches are tested against.
    """
    import math

    import torch
    b, n, inner = q.shape
    d = inner // heads
    out = torch.empty(b, n, inner, dtype=torch.float64)
    for i in range(b):
        for h in range(heads):
            sl = slice(h * d, (h + 1) * d)
            weights = torch.softmax(q[i, :, sl].double() @ k[i, :, sl].double().T / math.sqrt(d), -1)
            out[i, :, sl] = weights @ v[i, :, sl].double()
    return out


def tiny_clip_tokens(width: int = 64, seed: int = 0):
    """A fixed random stand-in for CLIP's penultimate tokens: (B, H, W, 3) -> (B, 50, width).

    A 32 x 32 patch convolution plus a class token (the patch mean): CLIP's interface in
    miniature, for training tests and CPU experiments."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(width, 3, 32, 32, generator=generator) * (3 * 32 * 32) ** -0.5
    bias = torch.randn(width, generator=generator) * 0.1

    def tokens(images):
        import torch.nn.functional as F
        images = images.permute(0, 3, 1, 2)
        if images.shape[-1] != 224:
            images = F.interpolate(images, size=(224, 224), mode="bilinear", align_corners=False)
        patches = F.conv2d(images * 2 - 1, weight, bias, stride=32).flatten(2).transpose(1, 2)
        return torch.cat([patches.mean(1, keepdim=True), patches], 1)

    return tokens


def kill_at_checkpoint_step(process, checkpoint: Path, step: int, timeout: float = 300.0) -> Optional[int]:
    """SIGKILL a training ``process`` once its ``checkpoint`` holds ``step`` or more (then wait for it);
    the step it was killed at, or None when it ended (or the time ran out) first."""
    import torch
    deadline = time.time() + timeout
    killed_at = None
    while time.time() < deadline and process.poll() is None:
        if checkpoint.exists():
            reached = torch.load(checkpoint, weights_only=True)["step"]
            if reached >= step:
                process.send_signal(signal.SIGKILL)
                killed_at = reached
                break
        time.sleep(0.02)
    process.wait()
    return killed_at
