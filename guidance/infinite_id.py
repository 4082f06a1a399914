"""Infinite-ID at inference (ECCV 2024): mixed attention, cross-attention merging, AdaIN-mean.

Two streams denoise side by side in one batched model call: the identity stream (the
model with the identity adapter) and the text stream (the base model with the prompt
only), both on the current latent. Per layer:

- mixed attention (self-attention of the identity stream):
  Attn(q_id, [K_id; K_text], [V_id; V_text]) with K_text, V_text the text stream's
  self-attention keys and values at the same layer and CFG branch;
- cross-attention merging: the identity stream's text cross-attention output plus its
  image (identity) cross-attention output;
- AdaIN-mean: the identity stream's queries and keys take the per-channel mean over
  tokens of the text stream's (not its variance), with a strength, in mixed attention
  and in cross-attention. Plain AdaIN (mean and variance) is kept as an ablation.

The batch holds the identity stream first (all rows) and then the text stream's rows;
the host builds it before the model and keeps the identity rows of the output. When the
identity's unconditional tokens are zero (Omni-ID adapters), the identity stream's
unconditional branch provably equals the text stream's (zero identity keys/values add
exactly nothing, and mixing attention with an identical copy of itself changes nothing),
so the text stream then carries the conditional rows only and the unconditional identity
rows use plain self-attention: the same result for three quarters of the work.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch

from .decoupled import AttentionFn, LayerInjection, ReplacePatch

ADAIN_MODES = ("adain_mean", "adain")
STREAMS_KEY = "omni_identity_streams"      # transformer_options: rows of the identity stream
STYLE_KEY = "omni_identity_adain"          # transformer_options: AdaIN settings


@dataclass(frozen=True)
class AdaINSettings:
    strength: float = 0.0
    mode: str = "adain_mean"

    def __post_init__(self):
        if self.mode not in ADAIN_MODES:
            raise ValueError(f"AdaIN mode must be one of {ADAIN_MODES}, not {self.mode!r}")

    @property
    def active(self) -> bool:
        return self.strength != 0.0


def adain_mean(x: torch.Tensor, target: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
    """Move x's per-channel mean over tokens (dim 1) toward target's; the spread is untouched."""
    shift = target.mean(dim=1, keepdim=True) - x.mean(dim=1, keepdim=True)
    return x + strength * shift


def adain(x: torch.Tensor, target: torch.Tensor, strength: float = 1.0, eps: float = 1e-5) -> torch.Tensor:
    """Plain AdaIN over tokens: x takes target's per-channel mean and standard deviation."""
    mu_x, mu_t = x.mean(dim=1, keepdim=True), target.mean(dim=1, keepdim=True)
    std_x = x.var(dim=1, keepdim=True, unbiased=False).add(eps).sqrt()
    std_t = target.var(dim=1, keepdim=True, unbiased=False).add(eps).sqrt()
    styled = (x - mu_x) / std_x * std_t + mu_t
    return x + strength * (styled - x)


def align(x: torch.Tensor, target: torch.Tensor, settings: Optional[AdaINSettings]) -> torch.Tensor:
    if settings is None or not settings.active:
        return x
    fn = adain_mean if settings.mode == "adain_mean" else adain
    return fn(x, target, settings.strength)


def mixed_attention(q_id, k_id, v_id, k_text, v_text, heads: int, attention: AttentionFn,
                    q_text: Optional[torch.Tensor] = None, settings: Optional[AdaINSettings] = None,
                    **attention_kwargs) -> torch.Tensor:
    """Attn(q_id, [K_id; K_text], [V_id; V_text]); without the text stream, plain self-attention."""
    if k_text is None:
        return attention(q_id, k_id, v_id, heads, **attention_kwargs)
    if settings is not None and settings.active and q_text is not None:
        q_id, k_id = align(q_id, q_text, settings), align(k_id, k_text, settings)
    return attention(q_id, torch.cat([k_id, k_text], dim=1), torch.cat([v_id, v_text], dim=1), heads,
                     **attention_kwargs)


@dataclass(frozen=True)
class StreamLayout:
    """Rows of a two-stream batch: ``identity`` rows first, then one text row for each of
    ``text_rows`` (indices into the identity rows)."""
    identity: int
    text_rows: tuple[int, ...]

    def matches(self, batch: int) -> bool:
        return batch == self.identity + len(self.text_rows)

    @property
    def aligned(self) -> bool:
        """Every identity row has its text row at the same offset (identity row i pairs with row
        identity + i): the streams are then the two halves of the batch, views with no copy."""
        return self.text_rows == tuple(range(self.identity))


def _layout(extra: dict, batch: int) -> Optional[StreamLayout]:
    layout = extra.get(STREAMS_KEY)
    return layout if isinstance(layout, StreamLayout) and layout.matches(batch) else None


def _split(t: torch.Tensor, layout: StreamLayout):
    """(identity rows with a text partner, identity rows without, text rows)."""
    if layout.aligned:
        return t[:layout.identity], None, t[layout.identity:], list(layout.text_rows), []
    paired = list(layout.text_rows)
    alone = [i for i in range(layout.identity) if i not in set(paired)]
    return t[paired], (t[alone] if alone else None), t[layout.identity:], paired, alone


def _merge(paired_out, alone_out, paired, alone, identity: int) -> torch.Tensor:
    if not alone:
        return paired_out if paired == list(range(identity)) else paired_out[torch.argsort(torch.tensor(paired))]
    out = paired_out.new_empty((identity, *paired_out.shape[1:]))
    out[paired] = paired_out
    out[alone] = alone_out
    return out


class MixedSelfAttention(ReplacePatch):
    """attn1 replacement: mixed attention for the identity rows, plain for the text rows."""

    def __deepcopy__(self, memo):
        return MixedSelfAttention(self.attention, self.base)

    def __call__(self, q, k, v, extra: dict, *args, **kwargs) -> torch.Tensor:
        layout = _layout(extra, q.shape[0])
        if layout is None or not layout.text_rows:
            return self.base_attention(q, k, v, extra, *args, **kwargs)
        q_p, q_a, q_t, paired, alone = _split(q, layout)
        k_p, k_a, k_t, _, _ = _split(k, layout)
        v_p, v_a, v_t, _, _ = _split(v, layout)
        text = self.base_attention(q_t, k_t, v_t, extra, *args, **kwargs)
        mixed = mixed_attention(q_p, k_p, v_p, k_t, v_t, extra["n_heads"], self.attention, q_text=q_t,
                                settings=extra.get(STYLE_KEY), attn_precision=extra.get("attn_precision"))
        own = self.base_attention(q_a, k_a, v_a, extra, *args, **kwargs) if alone else None
        return torch.cat([_merge(mixed, own, paired, alone, layout.identity), text])


class StreamCrossAttention(ReplacePatch):
    """attn2 replacement: text attention for both streams; the identity rows also get the
    identity terms (cross-attention merging), their queries AdaIN-aligned to the text rows'."""

    def __init__(self, attention: AttentionFn, injections: Sequence[LayerInjection], base: Optional[Callable] = None):
        super().__init__(attention, base)
        self.injections = tuple(injections)

    def __deepcopy__(self, memo):
        return StreamCrossAttention(self.attention, self.injections, self.base)

    def to(self, device):
        return StreamCrossAttention(self.attention, [i.to(device) for i in self.injections], self.base)

    def __call__(self, q, k, v, extra: dict, *args, **kwargs) -> torch.Tensor:
        layout = _layout(extra, q.shape[0])
        if layout is None:
            return self.base_attention(q, k, v, extra, *args, **kwargs)
        paired = list(layout.text_rows)
        q_id = q[:layout.identity]
        settings = extra.get(STYLE_KEY)
        if paired and settings is not None and settings.active:
            if layout.aligned:
                q_id = align(q_id, q[layout.identity:], settings)
            else:
                q_id = q_id.clone()
                q_id[paired] = align(q_id[paired], q[layout.identity:], settings)
        identity = self.base_attention(q_id, k[:layout.identity], v[:layout.identity], extra, *args, **kwargs)
        shape = extra.get("original_shape")
        latent_hw = tuple(shape[-2:]) if shape is not None and len(shape) >= 4 else None
        branches = list(extra.get("cond_or_uncond") or ())
        for injection in self.injections:
            if injection.active(extra.get("sigmas")):
                identity = identity + injection.contribution(q_id, extra["n_heads"], self.attention, branches,
                                                             latent_hw)
        if not paired:
            return identity
        rows = slice(layout.identity, None)
        text = self.base_attention(q[rows], k[rows], v[rows], extra, *args, **kwargs)
        return torch.cat([identity, text])
