"""The one attention override through which the pack reads ComfyUI's attention maps."""
from __future__ import annotations

from ..guidance.attention_capture import AttentionMaps

OVERRIDE_KEY = "optimized_attention_override"


class AttentionRecording:
    """``optimized_attention_override``: runs the attention as it would have run (through any
    override already installed), and shows its queries and keys to an ``AttentionMaps``."""

    def __init__(self, maps: AttentionMaps, previous=None):
        self.maps, self.previous = maps, previous

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        out = (self.previous(func, q, k, v, heads, *args, **kwargs) if self.previous is not None
               else func(q, k, v, heads, *args, **kwargs))
        if not kwargs.get("skip_reshape"):
            self.maps.record(q, k, heads)
        return out


def record_attention(transformer_options: dict, maps: AttentionMaps) -> dict:
    """A copy of ``transformer_options`` whose attention calls feed ``maps``."""
    return {**transformer_options, OVERRIDE_KEY: AttentionRecording(maps, transformer_options.get(OVERRIDE_KEY))}


def heads_first(q, k, heads: int, skip_reshape: bool):
    """(q, k) as (B, heads, L, d) from an attention call's inputs, or None for a call of another shape. Releases
    differ: FLUX's blocks pass them so (``skip_reshape``); ComfyUI 0.3.64's Qwen-Image passes (B, L, heads * d)."""
    if skip_reshape:
        return (q, k) if q.ndim == 4 else None
    if q.ndim != 3 or k.ndim != 3 or q.shape[-1] % heads:
        return None
    return tuple(t.unflatten(-1, (heads, -1)).transpose(1, 2) for t in (q, k))
