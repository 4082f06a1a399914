"""IDENTITY_EMBEDS: what the encoders produce, and how it is combined, saved and loaded.

An identity is a set of named tensors plus a little provenance:
- ``tokens`` (L, D): a representation an adapter's decoupled attention reads directly
  (Omni-ID: 256 x 1280; projected baselines; Infinite-ID's c_id: 257 + face tokens);
- ``clip`` (N, 257, C): CLIP penultimate tokens, one block per photo (the CLIP
  baseline; the adapter concatenates them, or its own projection reads them);
- ``arcface`` (N, 512): ArcFace embeddings, one row per photo;
- ``clip_uncond`` (1, 257, C): CLIP tokens of the unconditional image, the unconditional
  input of IP-Adapter projections (stored by the encode nodes next to ``clip``);
- ``pooled`` (N, P): the image encoder's pooled embedding per photo (CLIP's projected image
  embedding, SigLIP's attention-pooled output), read by h94's base and the FLUX IP-Adapters;
- ``pooled_uncond`` (1, P): its unconditional counterpart.
``info["image_encoder"]`` names the image encoder the CLIP parts came from, for error messages.
Files are safetensors (never pickle) with a JSON header under ``omni_identity``.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from .checkpoint import METADATA_KEY, CheckpointError, atomic_save, read_info, read_safetensors

EMBEDS_FORMAT = "omni_identity.embeds"
EMBEDS_VERSION = 1
KINDS = ("omni_id", "clip", "arcface", "arcface_clip", "infinite_id")
PARTS = ("tokens", "clip", "arcface", "clip_uncond", "pooled", "pooled_uncond")
COMBINE_MODES = ("concat", "average")


@dataclass
class IdentityEmbeds:
    kind: str
    tensors: dict[str, torch.Tensor]
    info: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"embeds kind must be one of {KINDS}, not {self.kind!r}")
        unknown = set(self.tensors) - set(PARTS)
        if unknown or not self.tensors:
            raise ValueError(f"embeds parts must be among {PARTS}, got {sorted(self.tensors)}")
        for name, tensor in self.tensors.items():
            expected = 3 if name in ("clip", "clip_uncond") else 2
            if tensor.ndim != expected:
                raise ValueError(f"embeds part {name!r} must have {expected} dimensions, has shape {tuple(tensor.shape)}")

    @property
    def num_images(self) -> int:
        return int(self.info.get("num_images", 0))

    def describe(self) -> str:
        parts = ", ".join(f"{k} {tuple(v.shape)}" for k, v in self.tensors.items())
        encoder = self.info.get("image_encoder")
        return (f"{self.kind} identity from {self.num_images} photo(s): {parts}"
                + (f" (image encoder: {encoder})" if encoder else ""))


def save_embeds(embeds: IdentityEmbeds, path: str) -> None:
    header = {"format": EMBEDS_FORMAT, "version": EMBEDS_VERSION, "kind": embeds.kind, "info": embeds.info}
    atomic_save(embeds.tensors, path, {METADATA_KEY: json.dumps(header, default=str)})


def load_embeds(path: str) -> IdentityEmbeds:
    metadata, tensors = read_safetensors(path, "embeds")
    header = read_info(path, metadata, list(tensors), "embeds file", EMBEDS_FORMAT)
    try:
        return IdentityEmbeds(kind=header.get("kind"), tensors=tensors, info=header.get("info", {}))
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc


def combine_embeds(items: list[IdentityEmbeds], mode: str = "concat",
                   weights: list[float] | None = None) -> IdentityEmbeds:
    """Merge identities of one kind.

    concat: every part is concatenated (tokens along L, photos along N).
    average: a weighted mean; ``tokens`` must share a shape; ``clip`` and ``arcface``
    are averaged over all photos of all inputs (one row / block left).
    """
    if not items:
        raise ValueError("nothing to combine")
    if mode not in COMBINE_MODES:
        raise ValueError(f"combine mode must be one of {COMBINE_MODES}, not {mode!r}")
    kinds = {e.kind for e in items}
    if len(kinds) != 1:
        raise ValueError(f"cannot combine different kinds of embeds: {sorted(kinds)}")
    parts = [set(e.tensors) for e in items]
    if any(p != parts[0] for p in parts):
        raise ValueError(f"cannot combine embeds with different parts: {[sorted(p) for p in parts]}")
    weights = list(weights) if weights is not None else [1.0] * len(items)
    if len(weights) != len(items) or sum(weights) <= 0 or min(weights) < 0:
        raise ValueError(f"weights {weights} must be {len(items)} non-negative numbers with a positive sum")
    combined = {}
    for name in sorted(parts[0]):
        tensors = [e.tensors[name] for e in items]
        if mode == "concat":
            combined[name] = torch.cat(tensors, 0)
        elif name == "tokens":
            shapes = {tuple(t.shape) for t in tensors}
            if len(shapes) != 1:
                raise ValueError(f"averaging needs equal token shapes, got {sorted(shapes)}")
            total = sum(weights)
            combined[name] = sum(w * t.float() for w, t in zip(weights, tensors)).div(total).to(tensors[0].dtype)
        else:
            rows = torch.cat([t.float() * w for t, w in zip(tensors, weights)], 0).sum(0, keepdim=True)
            count = sum(w * t.shape[0] for t, w in zip(tensors, weights))
            combined[name] = (rows / count).to(tensors[0].dtype)
    info = {"num_images": sum(e.num_images for e in items), "combined": mode,
            "weights": weights, "sources": [e.info for e in items]}
    return IdentityEmbeds(items[0].kind, combined, info)
