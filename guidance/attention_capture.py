"""Attention maps recorded from the attention calls of a denoiser, per token grid.

One mechanism for everything in the pack that reads attention maps: RB-Guidance's
face mask (the subject token's cross-attention map, refined with self-attention maps;
detached) and the pivot encoder's face-localisation loss (the class token's map, with
gradients). A host feeds ``record(q, k, heads)`` from inside its attention calls; the
recorder keeps head-averaged softmax(q k^T / sqrt(d)) maps grouped by the number of
query tokens (one group per resolution), and callers take the group nearest the grid
they want.
"""
from __future__ import annotations

import math
from typing import Optional

import torch


class AttentionMaps:
    """Head-averaged attention maps of (B, N, heads * d) queries and keys.

    token: keep the cross-attention map of this text token (B, N), or None.
    keep_self: keep self-attention maps (B, N, N) too (calls with as many keys as queries).
    track_grad: keep the maps in the autograd graph (else they are computed detached).
    max_tokens: ignore calls with more query tokens than this (self maps grow as N^2).
    """

    def __init__(self, token: Optional[int] = None, keep_self: bool = False, track_grad: bool = False,
                 max_tokens: Optional[int] = None):
        self.token, self.keep_self, self.track_grad, self.max_tokens = token, keep_self, track_grad, max_tokens
        self.cross: dict[int, list[torch.Tensor]] = {}
        self.self_maps: dict[int, list[torch.Tensor]] = {}
        # detached maps are computed when a grid's maps are first asked for, so unused grids cost nothing:
        # (is_self, q, k, heads) per call, in call order
        self._pending: dict[int, list[tuple[bool, torch.Tensor, torch.Tensor, int]]] = {}

    def wants(self, q: torch.Tensor, k: torch.Tensor) -> bool:
        n = q.shape[1]
        if self.max_tokens is not None and n > self.max_tokens:
            return False
        if k.shape[1] == n:
            return self.keep_self
        return self.token is not None and 0 <= self.token < k.shape[1]

    def record(self, q: torch.Tensor, k: torch.Tensor, heads: int) -> None:
        if q.ndim != 3 or not self.wants(q, k):
            return
        n, is_self = q.shape[1], k.shape[1] == q.shape[1]
        if not self.track_grad:      # q and k are read after the attention call, which is done with them
            self._pending.setdefault(n, []).append((is_self, q.detach(), k.detach(), heads))
            return
        self._add(n, is_self, q, k, heads)

    def _add(self, n: int, is_self: bool, q: torch.Tensor, k: torch.Tensor, heads: int) -> None:
        with torch.set_grad_enabled(self.track_grad and torch.is_grad_enabled()):
            probs = attention_probs(q, k, heads)
            if is_self:
                self.self_maps.setdefault(n, []).append(probs.mean(dim=1))
            else:
                self.cross.setdefault(n, []).append(probs[..., self.token].mean(dim=1))

    def _materialize(self, n: int) -> None:
        for is_self, q, k, heads in self._pending.pop(n, []):
            self._add(n, is_self, q, k, heads)

    def grids(self) -> list[int]:
        return sorted(set(self.cross) | set(self.self_maps) | set(self._pending))

    def nearest(self, tokens: int) -> Optional[int]:
        """The recorded token count closest to ``tokens`` (in log scale), or None."""
        grids = self.grids()
        return min(grids, key=lambda n: abs(math.log(n / tokens))) if grids else None

    def cross_map(self, n: int) -> Optional[torch.Tensor]:
        """The token's map (B, N) averaged over the calls at ``n`` query tokens, or None."""
        self._materialize(n)
        return torch.stack(self.cross[n]).mean(0) if n in self.cross else None

    def self_map(self, n: int) -> Optional[torch.Tensor]:
        self._materialize(n)
        return torch.stack(self.self_maps[n]).mean(0) if n in self.self_maps else None


def attention_probs(q: torch.Tensor, k: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) per head, in float32: (B, heads, Nq, Nk)."""
    b, n, inner = q.shape
    d = inner // heads
    qh = q.float().view(b, n, heads, d).transpose(1, 2)
    kh = k.float().view(b, k.shape[1], heads, d).transpose(1, 2)
    return torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)
