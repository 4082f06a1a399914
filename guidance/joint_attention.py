"""Attention maps of a DiT's joint attention, for RB-Guidance's generated-face mask.

A flow-matching DiT (FLUX.1, ...) attends over one joint sequence: the text tokens, then the
generated image's tokens, then any reference-image tokens (FLUX.1 Kontext appends them). The
paper's two maps are read off it, restricted to the generated image's tokens:

- the subject map: for each generated-image query, the softmax weight (over the whole joint
  sequence, as the model attends) of the subject word's key;
- the self-attention map: generated-image queries against generated-image keys, softmax over
  those keys only, so each row is a distribution over the generated image (row-stochastic, what
  the paper's refinement m <- A_s norm(m)^alpha expects).

Both are averaged over heads and over the recorded calls. A grid finer than ``max_tokens`` is
pooled by powers of two (queries averaged, keys summed, so rows stay distributions): the
self-attention map grows as N^2. Maps are computed head by head in float32, detached.
Pure torch.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


def pooled_grid(grid: tuple[int, int], max_tokens: Optional[int]) -> tuple[tuple[int, int], int]:
    """(grid after pooling, pooling factor): the finest power-of-two pooling with at most ``max_tokens`` cells."""
    factor = 1
    while max_tokens is not None and math.ceil(grid[0] / factor) * math.ceil(grid[1] / factor) > max_tokens:
        factor *= 2
    return (math.ceil(grid[0] / factor), math.ceil(grid[1] / factor)), factor


def _pool(values: torch.Tensor, grid: tuple[int, int], factor: int) -> torch.Tensor:
    """Average (..., h*w) over factor x factor cells of the grid -> (..., h'*w')."""
    if factor == 1:
        return values
    lead = values.shape[:-1]
    pooled = F.avg_pool2d(values.reshape(-1, 1, *grid), factor, factor, ceil_mode=True)
    return pooled.reshape(*lead, -1)


class JointAttentionMaps:
    """Head-averaged subject and self-attention maps of the generated image's tokens.

    token: index of the subject word among the text tokens, or None (no subject map).
    keep_self: keep the self-attention maps. max_tokens: pool finer grids down to at most this.
    """

    def __init__(self, token: Optional[int] = None, keep_self: bool = True, max_tokens: Optional[int] = 1024):
        self.token, self.keep_self, self.max_tokens = token, keep_self, max_tokens
        self.grid: Optional[tuple[int, int]] = None
        self.cross: Optional[torch.Tensor] = None        # (B, N') sums over calls
        self.self_map: Optional[torch.Tensor] = None     # (B, N', N') sums over calls
        self.calls = 0

    def record(self, q: torch.Tensor, k: torch.Tensor, txt_len: int, grid: tuple[int, int]) -> None:
        """q, k: (B, heads, L, d) of one joint attention call, text first, then the generated image's
        ``grid[0] * grid[1]`` tokens (anything after them, e.g. reference tokens, is a key but never a query)."""
        count = grid[0] * grid[1]
        if q.ndim != 4 or k.shape[2] < txt_len + count:
            return
        wants_cross = self.token is not None and 0 <= self.token < txt_len
        if not (wants_cross or self.keep_self):
            return
        target, factor = pooled_grid(grid, self.max_tokens)
        heads, scale = q.shape[1], q.shape[-1] ** -0.5
        cross = self_map = None
        with torch.no_grad():
            for h in range(heads):
                queries = q[:, h, txt_len:txt_len + count].float()                       # (B, N, d)
                logits = queries @ k[:, h].float().transpose(-1, -2) * scale             # (B, N, L)
                if wants_cross:
                    column = (logits[..., self.token] - torch.logsumexp(logits, dim=-1)).exp()
                    cross = column if cross is None else cross + column
                if self.keep_self:
                    probs = torch.softmax(logits[..., txt_len:txt_len + count], dim=-1)  # (B, N, N)
                    self_map = probs if self_map is None else self_map + probs
        if cross is not None:
            cross = _pool(cross / heads, grid, factor)
            self.cross = cross if self.cross is None else self.cross + cross
        if self_map is not None:
            self_map = self_map / heads
            if factor > 1:   # keys: sum over a cell (rows stay distributions); queries: average over a cell
                keys = _pool(self_map, grid, factor) * factor * factor
                self_map = _pool(keys.transpose(-1, -2), grid, factor).transpose(-1, -2)
                self_map = self_map / self_map.sum(-1, keepdim=True).clamp_min(1e-12)
            self.self_map = self_map if self.self_map is None else self.self_map + self_map
        self.grid = target
        self.calls += 1

    def maps(self) -> tuple[Optional[tuple[int, int]], Optional[torch.Tensor], Optional[torch.Tensor]]:
        """(grid, subject map (B, N'), self-attention map (B, N', N')), averaged over the recorded calls;
        Nones where nothing was recorded."""
        if self.calls == 0:
            return None, None, None
        cross = None if self.cross is None else self.cross / self.calls
        self_map = None if self.self_map is None else self.self_map / self.calls
        return self.grid, cross, self_map
