"""diffusers attention processors that run the core's identity attention.

The processors only adapt diffusers' calling convention to the core's: they compute the
layer's projections as diffusers' own processors do, then hand (q, k, v) to
``guidance.decoupled.DecoupledAttention`` (UNet cross-attention) or the joint attention's
output and rotated queries to ``guidance.flux_identity.identity_terms`` (FLUX), the same
functions ComfyUI's patches call. What ComfyUI gives its patches in ``transformer_options``
(sigmas, the cond/uncond layout of the batch, the latent's shape, FLUX's text length) comes
from a ``CallState`` shared by the processors of one model (see ``identity.identity_call``).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch

from ..guidance.decoupled import DecoupledAttention, sdpa_attention
from ..guidance.flux_identity import identity_terms


@dataclass
class CallState:
    """What the current model call tells the identity terms (ComfyUI's transformer_options)."""
    sigmas: Optional[torch.Tensor] = None      # None: every sigma window is open
    cond_or_uncond: tuple = ()                 # the batch's chunks: 0 cond, 1 uncond; () one cond chunk
    latent_shape: Optional[tuple] = None       # (B, C, H, W) of the latent (masks, FLUX image tokens)
    txt_len: Optional[int] = None              # FLUX: text tokens in front of the image tokens
    residuals: dict = field(default_factory=dict)   # FLUX XLabs: block -> term for the image stream
    maps: Optional[object] = None              # a guidance.attention_capture.AttentionMaps fed by attn2
    patch_size: int = 2                        # DiTs: latent pixels per image token along a side (FLUX.2: 1)

    def extra(self, heads: int) -> dict:
        return {"n_heads": heads, "sigmas": self.sigmas, "cond_or_uncond": list(self.cond_or_uncond),
                "original_shape": self.latent_shape}

    @property
    def latent_hw(self) -> Optional[tuple[int, int]]:
        return tuple(self.latent_shape[-2:]) if self.latent_shape is not None else None


class UNetIdentityProcessor:
    """An attn2 processor: the core's ``DecoupledAttention`` (or ``IdentityOnlyAttention``)."""

    def __init__(self, patch: DecoupledAttention, state: CallState):
        self.patch, self.state = patch, state

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if attention_mask is not None:
            raise ValueError("the identity processors take no attention mask on cross-attention")
        if getattr(attn, "norm_q", None) is not None:
            raise ValueError("the identity processors are for SD1.5/SDXL cross-attention (no q/k norms)")
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        q, k, v = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
        if self.state.maps is not None:
            self.state.maps.record(q, k, attn.heads)
        out = self.patch(q, k, v, self.state.extra(attn.heads)).to(q.dtype)
        out = attn.to_out[1](attn.to_out[0](out))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def comfy_rotary(image_rotary_emb) -> Optional[torch.Tensor]:
    """diffusers' FLUX rotary embedding (cos, sin), each (L, D) with every angle twice, as ComfyUI's
    (1, 1, L, D / 2, 2, 2) rotation matrices [[cos, -sin], [sin, cos]] that ``flux_identity`` reads."""
    if image_rotary_emb is None:
        return None
    cos, sin = (t[..., ::2].float() for t in image_rotary_emb)
    rows = torch.stack([torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)], -2)
    return rows[None, None]


class FluxIdentityProcessor:
    """A FLUX double- or single-block processor: diffusers' joint attention plus the core's identity terms."""

    def __init__(self, injections: tuple, state: CallState, kind: str, key: str, base=None):
        self.injections, self.state, self.kind, self.key = tuple(injections), state, kind, key
        self.base = base                     # the processor that was there (its attention backend is kept)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.embeddings import apply_rotary_emb
        from diffusers.models.transformers.transformer_flux import _get_qkv_projections
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        query, key, value, e_query, e_key, e_value = _get_qkv_projections(attn, hidden_states, encoder_hidden_states)
        query, key, value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (query, key, value))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if attn.added_kv_proj_dim is not None:
            e_query, e_key, e_value = (t.unflatten(-1, (-1, attn.head_dim)) for t in (e_query, e_key, e_value))
            e_query, e_key = attn.norm_added_q(e_query), attn.norm_added_k(e_key)
            query, key = torch.cat([e_query, query], dim=1), torch.cat([e_key, key], dim=1)
            value = torch.cat([e_value, value], dim=1)
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        backend = getattr(self.base, "_attention_backend", None)
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=backend)
        out = out.flatten(2, 3).to(query.dtype)

        txt_len = encoder_hidden_states.shape[1] if encoder_hidden_states is not None else self.state.txt_len
        if txt_len is None:
            raise ValueError("the FLUX single blocks need the text length: apply the identity with apply_identity, "
                             "which records it on each model call")
        pe = comfy_rotary(image_rotary_emb) if any(i.style != "decoupled" for i in self.injections) else None
        out, residual = identity_terms(out, query.transpose(1, 2), pe, txt_len, self.kind, self.injections,
                                       sdpa_attention, self.state.cond_or_uncond, self.state.latent_hw,
                                       self.state.sigmas)
        if residual is not None:
            self.state.residuals[self.key] = residual

        if encoder_hidden_states is not None:
            e_out, out = out.split_with_sizes([txt_len, out.shape[1] - txt_len], dim=1)
            out = attn.to_out[1](attn.to_out[0](out.contiguous()))
            return out, attn.to_add_out(e_out.contiguous())
        return out
