"""OmniPortrait's Pivot ID Encoder: the identity bound to the prompt's class word.

An image embedding of the reference face (OpenCLIP ViT-L/14) is concatenated with the
text encoder's embedding of the class word ("man", "woman", ...) and a linear layer maps
the pair to the mixed pivot embedding e_mix, which takes the class word's place in the
conditioning (the denoiser stays frozen). Training (with the face-localisation loss,
eta = 2e-3) belongs to the training stage; here: the architecture, its files, and
applying it to a conditioning tensor.

The paper trains "the Pivot ID Encoder and linear layer": the visual encoder as well as the
fusing layer. A ``VisionTower`` is that encoder as a trainable module (a host builds it from
its CLIP vision model); ``prepare_vision`` opens all its blocks or its last N (plus the final
norm and projection) to training, with gradient checkpointing on the trained blocks. A pivot
file (format version 2) then carries the trained tensors of the tower under ``vision.``,
in the tower's own key layout (``PivotConfig.vision_layout``), and whoever applies the pivot
loads them into a copy of the same CLIP vision model. Version-1 files (the fusing layer
only, the visual encoder frozen) still load: they carry no ``vision.`` tensors.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
from torch.utils.checkpoint import checkpoint

from .checkpoint import METADATA_KEY, CheckpointError, atomic_save, float32_copies, read_info, read_safetensors

PIVOT_FORMAT = "omni_identity.pivot"
PIVOT_VERSION = 2              # 2: may carry the trained visual encoder's tensors under "vision."
VISION_PREFIX = "vision."
ALL_BLOCKS = -1


@dataclass(frozen=True)
class PivotConfig:
    image_dim: int = 768        # OpenCLIP ViT-L/14 projected image embedding
    text_dim: int = 768         # the denoiser's text conditioning width (768 SD1.5, 2048 SDXL)
    vision_blocks: int = 0      # visual encoder blocks trained with the pivot: 0 frozen, -1 all (the paper)
    vision_layout: str = ""     # the key layout of the file's vision tensors (e.g. "comfy_clip_vision")

    def to_dict(self) -> dict:
        return asdict(self)


class VisionTower(nn.Module):
    """A visual encoder the pivot can train: images (B, H, W, 3) in [0, 1] -> embeddings (B, image_dim).

    Subclasses (one per host) say which modules are its transformer blocks (in order), its
    stem (patch/position embeddings, pre-norm: trained only with all blocks) and its head
    (final norm, projection: trained with any block)."""

    layout = ""

    def blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def stem(self) -> list[nn.Module]:
        raise NotImplementedError

    def head(self) -> list[nn.Module]:
        raise NotImplementedError


def _checkpointed(block: nn.Module):
    original = block.forward

    def forward(*args, **kwargs):
        if torch.is_grad_enabled() and any(p.requires_grad for p in block.parameters()):
            return checkpoint(original, *args, use_reentrant=False, **kwargs)
        return original(*args, **kwargs)
    return forward


def prepare_vision(tower: VisionTower, blocks: int, gradient_checkpointing: bool = True) -> list[str]:
    """Open the tower to training: all blocks (``blocks`` = -1, with the stem) or the last ``blocks``
    (and the head); everything else frozen. Trained blocks recompute their activations in the
    backward pass when ``gradient_checkpointing``. Returns the names of the trained parameters."""
    every = list(tower.blocks())
    if blocks != ALL_BLOCKS and not 0 <= blocks <= len(every):
        raise ValueError(f"vision_blocks must be -1 (all) or 0..{len(every)}, not {blocks}")
    tower.requires_grad_(False)
    trained = every if blocks == ALL_BLOCKS else every[len(every) - blocks:] if blocks else []
    opened = list(trained) + (list(tower.head()) if trained else []) + (list(tower.stem()) if blocks == ALL_BLOCKS else [])
    for module in opened:
        module.requires_grad_(True)
    if gradient_checkpointing:
        for block in trained:
            block.forward = _checkpointed(block)
    return [name for name, p in tower.named_parameters() if p.requires_grad]


def trained_vision_state(tower: VisionTower) -> dict[str, torch.Tensor]:
    """The tower's trained tensors (CPU, float32), the ones a pivot file carries."""
    return {name: p.detach().float().cpu().clone() for name, p in tower.named_parameters() if p.requires_grad}


def load_vision_state(tower: VisionTower, state: dict[str, torch.Tensor], layout: str) -> VisionTower:
    """Put a pivot file's trained vision tensors into ``tower`` (a copy of the CLIP vision model it was trained on)."""
    if layout != tower.layout:
        raise ValueError(f"the pivot's visual encoder was trained as a {layout!r} model; this one is {tower.layout!r}")
    own = dict(tower.named_parameters())
    wrong = sorted(k for k, v in state.items() if k not in own or tuple(own[k].shape) != tuple(v.shape))
    if wrong:
        raise ValueError(f"the pivot's trained visual encoder does not fit this CLIP vision model ({len(wrong)} "
                         f"tensor(s) missing or of another shape, e.g. {wrong[0]}): connect the CLIP vision model "
                         "it was trained with")
    with torch.no_grad():
        for key, value in state.items():
            own[key].copy_(value.to(own[key]))
    return tower


class PivotIDEncoder(nn.Module):
    def __init__(self, config: PivotConfig, vision_state: Optional[dict[str, torch.Tensor]] = None):
        super().__init__()
        self.config = config
        self.fuse = nn.Linear(config.text_dim + config.image_dim, config.text_dim)
        # the visual encoder's trained tensors (not a submodule: they go into a copy of the host's CLIP vision)
        self.vision_state: dict[str, torch.Tensor] = dict(vision_state or {})

    def forward(self, class_embedding: torch.Tensor, image_embedding: torch.Tensor) -> torch.Tensor:
        """e_mix (B, text_dim) from the class word's embedding (B, text_dim) and the face's (B, image_dim)."""
        return self.fuse(torch.cat([class_embedding, image_embedding], dim=-1))

    def apply(self, conditioning: torch.Tensor, token_index: int, image_embedding: torch.Tensor) -> torch.Tensor:
        """A copy of ``conditioning`` (B, L, text_dim) with the class word at ``token_index`` replaced by e_mix."""
        if not 0 <= token_index < conditioning.shape[1]:
            raise ValueError(f"token index {token_index} is outside the prompt's {conditioning.shape[1]} tokens")
        if conditioning.shape[-1] != self.config.text_dim:
            raise ValueError(f"the conditioning is {conditioning.shape[-1]} wide; this pivot encoder was made for "
                             f"{self.config.text_dim} (768 = SD1.5, 2048 = SDXL)")
        image = image_embedding.to(conditioning).expand(conditioning.shape[0], -1)
        mixed = self(conditioning[:, token_index], image)
        out = conditioning.clone()
        out[:, token_index] = mixed
        return out


def save_pivot(encoder: PivotIDEncoder, path: str) -> None:
    """Version 2: the fusing layer, and the trained visual encoder's tensors under ``vision.``."""
    info = {"format": PIVOT_FORMAT, "version": PIVOT_VERSION, "config": encoder.config.to_dict()}
    tensors = {**float32_copies(encoder.state_dict()), **float32_copies(encoder.vision_state, VISION_PREFIX)}
    atomic_save(tensors, path, {METADATA_KEY: json.dumps(info)})


def load_pivot(path: str) -> PivotIDEncoder:
    """Versions 1 (fusing layer only) and 2 (with the trained visual encoder's tensors)."""
    metadata, tensors = read_safetensors(path, "pivot encoder")
    info = read_info(path, metadata, list(tensors), "pivot encoder", PIVOT_FORMAT)
    if info.get("version", 1) > PIVOT_VERSION:
        raise CheckpointError(f"{path} is pivot format version {info['version']}; this pack reads up to "
                              f"{PIVOT_VERSION}: update ComfyUI-OmniIdentity")
    known = {f.name for f in fields(PivotConfig)}
    vision = {k[len(VISION_PREFIX):]: v for k, v in tensors.items() if k.startswith(VISION_PREFIX)}
    own = {k: v for k, v in tensors.items() if not k.startswith(VISION_PREFIX)}
    try:
        config = PivotConfig(**{k: v for k, v in info.get("config", {}).items() if k in known})
        encoder = PivotIDEncoder(config, vision)
        encoder.load_state_dict(own, strict=True)
    except (TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path} does not match its pivot encoder config: {exc}") from exc
    if bool(vision) != (config.vision_blocks != 0):
        raise CheckpointError(f"{path}: its config says {config.vision_blocks} trained vision blocks, but it carries "
                              f"{len(vision)} vision tensors")
    return encoder.eval()
