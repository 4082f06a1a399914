"""Stage 2 (flow matching) on a diffusers base model, single process or under torchrun.

The objective is ``training.flow_matching.FlowMatchingObjective`` and the loop
``training.trainer.Trainer`` (AdamW, accumulation, bf16 autocast, atomic checkpoints, resume,
the loss log), exactly as in the ComfyUI node; only the denoiser host differs. Parallelism:

- ``ddp``: every process holds the whole frozen base; the trainable encoder + adapter are
  wrapped in DistributedDataParallel by the trainer;
- ``fsdp``: the frozen base is sharded with ``torch.distributed.fsdp.fully_shard`` (per
  transformer block / UNet resnet and transformer, then the root), each process keeping 1/world of its
  weights and gathering a block's weights just for its forward; the trainable part is still
  replicated and averaged by DDP. Same samples, same updates: only the memory differs.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist

from ..guidance.adapter import AdapterConfig, create_adapter
from ..training.dataset import FewToManySampler
from ..training.flow_matching import FlowMatchingObjective
from ..training.trainer import TrainConfig, Trainer
from .denoiser import DiffusersDenoiserHost
from .layers import host_layers, is_dit, model_family

PARALLEL = ("ddp", "fsdp")


def shard_units(model) -> list:
    """The submodules FSDP shards one by one (their weights are gathered together for their forward)."""
    if is_dit(model):           # each family's block lists (Z-Image: its refiners and main layers)
        names = ("transformer_blocks", "single_transformer_blocks", "context_refiner", "noise_refiner", "layers")
        return [block for name in names for block in (getattr(model, name, None) or ())]
    blocks = [*model.down_blocks, *([model.mid_block] if model.mid_block is not None else []), *model.up_blocks]
    return [unit for block in blocks for unit in (*(getattr(block, "attentions", None) or []), *block.resnets)]


def shard_frozen_base(model, device) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for unit in shard_units(model):
        fully_shard(unit, mesh=mesh, reshard_after_forward=True)
    fully_shard(model, mesh=mesh, reshard_after_forward=True)


def base_parameters(model) -> tuple[int, int]:
    """(parameters of the frozen base, of them held by this process): equal under DDP, 1/world under FSDP."""
    total = local = 0
    for p in model.parameters():
        total += p.numel()
        local += p.to_local().numel() if hasattr(p, "to_local") else p.numel()
    return total, local


def flow_adapter_config(model, token_dim: int) -> AdapterConfig:
    return AdapterConfig(family=model_family(model), token_dim=token_dim,
                         layer_dims=tuple(layer.inner_dim for layer in host_layers(model)))


def prepare_host(base, train: TrainConfig, image_size: int, device=None, parallel: str = "ddp",
                 gradient_checkpointing: bool = False, guidance: float = 1.0) -> DiffusersDenoiserHost:
    """The frozen base on this process's device (sharded under FSDP) as a denoiser host."""
    if parallel not in PARALLEL:
        raise ValueError(f"parallel must be one of {PARALLEL}, not {parallel!r}")
    device = torch.device(device or "cpu")
    dtype = torch.bfloat16 if train.precision == "bf16" else torch.float32
    model = base.model.to(device)              # loaded in its training dtype by models.load_base
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if parallel == "fsdp" and dist.is_initialized() and dist.get_world_size() > 1:
        shard_frozen_base(model, device)
    return DiffusersDenoiserHost(base, image_size, device=device, dtype=dtype, guidance=guidance)


def pivot_trainer(base, pivot, image_embed_fn, face_mask_fn, dataset, train: TrainConfig, targets: int,
                  class_token: int, image_size: int, checkpoint_path: Optional[str] = None, device=None,
                  parallel: str = "ddp", gradient_checkpointing: bool = False, eta: float = 2e-3) -> Trainer:
    """OmniPortrait's pivot encoder on a frozen diffusers UNet (``training.pivot.PivotObjective``), not yet run."""
    from ..training.dataset import SamplerConfig
    from ..training.pivot import PivotObjective
    if "encoder_hidden_states" not in base.text:
        raise ValueError("the pivot stage needs the prompt's conditioning (--text-embeds with encoder_hidden_states) "
                         "whose class word --class-token points at")
    host = prepare_host(base, train, image_size, device, parallel, gradient_checkpointing)
    pivot.train().requires_grad_(True)
    sampler = FewToManySampler(dataset, SamplerConfig("few_to_many", 1, 1, targets), seed=train.seed)
    objective = PivotObjective(pivot, host, sampler, image_embed_fn, face_mask_fn, base.text["encoder_hidden_states"],
                               class_token, seed=train.seed, eta=eta)
    return Trainer(objective, train, checkpoint_path, device=host.device)


def flow_trainer(base, encoder, token_fn, dataset, train: TrainConfig, sampler_config, image_size: int,
                 checkpoint_path: Optional[str] = None, device=None, parallel: str = "ddp",
                 gradient_checkpointing: bool = False, mode: str = "omni_id", adapter=None,
                 guidance: float = 1.0) -> Trainer:
    """The stage-2 trainer for ``base`` (a ``models.BaseModel``), not yet run."""
    host = prepare_host(base, train, image_size, device, parallel, gradient_checkpointing, guidance)
    device = host.device
    model = host.model
    if adapter is None:
        adapter = create_adapter(flow_adapter_config(model, encoder.config.dim), seed=train.seed + 1)
    host.check_adapter(adapter)
    adapter.train().requires_grad_(True)
    encoder.train().requires_grad_(True)
    sampler = FewToManySampler(dataset, sampler_config, seed=train.seed)
    objective = FlowMatchingObjective(encoder, adapter, host, sampler, token_fn, seed=train.seed, mode=mode,
                                      clip_size=224)
    return Trainer(objective, train, checkpoint_path, device=device)
