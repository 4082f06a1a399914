"""The Omni-ID identity encoder and the paper's baseline encoders (pure torch).

Omni-ID (CVPR 2025, omni-id.md "Omni-ID Encoder"): the CLIP-H penultimate tokens of
N face images (257 x 1280 each) are concatenated as keys/values; 256 learnable
queries of width 1280 cross-attend to them, then self-attention blocks refine the
queries. The output is 256 x 1280 whatever N is, and it does not depend on the order
of the images: there is no positional signal across images, and attention sums over
keys.

Depths are not given by the paper. Defaults: 4 cross-attention blocks, the depth of
IP-Adapter Plus's Resampler (the query-based image-token aggregator the appendix
builds on), then 2 self-attention blocks, the self-attention depth of the paper's own
masked transformer decoder (appendix A.2). Heads of 64 channels as in CLIP-H.

Baselines (appendix A.1):
- ``arcface``: the 512-d ArcFace embedding projected to 256 x 1280 by an MLP (the
  IP-Adapter FaceID projection, scaled to 256 tokens); several images are
  concatenated along the tokens or averaged before projection.
- ``arcface_clip``: FaceIDPlus style: the averaged ArcFace embedding projected to the
  256 queries, each image's CLIP tokens as keys/values, the same transformer.
- ``clip`` needs no weights: the CLIP tokens of all images, concatenated.

Infinite-ID's identity extractor (ECCV 2024, "Face Embeddings Extractor"), ``infinite_id``:
c_id = Concat(M_clip(E_clip(FA(x))), M_face(E_face(FA(x)))): the last hidden states of
CLIP ViT-H (257 tokens) through the CLIP mapper, and the 512-d ArcFace embedding through
the face mapper, concatenated along the tokens. The paper names the mappers but not their
layers: here M_clip is a per-token MLP (LayerNorm, Linear, GELU, Linear) and M_face the
FaceID-style MLP to ``face_tokens`` tokens + LayerNorm. Infinite-ID takes one reference
photo; with several, the features are averaged over photos first.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

ARCHITECTURES = ("omni_id", "arcface", "arcface_clip", "infinite_id")
ARCFACE_MERGES = ("concat", "average")


@dataclass(frozen=True)
class EncoderConfig:
    architecture: str = "omni_id"
    clip_dim: int = 1280            # CLIP-H width
    tokens_per_image: int = 257     # 16 x 16 patches + class token at 224 px
    dim: int = 1280
    num_queries: int = 256
    num_heads: int = 20
    cross_depth: int = 4
    self_depth: int = 2
    mlp_ratio: float = 4.0
    id_dim: int = 512               # ArcFace embedding width (arcface, arcface_clip)
    id_hidden: int = 1024           # ArcFace projection MLP width
    face_tokens: int = 4            # infinite_id: tokens of the face mapper

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, not {self.architecture!r}")
        for f in fields(self):
            value = getattr(self, f.name)
            least = 0 if f.name == "self_depth" else 1
            if f.name != "architecture" and not (isinstance(value, (int, float)) and value >= least):
                raise ValueError(f"encoder config {f.name} must be >= {least}, not {value!r}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "EncoderConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown encoder config keys {unknown}")
        return cls(**data)


class Attention(nn.Module):
    """Multi-head attention with separate query and key/value inputs."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                key_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (B, Q, D), context (B, T, D), key_mask (B, T) True where a key is real."""
        b, q_len, dim = x.shape
        heads = self.num_heads

        def split(t):
            return t.view(b, -1, heads, dim // heads).transpose(1, 2)

        mask = None if key_mask is None else key_mask[:, None, None, :]
        out = F.scaled_dot_product_attention(split(self.to_q(x)), split(self.to_k(context)),
                                             split(self.to_v(context)), attn_mask=mask)
        return self.to_out(out.transpose(1, 2).reshape(b, q_len, dim))


class FeedForward(nn.Sequential):
    def __init__(self, dim: int, mlp_ratio: float):
        hidden = int(dim * mlp_ratio)
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class CrossAttentionBlock(nn.Module):
    """Pre-norm: queries attend to the image tokens, then an MLP."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm_q = nn.LayerNorm(dim)
        self.norm_kv = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_ratio)

    def forward(self, x, tokens, key_mask=None):
        x = x + self.attn(self.norm_q(x), self.norm_kv(tokens), key_mask)
        return x + self.mlp(self.norm_mlp(x))


class SelfAttentionBlock(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm_mlp = nn.LayerNorm(dim)
        self.mlp = FeedForward(dim, mlp_ratio)

    def forward(self, x):
        h = self.norm(x)
        x = x + self.attn(h, h)
        return x + self.mlp(self.norm_mlp(x))


class IdentityTransformer(nn.Module):
    """Queries cross-attend to projected image tokens, then self-attention refines them."""

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.proj_in = nn.Linear(config.clip_dim, config.dim)
        self.cross_blocks = nn.ModuleList(
            CrossAttentionBlock(config.dim, config.num_heads, config.mlp_ratio) for _ in range(config.cross_depth))
        self.self_blocks = nn.ModuleList(
            SelfAttentionBlock(config.dim, config.num_heads, config.mlp_ratio) for _ in range(config.self_depth))
        self.norm_out = nn.LayerNorm(config.dim)

    def forward(self, queries, tokens, key_mask=None):
        tokens = self.proj_in(tokens)
        x = queries
        for block in self.cross_blocks:
            x = block(x, tokens, key_mask)
        for block in self.self_blocks:
            x = block(x)
        return self.norm_out(x)


class ArcFaceProjection(nn.Module):
    """512-d ArcFace embedding -> (num_queries, dim) tokens: MLP, reshape, LayerNorm."""

    def __init__(self, config: EncoderConfig, num_queries: Optional[int] = None):
        super().__init__()
        self.num_queries, self.dim = num_queries or config.num_queries, config.dim
        self.mlp = nn.Sequential(nn.Linear(config.id_dim, config.id_hidden), nn.GELU(),
                                 nn.Linear(config.id_hidden, self.num_queries * config.dim))
        self.norm = nn.LayerNorm(config.dim)

    def forward(self, embedding: torch.Tensor) -> torch.Tensor:
        out = self.mlp(embedding).view(*embedding.shape[:-1], self.num_queries, self.dim)
        return self.norm(out)


def image_key_mask(counts: list[int], tokens_per_image: int, device=None) -> torch.Tensor:
    """(B, max(counts) * tokens_per_image) True for the tokens of real images."""
    longest = max(counts)
    index = torch.arange(longest * tokens_per_image, device=device)
    return index[None, :] < torch.tensor(counts, device=device)[:, None] * tokens_per_image


class IdentityEncoder(nn.Module):
    """One module for every architecture; ``forward`` takes what that architecture needs.

    ``clip_tokens`` (B, N, 257, C): CLIP penultimate tokens of up to N images per
    identity; ``counts`` gives the real number of images per identity (the rest is
    padding, masked out of the keys). ``arcface`` (B, N, 512), likewise padded.
    Returns (B, L, dim): L = num_queries, or N * num_queries for concatenated ArcFace.
    """

    def __init__(self, config: EncoderConfig):
        super().__init__()
        self.config = config
        if config.architecture == "omni_id":
            self.queries = nn.Parameter(torch.randn(config.num_queries, config.dim) * config.dim ** -0.5)
        if config.architecture in ("omni_id", "arcface_clip"):
            self.transformer = IdentityTransformer(config)
        if config.architecture in ("arcface", "arcface_clip"):
            self.arcface_proj = ArcFaceProjection(config)
        if config.architecture == "infinite_id":
            self.clip_mapper = nn.Sequential(nn.LayerNorm(config.clip_dim), nn.Linear(config.clip_dim, config.dim),
                                             nn.GELU(), nn.Linear(config.dim, config.dim))
            self.face_mapper = ArcFaceProjection(config, config.face_tokens)

    @property
    def needs_clip(self) -> bool:
        return self.config.architecture in ("omni_id", "arcface_clip", "infinite_id")

    @property
    def needs_arcface(self) -> bool:
        return self.config.architecture in ("arcface", "arcface_clip", "infinite_id")

    def forward(self, clip_tokens: Optional[torch.Tensor] = None, arcface: Optional[torch.Tensor] = None,
                counts: Optional[list[int]] = None, arcface_merge: str = "average") -> torch.Tensor:
        arch = self.config.architecture
        reference = clip_tokens if clip_tokens is not None else arcface
        if reference is None:
            raise ValueError(f"the {arch} encoder needs " + ("CLIP tokens" if self.needs_clip else "ArcFace embeddings"))
        batch, images = reference.shape[:2]
        counts = list(counts) if counts is not None else [images] * batch
        if len(counts) != batch or min(counts) < 1 or max(counts) > images:
            raise ValueError(f"counts {counts} do not fit a batch of {batch} identities with up to {images} images")

        if arch == "arcface":
            return self._arcface_tokens(arcface, counts, arcface_merge)
        if clip_tokens is None:
            raise ValueError(f"the {arch} encoder needs CLIP tokens")
        if clip_tokens.shape[-1] != self.config.clip_dim:
            layer = "last" if arch == "infinite_id" else "penultimate"
            raise ValueError(f"CLIP tokens are {clip_tokens.shape[-1]} wide; this encoder expects "
                             f"{self.config.clip_dim} (CLIP-H {layer}-layer features)")
        if arch == "infinite_id":
            clip = _masked_mean(clip_tokens.flatten(2), counts).reshape(batch, *clip_tokens.shape[2:])
            face = self.face_mapper(_masked_mean(self._check_arcface(arcface), counts))
            return torch.cat([self.clip_mapper(clip), face], dim=1)
        tokens = clip_tokens.reshape(batch, -1, clip_tokens.shape[-1])
        key_mask = None
        if min(counts) < images:
            key_mask = image_key_mask(counts, clip_tokens.shape[2], tokens.device)
        if arch == "omni_id":
            queries = self.queries.to(tokens.dtype).expand(batch, -1, -1)
        else:
            queries = self.arcface_proj(_masked_mean(self._check_arcface(arcface), counts))
        return self.transformer(queries, tokens, key_mask)

    def _check_arcface(self, arcface):
        if arcface is None:
            raise ValueError(f"the {self.config.architecture} encoder needs ArcFace embeddings")
        if arcface.shape[-1] != self.config.id_dim:
            raise ValueError(f"ArcFace embeddings are {arcface.shape[-1]} wide; this encoder expects "
                             f"{self.config.id_dim}")
        return arcface

    def _arcface_tokens(self, arcface, counts, merge):
        arcface = self._check_arcface(arcface)
        if merge == "average":
            return self.arcface_proj(_masked_mean(arcface, counts))
        if merge != "concat":
            raise ValueError(f"arcface_merge must be one of {ARCFACE_MERGES}, not {merge!r}")
        if len(set(counts)) != 1:
            raise ValueError("concatenated ArcFace tokens need the same number of images per identity")
        tokens = self.arcface_proj(arcface[:, :counts[0]])            # (B, N, Q, D)
        return tokens.reshape(tokens.shape[0], -1, tokens.shape[-1])


def _masked_mean(values: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Mean over the first counts[b] rows of values[b] (B, N, C) -> (B, C)."""
    valid = torch.arange(values.shape[1], device=values.device)[None, :] < torch.tensor(counts, device=values.device)[:, None]
    weights = valid.to(values.dtype)[..., None]
    return (values * weights).sum(1) / weights.sum(1)


def create_encoder(config: EncoderConfig, seed: Optional[int] = None) -> IdentityEncoder:
    """A randomly initialised encoder (the starting point of training); ``seed`` leaves the
    global random state as it was."""
    if seed is None:
        return IdentityEncoder(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return IdentityEncoder(config)
