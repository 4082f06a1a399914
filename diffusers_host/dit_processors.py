"""Identity processors for the 2026 DiTs' diffusers attention modules.

Each runs the module's own joint attention as diffusers' default processor does (projections,
per-head q/k norms, text tokens first, the rotary embedding, attention), then hands the attention
output and the rotated queries to ``guidance.flux_identity.identity_terms``, the function ComfyUI's
block patches and attention override call, and finishes with the module's output projections. Only
the pack's own ``decoupled`` adapters are trained for these families, so the identity is queried with
the rotated queries and no rotation is undone.
"""
from __future__ import annotations

import torch

from ..guidance.decoupled import sdpa_attention
from ..guidance.flux_identity import identity_terms
from .processors import FluxIdentityProcessor


def _heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    return t.unflatten(-1, (-1, head_dim))


class _DitIdentityProcessor(FluxIdentityProcessor):
    """What the families share: attention over (B, L, heads, D) q/k/v, then the identity terms."""

    def _attend(self, attn, query, key, value, attention_mask, image_rotary_emb, txt_len):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        backend = getattr(self.base, "_attention_backend", None)
        out = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, backend=backend)
        out = out.flatten(2, 3).to(query.dtype)
        if txt_len is None:
            raise ValueError("the single blocks need the text length: apply the identity with apply_identity, "
                             "which records it on each model call")
        out, _ = identity_terms(out, query.transpose(1, 2), None, txt_len, self.kind, self.injections, sdpa_attention,
                                self.state.cond_or_uncond, self.state.latent_hw, self.state.sigmas,
                                self.state.patch_size)
        return out


class Flux2JointProcessor(_DitIdentityProcessor):
    """FLUX.2's double-block attention (``Flux2Attention``): text and image projected apart, attended jointly."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 **_):
        query, key, value = (_heads(f(hidden_states), attn.head_dim) for f in (attn.to_q, attn.to_k, attn.to_v))
        query, key = attn.norm_q(query), attn.norm_k(key)
        txt_len = encoder_hidden_states.shape[1]
        e_query, e_key, e_value = (_heads(f(encoder_hidden_states), attn.head_dim)
                                   for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        e_query, e_key = attn.norm_added_q(e_query), attn.norm_added_k(e_key)
        query, key = torch.cat([e_query, query], dim=1), torch.cat([e_key, key], dim=1)
        value = torch.cat([e_value, value], dim=1)
        out = self._attend(attn, query, key, value, attention_mask, image_rotary_emb, txt_len)
        e_out, out = out.split_with_sizes([txt_len, out.shape[1] - txt_len], dim=1)
        out = attn.to_out[1](attn.to_out[0](out))
        return out, attn.to_add_out(e_out)


class Flux2SingleProcessor(_DitIdentityProcessor):
    """FLUX.2's single-block attention (``Flux2ParallelSelfAttention``): one fused projection feeds the
    attention and the MLP, one fused projection takes both out."""

    def __call__(self, attn, hidden_states, attention_mask=None, image_rotary_emb=None, **_):
        fused = attn.to_qkv_mlp_proj(hidden_states)
        qkv, mlp = torch.split(fused, [3 * attn.inner_dim, fused.shape[-1] - 3 * attn.inner_dim], dim=-1)
        query, key, value = (_heads(t, attn.head_dim) for t in qkv.chunk(3, dim=-1))
        query, key = attn.norm_q(query), attn.norm_k(key)
        out = self._attend(attn, query, key, value, attention_mask, image_rotary_emb, self.state.txt_len)
        return attn.to_out(torch.cat([out, attn.mlp_act_fn(mlp)], dim=-1))


class QwenJointProcessor(_DitIdentityProcessor):
    """Qwen-Image's attention (its transformer blocks' ``Attention``): text and image projected apart, each
    rotated by its own complex rotary frequencies, attended jointly (text first)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, encoder_hidden_states_mask=None,
                 attention_mask=None, image_rotary_emb=None, **_):
        from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen
        head_dim = attn.inner_dim // attn.heads
        query, key, value = (_heads(f(hidden_states), head_dim) for f in (attn.to_q, attn.to_k, attn.to_v))
        e_query, e_key, e_value = (_heads(f(encoder_hidden_states), head_dim)
                                   for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        query, key = attn.norm_q(query), attn.norm_k(key)
        e_query, e_key = attn.norm_added_q(e_query), attn.norm_added_k(e_key)
        if image_rotary_emb is not None:
            image_freqs, text_freqs = image_rotary_emb
            query, key = (apply_rotary_emb_qwen(t, image_freqs, use_real=False) for t in (query, key))
            e_query, e_key = (apply_rotary_emb_qwen(t, text_freqs, use_real=False) for t in (e_query, e_key))
        if encoder_hidden_states_mask is not None:     # text padding masked out, as diffusers' processor does
            image_mask = torch.ones(hidden_states.shape[:2], dtype=torch.bool, device=hidden_states.device)
            attention_mask = torch.cat([encoder_hidden_states_mask.bool(), image_mask], dim=1)[:, None, None, :]
        txt_len = encoder_hidden_states.shape[1]
        out = self._attend(attn, torch.cat([e_query, query], dim=1), torch.cat([e_key, key], dim=1),
                           torch.cat([e_value, value], dim=1), attention_mask, None, txt_len)
        e_out, out = out[:, :txt_len], out[:, txt_len:]
        return attn.to_out[1](attn.to_out[0](out.contiguous())), attn.to_add_out(e_out.contiguous())


class ZImageProcessor(_DitIdentityProcessor):
    """Z-Image's main-layer attention (``layers.N.attention``): self-attention over one sequence in which
    diffusers puts the image's tokens first, then the caption's, rotated by complex frequencies."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, freqs_cis=None, **_):
        query, key, value = (f(hidden_states).unflatten(-1, (attn.heads, -1)) for f in (attn.to_q, attn.to_k, attn.to_v))
        query, key = attn.norm_q(query), attn.norm_k(key)
        if freqs_cis is not None:
            query, key = (_complex_rotation(t, freqs_cis) for t in (query, key))
        if attention_mask is not None and attention_mask.ndim == 2:
            attention_mask = attention_mask[:, None, None, :]
        out = self._attend(attn, query, key, value, attention_mask, None, 0)     # no text in front of the image
        return attn.to_out[0](out)


def _complex_rotation(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    """Each channel pair of ``x`` (B, L, heads, D) as a complex number times ``freqs_cis`` (B, L, D / 2)."""
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs_cis.unsqueeze(2)).flatten(3).type_as(x)
