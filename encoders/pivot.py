"""OmniPortrait's Pivot ID Encoder: the identity bound to the prompt's class word.

An image embedding of the reference face (OpenCLIP ViT-L/14) is concatenated with the
text encoder's embedding of the class word ("man", "woman", ...) and a linear layer maps
the pair to the mixed pivot embedding e_mix, which takes the class word's place in the
conditioning (the denoiser stays frozen). Training (with the face-localisation loss,
eta = 2e-3) belongs to the training stage; here: the architecture, its files, and
applying it to a conditioning tensor.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from .checkpoint import METADATA_KEY, CheckpointError, atomic_save, read_info, read_safetensors

PIVOT_FORMAT = "omni_identity.pivot"
PIVOT_VERSION = 1


@dataclass(frozen=True)
class PivotConfig:
    image_dim: int = 768        # OpenCLIP ViT-L/14 projected image embedding
    text_dim: int = 768         # the denoiser's text conditioning width (768 SD1.5, 2048 SDXL)

    def to_dict(self) -> dict:
        return asdict(self)


class PivotIDEncoder(nn.Module):
    def __init__(self, config: PivotConfig):
        super().__init__()
        self.config = config
        self.fuse = nn.Linear(config.text_dim + config.image_dim, config.text_dim)

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
    info = {"format": PIVOT_FORMAT, "version": PIVOT_VERSION, "config": encoder.config.to_dict()}
    atomic_save(encoder.state_dict(), path, {METADATA_KEY: json.dumps(info)})


def load_pivot(path: str) -> PivotIDEncoder:
    metadata, tensors = read_safetensors(path, "pivot encoder")
    info = read_info(path, metadata, list(tensors), "pivot encoder", PIVOT_FORMAT)
    known = {f.name for f in fields(PivotConfig)}
    try:
        config = PivotConfig(**{k: v for k, v in info.get("config", {}).items() if k in known})
        encoder = PivotIDEncoder(config)
        encoder.load_state_dict(tensors, strict=True)
    except (TypeError, RuntimeError) as exc:
        raise CheckpointError(f"{path} does not match its pivot encoder config: {exc}") from exc
    return encoder.eval()
