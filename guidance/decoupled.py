"""Decoupled identity attention (IP-Adapter style), as data-driven attention patches.

    out = Attn(q, K_text, V_text) + sum_a  w_a(block, sigma) * m_a * Attn(q, K_id_a, V_id_a)

K_id, V_id are per-layer linear projections of an identity's tokens, computed once
when an adapter is applied (for the conditional and the unconditional branch of
CFG). ``w`` is the adapter weight times a per-block multiplier, and is zero outside
the adapter's sigma window; ``m`` is an optional spatial mask resized to the layer's
token grid. Terms with zero weight are skipped, so weight 0 or a sigma outside the
window reproduces the unpatched attention exactly.

A host (ComfyUI, diffusers) supplies the attention function with ComfyUI's
``optimized_attention`` signature ``attention(q, k, v, heads, **kwargs)`` on
(B, N, heads * dim) tensors, and calls ``DecoupledAttention`` with the layer's
projected q, k, v and its ``extra`` options (``n_heads``, ``sigmas``,
``cond_or_uncond``, ``original_shape``, ...).

``weight_mode``: ``output`` scales the identity term (h94's and diffusers' IP-Adapter scale;
IPAdapter_plus's "V only", the default of its ``embeds_scaling`` on every apply node); ``kv``
scales the identity keys and values instead (IPAdapter_plus's "K+V", an option there, never its
default), which also sharpens the attention for weights above 1. IPAdapter_plus's two "w/ C
penalty" scalings are ``PENALTY_MODES`` (see ``LayerInjection``), used by its compatible apply.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F

from .ipadapter_plus import scaled_kv

AttentionFn = Callable[..., torch.Tensor]
COND, UNCOND = 0, 1
WEIGHT_MODES = ("output", "kv")
PENALTY_MODES = ("kv_penalty", "k_mean_v_penalty")   # IPAdapter_plus's "K+V w/ C penalty", "K+mean(V) w/ C penalty"


def sdpa_attention(q, k, v, heads, mask=None, **_):
    """Reference attention with ComfyUI's signature: (B, N, H*D) in and out."""
    b, _, inner = q.shape
    d = inner // heads
    split = [t.view(t.shape[0], -1, heads, d).transpose(1, 2) for t in (q, k, v)]
    out = F.scaled_dot_product_attention(*split, attn_mask=mask)
    return out.transpose(1, 2).reshape(b, -1, inner)


# ----------------------------------------------------------------------------- masks
def token_grid(num_tokens: int, height: int, width: int) -> tuple[int, int]:
    """The (h, w) grid of a layer with ``num_tokens`` tokens for a latent of height x width.

    Downsampling by 2 with padding rounds up, so the grid is ceil(H / f) x ceil(W / f)
    for the power of two f that gives ``num_tokens``.
    """
    factor = 1
    while factor <= max(height, width) * 2:
        h, w = -(-height // factor), -(-width // factor)
        if h * w == num_tokens:
            return h, w
        factor *= 2
    ratio = math.sqrt(height * width / num_tokens)
    raise ValueError(f"cannot place {num_tokens} tokens on a {height} x {width} latent (ratio {ratio:.2f})")


def mask_for_layer(mask: torch.Tensor, num_tokens: int, latent_hw: tuple[int, int]) -> torch.Tensor:
    """(B or 1, H, W) mask -> (B or 1, num_tokens, 1) weights on the layer's token grid."""
    h, w = token_grid(num_tokens, *latent_hw)
    resized = F.interpolate(mask[:, None].float(), size=(h, w), mode="bilinear", align_corners=False)
    return resized.reshape(mask.shape[0], h * w, 1)


# ----------------------------------------------------------------------------- block weights
BLOCK_GROUPS = ("input", "middle", "output", "double", "single")


@dataclass(frozen=True)
class BlockWeights:
    """Per-block multipliers as data, from a spec like ``"all=1, input=0.5, output.4=0"``.

    Selectors: ``all``; a group (``input``, ``middle``, ``output`` for UNets, ``double``,
    ``single`` for FLUX); or ``group.N`` for one block. Later rules win.
    """
    rules: tuple[tuple[str, Optional[int], float], ...] = (("all", None, 1.0),)

    @classmethod
    def parse(cls, spec: str) -> "BlockWeights":
        rules = []
        for part in filter(None, (p.strip() for p in (spec or "").replace(";", ",").split(","))):
            match = re.fullmatch(r"(all|input|middle|output|double|single)(?:\.(\d+))?\s*=\s*([-+0-9.eE]+)", part)
            if not match:
                raise ValueError(f"block weight {part!r} is not 'selector=weight' with selector all, "
                                 f"{', '.join(BLOCK_GROUPS)} or group.N (e.g. 'input=0.5, output.4=1')")
            group, index = match.group(1), match.group(2)
            try:
                weight = float(match.group(3))
            except ValueError:
                raise ValueError(f"block weight {part!r}: {match.group(3)!r} is not a number") from None
            if not math.isfinite(weight) or abs(weight) > 100:
                raise ValueError(f"block weight {part!r}: the weight must be a finite number from -100 to 100")
            if group == "all" and index is not None:
                raise ValueError(f"'all' takes no block number: {part!r}")
            rules.append((group, int(index) if index is not None else None, weight))
        return cls(tuple(rules) if rules else cls.rules)

    def weight(self, group: str, index: int) -> float:
        value = 1.0
        for rule_group, rule_index, rule_weight in self.rules:
            if rule_group == "all" or (rule_group == group and rule_index in (None, index)):
                value = rule_weight
        return value


# ----------------------------------------------------------------------------- injections
@dataclass
class LayerInjection:
    """One adapter's identity keys/values at one attention layer, and when to use them."""
    keys: dict[int, torch.Tensor]          # COND / UNCOND -> (L, inner)
    values: dict[int, torch.Tensor]
    weight: float
    sigma_start: float = math.inf          # active while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0
    mask: Optional[torch.Tensor] = None    # (B or 1, H, W) over the latent
    weight_mode: str = "output"            # "output": w * Attn(q, K, V); "kv": Attn(q, w K, w V); PENALTY_MODES
    style: str = "decoupled"               # FLUX hosts: the adapter's attention (see guidance.adapter)
    tokens_per_image: int = 0              # "k_mean_v_penalty": the values' mean is taken per photo
    _cast: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        if self.weight_mode not in WEIGHT_MODES + PENALTY_MODES:
            raise ValueError(f"weight_mode must be one of {WEIGHT_MODES + PENALTY_MODES}, not {self.weight_mode!r}")

    def active(self, sigmas: Optional[torch.Tensor]) -> bool:
        if self.weight == 0.0:
            return False
        if sigmas is None:
            return True
        sigma = float(sigmas.reshape(-1)[0])
        return self.sigma_end <= sigma <= self.sigma_start

    def kv(self, branch: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Outside inference mode (a guider's tracked pass) autograd may save K/V for the
        # backward, which inference tensors (made while a ComfyUI graph ran) cannot be.
        tracked = not torch.is_inference_mode_enabled()
        key = (branch, like.device, like.dtype, tracked)
        if key not in self._cast:
            pair = (self.keys[branch].to(like.device, like.dtype), self.values[branch].to(like.device, like.dtype))
            if self.weight_mode != "output":
                pair = scaled_kv(*pair, self.weight_mode, self.weight, self.tokens_per_image)
            if tracked:
                pair = tuple(t.clone() if t.is_inference() else t for t in pair)
            self._cast[key] = pair
        return self._cast[key]

    def to(self, device) -> "LayerInjection":
        moved = {b: t.to(device) for b, t in self.keys.items()}, {b: t.to(device) for b, t in self.values.items()}
        return LayerInjection(moved[0], moved[1], self.weight, self.sigma_start, self.sigma_end,
                              None if self.mask is None else self.mask.to(device), self.weight_mode, self.style,
                              self.tokens_per_image)

    def attend(self, q: torch.Tensor, heads: int, attention: AttentionFn,
               cond_or_uncond: Sequence[int]) -> torch.Tensor:
        """Attn(q, K_id, V_id) (keys and values scaled in ``kv`` mode) for a batch laid out as
        chunks of ``cond_or_uncond``."""
        chunks = q.chunk(len(cond_or_uncond)) if cond_or_uncond else (q,)
        branches = cond_or_uncond if cond_or_uncond else (COND,)
        outs = []
        for chunk, branch in zip(chunks, branches):
            k, v = self.kv(UNCOND if branch == UNCOND else COND, chunk)
            b = chunk.shape[0]
            outs.append(attention(chunk, k.expand(b, -1, -1), v.expand(b, -1, -1), heads))
        return torch.cat(outs)

    def spatial_weights(self, num_tokens: int, latent_hw: Optional[tuple[int, int]], batch: int,
                        branches: int, like: torch.Tensor) -> Optional[torch.Tensor]:
        """(batch or 1, num_tokens, 1) mask weights on a layer's token grid, or None without a mask."""
        if self.mask is None:
            return None
        if latent_hw is None:
            raise ValueError("a spatial mask needs the latent's shape from the host")
        weights = mask_for_layer(self.mask, num_tokens, latent_hw).to(like.device, like.dtype)
        if weights.shape[0] != 1:
            per_chunk = batch // branches
            if weights.shape[0] != per_chunk:
                raise ValueError(f"the mask batch ({weights.shape[0]}) must be 1 or the image batch ({per_chunk})")
            weights = weights.repeat(branches, 1, 1)
        return weights

    def finish(self, out: torch.Tensor, weights: Optional[torch.Tensor]) -> torch.Tensor:
        """The attention term times the mask weights and (in ``output`` mode) the weight."""
        if weights is not None:
            out = out * weights
        return out * self.weight if self.weight_mode == "output" else out

    def contribution(self, q: torch.Tensor, heads: int, attention: AttentionFn,
                     cond_or_uncond: Sequence[int], latent_hw: Optional[tuple[int, int]]) -> torch.Tensor:
        """w * m * Attn(q, K_id, V_id) for a batch laid out as chunks of ``cond_or_uncond``."""
        out = self.attend(q, heads, attention, cond_or_uncond)
        weights = self.spatial_weights(q.shape[1], latent_hw, out.shape[0], max(1, len(cond_or_uncond or ())), out)
        return self.finish(out, weights)



def layer_injections(adapter, layers, tokens: dict, weight: float, sigma_start: float, sigma_end: float,
                     mask: Optional[torch.Tensor] = None, blocks: BlockWeights = BlockWeights(),
                     inject: str = "both", weight_mode: str = "output", flux: bool = False):
    """(layer, LayerInjection) for each layer the identity reaches, for either host to register:
    on FLUX only the ``inject`` group when it names one, and no layer whose block weight is 0."""
    for index, layer in enumerate(layers):
        if flux and inject != "both" and layer.group != inject:
            continue
        layer_weight = weight * blocks.weight(layer.group, layer.number)
        if layer_weight == 0.0:
            continue
        keys, values = adapter.layer_kv(index, tokens, layer.heads)
        yield layer, LayerInjection(keys, values, layer_weight, sigma_start, sigma_end, mask, weight_mode,
                                    adapter.config.attention)


class ReplacePatch:
    """Base of the pack's attention replace patches: ``patch(q, k, v, extra)``, as ComfyUI calls
    attn1/attn2 replace patches; arguments a later ComfyUI adds are accepted and passed on.

    ``attention`` is the host's attention function; ``base`` a replace patch another pack
    installed at the same layer before us, kept underneath so both apply.
    """

    def __init__(self, attention: AttentionFn, base: Optional[Callable] = None):
        self.attention = attention
        self.base = base

    def base_attention(self, q, k, v, extra: dict, *args, **kwargs) -> torch.Tensor:
        """What this layer computes without us: the earlier patch (given any extra arguments a later
        ComfyUI passes to patches), or plain attention."""
        if self.base is not None:
            return self.base(q, k, v, extra, *args, **kwargs)
        return self.attention(q, k, v, extra["n_heads"], attn_precision=extra.get("attn_precision"),
                              transformer_options=extra)


class DecoupledAttention(ReplacePatch):
    """A cross-attention replacement: the text attention plus every stacked identity term."""

    def __init__(self, attention: AttentionFn, injections: Sequence[LayerInjection] = (),
                 base: Optional[Callable] = None):
        super().__init__(attention, base)
        self.injections = tuple(injections)

    def with_injection(self, injection: LayerInjection) -> "DecoupledAttention":
        return DecoupledAttention(self.attention, (*self.injections, injection), self.base)

    def __deepcopy__(self, memo) -> "DecoupledAttention":
        # injections are immutable data: ModelPatcher.clone() must not copy their tensors
        return DecoupledAttention(self.attention, self.injections, self.base)

    def to(self, device) -> "DecoupledAttention":
        base = self.base.to(device) if hasattr(self.base, "to") else self.base
        return DecoupledAttention(self.attention, [i.to(device) for i in self.injections], base)

    def __call__(self, q, k, v, extra: dict, *args, **kwargs) -> torch.Tensor:
        out = self.base_attention(q, k, v, extra, *args, **kwargs)
        sigmas = extra.get("sigmas")
        shape = extra.get("original_shape")
        latent_hw = tuple(shape[-2:]) if shape is not None and len(shape) >= 4 else None
        cond_or_uncond = extra.get("cond_or_uncond") or ()
        for injection in self.injections:
            if injection.active(sigmas):
                out = out + injection.contribution(q, extra["n_heads"], self.attention, cond_or_uncond, latent_hw)
        return out


class IdentityOnlyAttention(DecoupledAttention):
    """Cross-attention that is the identity term alone (text attention off)."""

    def __call__(self, q, k, v, extra: dict, *args, **kwargs) -> torch.Tensor:
        cond_or_uncond = extra.get("cond_or_uncond") or ()
        out = None
        for injection in self.injections:
            term = injection.contribution(q, extra["n_heads"], self.attention, cond_or_uncond, None)
            out = term if out is None else out + term
        return out


def add_identity_to_joint_attention(out: torch.Tensor, q: torch.Tensor, txt_len: int, injection: LayerInjection,
                                    attention: AttentionFn, cond_or_uncond: Sequence[int],
                                    latent_hw: Optional[tuple[int, int]], patch_size: int = 2) -> torch.Tensor:
    """FLUX-style joint attention: add the identity term to the image tokens' output.

    ``q`` (B, heads, L, D) is the joint query (text tokens first, as FLUX orders them),
    ``out`` (B, L, heads * D) the joint attention output. With the latent's size known,
    only the generated image's tokens (ceil(H/p) x ceil(W/p)) take the identity;
    reference-image tokens appended after them (Kontext) do not.
    """
    b, heads, _, d = q.shape
    image_q = q[:, :, txt_len:].transpose(1, 2).reshape(b, -1, heads * d)
    count = image_q.shape[1]
    if latent_hw is not None:
        count = min(count, -(-latent_hw[0] // patch_size) * -(-latent_hw[1] // patch_size))
    term = injection.contribution(image_q[:, :count], heads, attention, cond_or_uncond, latent_hw)
    return torch.cat([out[:, :txt_len], out[:, txt_len:txt_len + count] + term.to(out.dtype),
                      out[:, txt_len + count:]], dim=1)
