"""Image-projection models of the IP-Adapter checkpoints users already have (h94 layouts).

Parameter names follow the checkpoints' ``image_proj.*`` keys so their state dicts load
as they are; the modules are our own implementations of the published architectures:
- ``plus`` (IP-Adapter Plus / Plus-Face): a Perceiver resampler; learned latents
  attend to [CLIP penultimate tokens; latents];
- ``full_face``: an MLP over every CLIP token, then LayerNorm;
- ``faceid``: an MLP from the 512-d ArcFace embedding to T tokens, then LayerNorm;
- ``faceid_plusv2``: the FaceID tokens refined by a Perceiver resampler over the CLIP
  tokens, added back with a scale (the "v2" shortcut; FaceID Plus v1 files, the same keys,
  have ``shortcut=False``: the refinement alone);
- ``pooled``: one linear layer from the image encoder's pooled embedding to T tokens, then
  LayerNorm (h94's base IP-Adapter; XLabs' FLUX IP-Adapters, keys ``proj`` and ``norm``);
- ``pooled_mlp``: an MLP from the pooled embedding to T tokens, then LayerNorm (InstantX's
  FLUX.1-dev IP-Adapter over SigLIP's pooled output; the FaceID MLP on another input).
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..encoders.perceiver import feed_forward

PROJECTIONS = ("none", "plus", "full_face", "faceid", "faceid_plusv2", "pooled", "pooled_mlp")


class PerceiverAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, heads: int):
        super().__init__()
        self.heads = heads
        inner = dim_head * heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, n, _ = latents.shape
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        split = [t.view(b, -1, self.heads, t.shape[-1] // self.heads).transpose(1, 2) for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*split)
        return self.to_out(out.transpose(1, 2).reshape(b, n, -1))


class PerceiverStack(nn.Module):
    """proj_in -> depth x (cross-attention, feed-forward) on latents -> proj_out -> LayerNorm."""

    def __init__(self, dim: int, depth: int, heads: int, embedding_dim: int, output_dim: int, ff_mult: int):
        super().__init__()
        self.proj_in = nn.Linear(embedding_dim, dim)
        self.proj_out = nn.Linear(dim, output_dim)
        self.norm_out = nn.LayerNorm(output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(dim, 64, heads), feed_forward(dim, ff_mult)])
            for _ in range(depth))

    def run(self, latents: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        x = self.proj_in(features)
        for attn, ff in self.layers:
            latents = latents + attn(x, latents)
            latents = latents + ff(latents)
        return self.norm_out(self.proj_out(latents))


class PlusProjection(PerceiverStack):
    def __init__(self, dim, depth, heads, embedding_dim, output_dim, ff_mult, num_queries):
        super().__init__(dim, depth, heads, embedding_dim, output_dim, ff_mult)
        self.latents = nn.Parameter(torch.randn(1, num_queries, dim) / dim ** 0.5)

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return self.run(self.latents.expand(clip.shape[0], -1, -1), clip)


class FullFaceProjection(nn.Module):
    def __init__(self, clip_dim: int, output_dim: int):
        super().__init__()
        self.proj = nn.Sequential(nn.Linear(clip_dim, clip_dim), nn.GELU(), nn.Linear(clip_dim, output_dim),
                                  nn.LayerNorm(output_dim))

    def forward(self, clip: torch.Tensor) -> torch.Tensor:
        return self.proj(clip)


def f32_linear(x: torch.Tensor, layer: nn.Linear, rows: int = 16384) -> torch.Tensor:
    """``layer(x)`` computed in float32 from weights of any dtype, ``rows`` output features at a
    time, so a half-precision projection of a billion weights is never copied whole to float32."""
    x = x.float()
    parts = []
    for start in range(0, layer.out_features, rows):
        weight = layer.weight[start:start + rows].float()
        bias = None if layer.bias is None else layer.bias[start:start + rows].float()
        parts.append(F.linear(x, weight, bias))
    return torch.cat(parts, -1)


def f32_layer_norm(x: torch.Tensor, norm: nn.LayerNorm) -> torch.Tensor:
    return F.layer_norm(x.float(), norm.normalized_shape, norm.weight.float(), norm.bias.float(), norm.eps)


class FaceIDProjection(nn.Module):
    """Linear, GELU, Linear to T tokens, LayerNorm; computed in float32 whatever the weights' dtype."""

    def __init__(self, id_dim: int, hidden: int, output_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens, self.output_dim = num_tokens, output_dim
        self.proj = nn.Sequential(nn.Linear(id_dim, hidden), nn.GELU(), nn.Linear(hidden, output_dim * num_tokens))
        self.norm = nn.LayerNorm(output_dim)

    def forward(self, arcface: torch.Tensor) -> torch.Tensor:
        x = f32_linear(F.gelu(f32_linear(arcface, self.proj[0])), self.proj[2])
        return f32_layer_norm(x.view(arcface.shape[0], self.num_tokens, self.output_dim), self.norm)


class FaceIDPlusProjection(FaceIDProjection):
    """FaceID tokens refined by a Perceiver resampler over CLIP tokens (h94's ProjPlusModel)."""

    def __init__(self, id_dim, hidden, output_dim, num_tokens, dim, depth, heads, embedding_dim, ff_mult,
                 shortcut: bool = True):
        if dim != output_dim:
            raise ValueError(f"FaceID Plus: the resampler width ({dim}) must equal the token width ({output_dim})")
        super().__init__(id_dim, hidden, output_dim, num_tokens)
        self.shortcut = shortcut
        self.perceiver_resampler = PerceiverStack(dim, depth, heads, embedding_dim, output_dim, ff_mult)

    def forward(self, arcface: torch.Tensor, clip: torch.Tensor, shortcut_scale: float = 1.0) -> torch.Tensor:
        """v2 (``shortcut``): tokens + scale x refinement; v1: the refinement alone (h94's
        ProjModelFaceIdPlus with shortcut=False; the scale does not apply)."""
        tokens = super().forward(arcface)
        refined = self.perceiver_resampler.run(tokens, clip.to(tokens.dtype))
        return tokens + shortcut_scale * refined if self.shortcut else refined


class PooledProjection(nn.Module):
    def __init__(self, pooled_dim: int, output_dim: int, num_tokens: int):
        super().__init__()
        self.num_tokens, self.output_dim = num_tokens, output_dim
        self.proj = nn.Linear(pooled_dim, output_dim * num_tokens)
        self.norm = nn.LayerNorm(output_dim)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        x = f32_linear(pooled, self.proj).view(pooled.shape[0], self.num_tokens, self.output_dim)
        return f32_layer_norm(x, self.norm)


class PooledMLPProjection(FaceIDProjection):
    """The FaceID MLP (Linear, GELU, Linear, LayerNorm per token) on a pooled image embedding."""

    def __init__(self, pooled_dim: int, hidden: int, output_dim: int, num_tokens: int):
        super().__init__(pooled_dim, hidden, output_dim, num_tokens)


def build_projection(kind: str, hyper: dict) -> nn.Module | None:
    if kind == "none":
        return None
    if kind == "plus":
        return PlusProjection(**hyper)
    if kind == "full_face":
        return FullFaceProjection(**hyper)
    if kind == "faceid":
        return FaceIDProjection(**hyper)
    if kind == "faceid_plusv2":
        return FaceIDPlusProjection(**hyper)
    if kind == "pooled":
        return PooledProjection(**hyper)
    if kind == "pooled_mlp":
        return PooledMLPProjection(**hyper)
    raise ValueError(f"image projection must be one of {PROJECTIONS}, not {kind!r}")


def _count(keys, pattern_prefix: str) -> int:
    return len({k[len(pattern_prefix):].split(".")[0] for k in keys if k.startswith(pattern_prefix)})


def infer_h94_projection(state: dict[str, torch.Tensor]) -> tuple[str, dict]:
    """(kind, constructor arguments) of an h94 checkpoint's ``image_proj`` (prefix removed)."""
    keys = set(state)
    if "latents" in keys:
        dim = state["latents"].shape[-1]
        return "plus", dict(dim=dim, depth=_count(keys, "layers."), heads=state["layers.0.0.to_q.weight"].shape[0] // 64,
                            embedding_dim=state["proj_in.weight"].shape[1], output_dim=state["proj_out.weight"].shape[0],
                            ff_mult=state["layers.0.1.1.weight"].shape[0] // dim, num_queries=state["latents"].shape[1])
    if "perceiver_resampler.proj_in.weight" in keys:
        out_dim = state["norm.weight"].shape[0]
        dim = state["perceiver_resampler.proj_in.weight"].shape[0]
        return "faceid_plusv2", dict(
            id_dim=state["proj.0.weight"].shape[1], hidden=state["proj.0.weight"].shape[0], output_dim=out_dim,
            num_tokens=state["proj.2.weight"].shape[0] // out_dim, dim=dim,
            depth=_count(keys, "perceiver_resampler.layers."),
            heads=state["perceiver_resampler.layers.0.0.to_q.weight"].shape[0] // 64,
            embedding_dim=state["perceiver_resampler.proj_in.weight"].shape[1],
            ff_mult=state["perceiver_resampler.layers.0.1.1.weight"].shape[0] // dim)
    if "proj.3.weight" in keys:
        return "full_face", dict(clip_dim=state["proj.0.weight"].shape[1], output_dim=state["proj.2.weight"].shape[0])
    if "proj.0.weight" in keys and "norm.weight" in keys:
        out_dim = state["norm.weight"].shape[0]
        return "faceid", dict(id_dim=state["proj.0.weight"].shape[1], hidden=state["proj.0.weight"].shape[0],
                              output_dim=out_dim, num_tokens=state["proj.2.weight"].shape[0] // out_dim)
    if "proj.weight" in keys and "norm.weight" in keys:
        return "pooled", pooled_args(state)
    raise ValueError(f"unrecognised image_proj layout (keys {sorted(keys)[:6]} ...)")


def pooled_args(state: dict[str, torch.Tensor]) -> dict:
    """Constructor arguments of a ``pooled`` projection (keys ``proj.*``, ``norm.*``)."""
    out_dim = state["norm.weight"].shape[0]
    return dict(pooled_dim=state["proj.weight"].shape[1], output_dim=out_dim,
                num_tokens=state["proj.weight"].shape[0] // out_dim)


def pooled_mlp_args(state: dict[str, torch.Tensor]) -> dict:
    """Constructor arguments of a ``pooled_mlp`` projection (keys ``proj.0``, ``proj.2``, ``norm``)."""
    out_dim = state["norm.weight"].shape[0]
    return dict(pooled_dim=state["proj.0.weight"].shape[1], hidden=state["proj.0.weight"].shape[0],
                output_dim=out_dim, num_tokens=state["proj.2.weight"].shape[0] // out_dim)
