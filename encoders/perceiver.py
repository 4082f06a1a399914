"""The feed-forward block of the perceiver resamplers (h94's IP-Adapter Plus, PuLID's IDFormer, InfiniteYou's
image projection): LayerNorm, Linear, GELU, Linear, without biases; parameter names ``0``, ``1``, ``3``."""
from __future__ import annotations

from torch import nn


def feed_forward(dim: int, mult: int) -> nn.Sequential:
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(),
                         nn.Linear(inner, dim, bias=False))
