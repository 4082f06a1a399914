"""The training loop both stages share: AdamW, accumulation, bf16, atomic checkpoints, resume, DDP.

A stage is an ``Objective``: the trainable module and a function that returns the summed
loss of some samples of the step's global batch. The trainer owns everything else:

- the global batch of a step is ``batch * grad_accum * world`` samples drawn from the
  sampler as a pure function of (seed, step); process r takes its slices, so 1 process
  and N processes see the same samples, and a resumed run the same as an uninterrupted one;
- each backward uses sum(sample losses) / (batch * grad_accum); DDP averages over the
  processes, which makes the update the mean over the global batch whatever the world size;
- checkpoints (weights, optimizer, step, loss history) are written to a temporary file
  and renamed into place, so a run killed at any moment leaves the last complete one.
"""
from __future__ import annotations

import gc
import math
import os
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from typing import Callable, Optional, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

PRECISIONS = ("fp32", "bf16")


class TrainingCancelled(RuntimeError):
    pass


@dataclass
class TrainConfig:
    steps: int = 1000
    batch: int = 8                 # samples per process per micro-batch
    grad_accum: int = 1
    lr: float = 1e-4               # constant, as in the paper
    weight_decay: float = 0.01
    precision: str = "fp32"
    seed: int = 0
    save_every: int = 100          # steps between checkpoints (0: only at the end)

    def __post_init__(self):
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")
        if self.steps < 1 or self.batch < 1 or self.grad_accum < 1:
            raise ValueError("steps, batch and grad_accum must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


class Objective(Protocol):
    module: nn.Module

    def draw(self, step: int, count: int) -> list: ...

    def loss(self, model: nn.Module, samples: list, step: int, first_index: int) -> torch.Tensor:
        """Summed loss of ``samples``, the global batch's entries first_index.. of ``step``."""


def sum_of_sample_means(per_target: torch.Tensor, owners: torch.Tensor, samples: int) -> torch.Tensor:
    """Each sample's mean loss over its targets (``owners`` says whose each target is), summed over samples."""
    owners = owners.to(per_target.device)
    per_sample = torch.zeros(samples, dtype=per_target.dtype, device=per_target.device).index_add(0, owners, per_target)
    return (per_sample / torch.bincount(owners, minlength=samples).to(per_target.dtype)).sum()


def sample_seed(seed: int, step: int, index: int, *more: int) -> int:
    """A seed for one sample's randomness (masks, noise) that no partitioning changes."""
    return int(np.random.SeedSequence([seed, step, index, *more]).generate_state(1)[0])


class Trainer:
    def __init__(self, objective: Objective, config: TrainConfig, checkpoint_path: Optional[str] = None,
                 device: Optional[torch.device] = None):
        self.objective, self.config, self.checkpoint_path = objective, config, checkpoint_path
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        self.world = dist.get_world_size() if dist.is_initialized() else 1
        module = objective.module
        if device is not None:
            module.to(device)
        self.device = next(module.parameters()).device
        trainable = [p for p in module.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError("nothing to train: no parameter requires gradients")
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        self.model = (nn.parallel.DistributedDataParallel(module, device_ids=device_ids) if self.world > 1
                      else module)
        self.optimizer = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        self.step = 0
        self.losses: list[float] = []

    def release_parallel(self) -> None:
        """Unwrap DistributedDataParallel once training is over, before the process group is destroyed. Its
        reducer holds a reference to the group: freed after the group was destroyed, it is the group's last
        owner, and the group's destructor then joins gloo's worker threads while holding the GIL, which a worker
        finishing an all-reduce needs (a deadlock seen under torchrun at exit)."""
        if self.model is not self.objective.module:
            self.model = self.objective.module
            gc.collect()

    # -- checkpoints -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"module": self.objective.module.state_dict(), "optimizer": self.optimizer.state_dict(),
                "step": self.step, "losses": torch.tensor(self.losses, dtype=torch.float64),
                "config": {k: v for k, v in self.config.to_dict().items() if k != "steps"}}

    def save(self, path: Optional[str] = None) -> Optional[str]:
        path = path or self.checkpoint_path
        if path is None or self.rank != 0:
            return None
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
        with open(tmp, "wb") as f:
            torch.save(self.state_dict(), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return path

    def resume(self, path: Optional[str] = None) -> bool:
        """Continue from a checkpoint if there is one; True when resumed."""
        path = path or self.checkpoint_path
        if path is None or not os.path.isfile(path):
            return False
        state = torch.load(path, map_location=self.device, weights_only=True)
        missing = {"module", "optimizer", "step"} - set(state)
        if missing:
            raise ValueError(f"{os.path.basename(path)} is not a training checkpoint of this pack (no {sorted(missing)})")
        saved = state.get("config", {})
        for key in ("batch", "grad_accum", "seed"):
            if key in saved and saved[key] != getattr(self.config, key):
                raise ValueError(f"{os.path.basename(path)} was trained with {key}={saved[key]}; resuming with "
                                 f"{key}={getattr(self.config, key)} would not continue the same run")
        self.objective.module.load_state_dict(state["module"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.losses = [float(v) for v in state.get("losses", torch.zeros(0)).tolist()]
        return True

    # -- the loop ----------------------------------------------------------------------------
    def train_step(self) -> float:
        c = self.config
        per_micro = c.batch * self.world
        samples = self.objective.draw(self.step, per_micro * c.grad_accum)
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64)
        for micro in range(c.grad_accum):
            first = micro * per_micro + self.rank * c.batch
            chunk = samples[first:first + c.batch]
            sync = self.world == 1 or micro == c.grad_accum - 1
            context = self.model.no_sync() if not sync else nullcontext()
            with context:
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=c.precision == "bf16"):
                    loss_sum = self.objective.loss(self.model, chunk, self.step, first)
                (loss_sum / (c.batch * c.grad_accum)).backward()
            total += loss_sum.detach().double()
        self.optimizer.step()
        if self.world > 1:
            total = total.to(self.device)       # NCCL reduces device tensors
            dist.all_reduce(total)
            total = total.cpu()
        mean = float(total) / (per_micro * c.grad_accum)
        if not math.isfinite(mean):
            raise FloatingPointError(f"the loss became {mean} at step {self.step}; lower the learning rate")
        self.losses.append(mean)
        self.step += 1
        return mean

    def run(self, on_step: Optional[Callable[[int, float], None]] = None,
            should_stop: Optional[Callable[[], bool]] = None) -> list[float]:
        c = self.config
        while self.step < c.steps:
            if should_stop is not None and should_stop():
                self.save()
                raise TrainingCancelled(f"training stopped at step {self.step}; the checkpoint resumes it")
            loss = self.train_step()
            if on_step is not None:
                on_step(self.step, loss)
            if (c.save_every and self.step % c.save_every == 0) or self.step == c.steps:
                self.save()
        return self.losses
