"""Identity terms in FLUX blocks, for the three adapter attentions (see ``guidance.adapter``).

A FLUX block runs one joint attention over [text tokens; image tokens (; reference tokens)]
whose queries and keys are rotated by the rotary embedding ``pe``. The host hands over that
call's rotated queries ``q`` (B, heads, L, D), its output ``out`` (B, L, heads * D), the text
length, the latent size and ``pe`` (B or 1, 1, L, D / 2, 2, 2: one 2 x 2 rotation per pair of
channels, as ComfyUI's and BFL's FLUX build it). The authors' processors query the identity
with the queries before the rotation; the rotation is orthogonal, so they are recovered
exactly (to round-off) by rotating back with the transposed matrices.

- ``decoupled``: Attn(q_rotated, K_id, V_id) added to the image tokens' attention output;
- ``xlabs`` (double blocks): Attn(q_plain, K_id, V_id) of the image tokens, returned as a
  residual that the host adds to the image stream after the block;
- ``instantx``: Attn(q_plain, K_id, V_id) (K_id and V_id already RMS-normalised per head)
  added to the attention output: of the image tokens in double blocks, of every token in
  single blocks. With a mask, tokens that are not the generated image's take no identity.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

from .decoupled import AttentionFn, LayerInjection, add_identity_to_joint_attention

BLOCK_KINDS = ("double", "single")


def rotate(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """FLUX's rotary embedding: (B, H, L, D) -> each channel pair multiplied by its 2 x 2 matrix."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    return (pe[..., 0] * pairs[..., 0] + pe[..., 1] * pairs[..., 1]).reshape(x.shape).to(x.dtype)


def unrotate(x: torch.Tensor, pe: Optional[torch.Tensor]) -> torch.Tensor:
    """The inverse of ``rotate``: each channel pair multiplied by the transposed matrix."""
    if pe is None:
        return x
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    pe = pe.float()
    return (pe[..., 0, :] * pairs[..., 0:1] + pe[..., 1, :] * pairs[..., 1:2]).reshape(x.shape).to(x.dtype)


def image_token_count(total: int, txt_len: int, latent_hw: Optional[tuple[int, int]], patch_size: int = 2) -> int:
    """How many tokens after the text belong to the generated image (reference tokens follow them)."""
    count = total - txt_len
    if latent_hw is not None:
        count = min(count, -(-latent_hw[0] // patch_size) * -(-latent_hw[1] // patch_size))
    return count


def _tokens(q: torch.Tensor) -> torch.Tensor:
    b, heads, length, d = q.shape
    return q.transpose(1, 2).reshape(b, length, heads * d)


def _plain_queries(q: torch.Tensor, pe: Optional[torch.Tensor], start: int, stop: int) -> torch.Tensor:
    part_pe = None if pe is None else pe[:, :, start:stop]
    return _tokens(unrotate(q[:, :, start:stop], part_pe))


def identity_terms(out: torch.Tensor, q: torch.Tensor, pe: Optional[torch.Tensor], txt_len: int, kind: str,
                   injections: Sequence[LayerInjection], attention: AttentionFn, cond_or_uncond: Sequence[int],
                   latent_hw: Optional[tuple[int, int]], sigmas: Optional[torch.Tensor] = None,
                   patch_size: int = 2) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(attention output with the identity terms added, residual for the image stream or None).

    ``kind`` is the block's (``double`` or ``single``); ``q`` and ``pe`` cover every token of the
    joint attention. The residual (B, image tokens, heads * D) is what XLabs' adapters add to the
    image stream at the end of a double block. ``patch_size``: latent pixels per image token along a
    side (2 on FLUX.1, Chroma and Qwen-Image, 1 on FLUX.2, whose latent is already patchified).
    """
    if kind not in BLOCK_KINDS:
        raise ValueError(f"block kind must be one of {BLOCK_KINDS}, not {kind!r}")
    heads = q.shape[1]
    count = image_token_count(q.shape[2], txt_len, latent_hw, patch_size)
    branches = max(1, len(cond_or_uncond or ()))
    residual = None
    for injection in injections:
        if not injection.active(sigmas):
            continue
        if injection.style == "decoupled":
            out = add_identity_to_joint_attention(out, q, txt_len, injection, attention, cond_or_uncond, latent_hw,
                                                  patch_size)
        elif injection.style == "xlabs":
            if kind != "double":
                continue
            term = injection.attend(_plain_queries(q, pe, txt_len, txt_len + count), heads, attention, cond_or_uncond)
            term = injection.finish(term, injection.spatial_weights(count, latent_hw, term.shape[0], branches, term))
            residual = term if residual is None else residual + term
        elif injection.style == "instantx":
            start, stop = (txt_len, txt_len + count) if kind == "double" else (0, q.shape[2])
            term = injection.attend(_plain_queries(q, pe, start, stop), heads, attention, cond_or_uncond)
            weights = injection.spatial_weights(count, latent_hw, term.shape[0], branches, term)
            if weights is not None and kind == "single":     # the mask covers the generated image's tokens only
                full = weights.new_zeros(weights.shape[0], stop, 1)
                full[:, txt_len:txt_len + count] = weights
                weights = full
            term = injection.finish(term, weights).to(out.dtype)
            out = torch.cat([out[:, :start], out[:, start:stop] + term, out[:, stop:]], dim=1)
        else:
            raise ValueError(f"unknown adapter attention {injection.style!r}")
    return out, residual
