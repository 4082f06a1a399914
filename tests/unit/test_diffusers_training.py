"""Stage 2 on diffusers models through `omniid train --stage flow` (tiny real layouts, CPU, gloo).

2 torchrun processes reach the weights 1 process reaches with the same global batch, under
DDP and under FSDP (which really shards the frozen base, here with gradient checkpointing);
a run killed with SIGKILL and resumed ends bit-identical to an uninterrupted one; the pivot
stage; single-file models.
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from support.testing import kill_at_checkpoint_step
from support.tiny_diffusers import write_model_folder, write_smoke_data

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    root = tmp_path_factory.mktemp("diffusers_training")
    write_smoke_data(root / "data")
    for kind in ("flux", "sdxl"):
        write_model_folder(kind, root / kind)
    return root


def command(smoke, kind, out, steps=2, batch=2, extra=()):
    data = smoke / "data"
    return ["-m", "omniid", "train", "--stage", "flow", "--model", str(smoke / kind), "--data",
            str(data / "identities"), "--clip", f"open_clip:{data / 'tiny_vit.json'}", "--encoder-config",
            (data / "encoder.json").read_text(), "--out", str(out / "adapter.safetensors"), "--checkpoint",
            str(out / "run.pt"), "--image-size", "32", "--steps", str(steps), "--batch", str(batch), "--targets", "2",
            "--threads", "1", "--save-every", "1", "--lr", "1e-3", *extra]


def run(args, torchrun=False):
    prefix = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"] if torchrun \
        else [sys.executable]
    done = subprocess.run(prefix + args, cwd=ROOT, capture_output=True, text=True, timeout=600, env=ENV)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stderr


def weights(out):
    return {**load_file(out / "adapter.safetensors"), **{f"encoder.{k}": v for k, v in
                                                          load_file(out / "adapter_encoder.safetensors").items()}}


@pytest.fixture(scope="module")
def one_process(smoke):
    out = {}
    for kind in ("flux", "sdxl"):
        out[kind] = smoke / f"one_{kind}"
        run(command(smoke, kind, out[kind]))
    return out


@pytest.mark.parametrize("kind,parallel", [("flux", "ddp"), ("sdxl", "fsdp")])
def test_two_processes_match_one_with_the_same_global_batch(smoke, one_process, tmp_path, kind, parallel):
    """FSDP also runs with gradient checkpointing, which must change nothing either."""
    extra = ("--parallel", parallel, *(("--gradient-checkpointing",) if parallel == "fsdp" else ()))
    log = run(command(smoke, kind, tmp_path, batch=1, extra=extra), torchrun=True)
    held = re.findall(r"rank (\d): \w+, frozen base (\d+) parameters, (\d+) held", log)   # ranks' lines may interleave
    assert sorted(rank for rank, _, _ in held) == ["0", "1"]
    for _, total, local in held:
        assert (int(local) < 0.6 * int(total)) if parallel == "fsdp" else (local == total)
    one, two = weights(one_process[kind]), weights(tmp_path)
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], atol=2e-5, rtol=1e-4, msg=key)
    metadata = json.loads(__import__("safetensors").safe_open(str(tmp_path / "adapter.safetensors"), "pt")
                          .metadata()["omni_identity"])
    assert metadata["format"] == "omni_identity.adapter" and metadata["trained"]["stage"] == "flow"


def test_a_run_killed_with_sigkill_resumes_bit_identical(smoke, tmp_path):
    steps = 4
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    run(command(smoke, "sdxl", straight, steps=steps))
    process = subprocess.Popen([sys.executable, *command(smoke, "sdxl", killed, steps=steps)], cwd=ROOT, env=ENV,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    killed_at = kill_at_checkpoint_step(process, killed / "run.pt", 2)
    assert killed_at is not None and killed_at < steps, "the run ended before it could be killed"
    assert not (killed / "adapter.safetensors").exists()
    run(command(smoke, "sdxl", killed, steps=steps))
    a, b = weights(straight), weights(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    losses = [torch.load(p / "run.pt", weights_only=True)["losses"] for p in (straight, killed)]
    assert torch.equal(losses[0], losses[1]) and len(losses[0]) == steps


def test_pivot_stage_on_a_diffusers_unet_learns_e_mix_and_localises_it(smoke, tmp_path):
    """OmniPortrait's pivot objective through the diffusers host: e_mix's cross-attention map, recorded
    with gradients by the pack's processors, moves toward the face; the file loads with load_pivot."""
    from omniid.diffusers_host.models import load_base
    from omniid.diffusers_host.train import pivot_trainer
    from omniid.encoders.pivot import PivotConfig, PivotIDEncoder, load_pivot, save_pivot
    from omniid.training.dataset import IdentityDataset
    from omniid.training.trainer import TrainConfig
    from omniid.cli.train_flow import face_mask_source
    from support.testing import tiny_clip_tokens
    base = load_base(str(smoke / "sdxl"))
    torch.manual_seed(0)
    pivot = PivotIDEncoder(PivotConfig(image_dim=16, text_dim=48))
    before = pivot.fuse.weight.detach().clone()
    trainer = pivot_trainer(base, pivot, lambda images: tiny_clip_tokens(16)(images).mean(1), face_mask_source("ellipse"),
                            IdentityDataset(smoke / "data" / "identities"), TrainConfig(steps=30, batch=2, lr=1e-2,
                                                                                         save_every=0),
                            targets=3, class_token=3, image_size=32, eta=1.0)
    first = None
    for _ in range(30):
        trainer.train_step()
        first = first or trainer.objective.last_parts
    assert trainer.objective.last_parts[1] < first[1]
    assert not torch.equal(before, pivot.fuse.weight)
    save_pivot(pivot, str(tmp_path / "pivot.safetensors"))
    loaded = load_pivot(str(tmp_path / "pivot.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), pivot.state_dict().values()))


@pytest.mark.parametrize("kind", ["flux", "sdxl"])
def test_a_single_file_model_loads_with_its_config_folder(smoke, tmp_path, kind):
    """--model FILE --model-config FOLDER: the same weights as the folder (a file with diffusers' key names;
    original-layout files go through diffusers' own conversion)."""
    from safetensors.torch import save_file
    from omniid.diffusers_host.models import load_base
    folder = load_base(str(smoke / kind))
    single = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in folder.model.state_dict().items()}, str(single))
    loaded = load_base(str(single), config=str(smoke / kind))
    assert loaded.family == folder.family and loaded.text.keys() == folder.text.keys()
    expected = folder.model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.model.state_dict().items())
