"""A ComfyUI MODEL as the frozen base model of stage-2 training (training.flow_matching.DenoiserHost).

Each training step patches a clone of the (gradient-ready) model with the step's identity
keys/values, which carry gradients back to the adapter and the encoder, and runs the
conditional pass through ComfyUI's own ``calc_cond_batch`` (so SD1.5, SDXL and FLUX get
their usual conditioning). Identity-enhanced training replaces the UNet's text
cross-attention by the identity term alone.
"""
from __future__ import annotations

import math

import comfy.model_management as mm
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import torch
from comfy.ldm.modules import attention as comfy_attention

from ..guidance.decoupled import COND, UNCOND, DecoupledAttention, LayerInjection, token_grid
from .hosts import (FLUX_STATE, _add_flux_injection, _add_unet_injection, gradient_ready, host_layers, is_flux,
                    record_flux_call)


class IdentityOnlyAttention(DecoupledAttention):
    """Cross-attention that is the identity term alone (text attention off)."""

    def __call__(self, q, k, v, extra: dict) -> torch.Tensor:
        cond_or_uncond = extra.get("cond_or_uncond") or ()
        out = None
        for injection in self.injections:
            term = injection.contribution(q, extra["n_heads"], self.attention, cond_or_uncond, None)
            out = term if out is None else out + term
        return out


class TokenAttentionCapture:
    """optimized_attention_override recording one text token's cross-attention map, with gradients
    (head-averaged, per token grid), for the face-localisation loss."""

    def __init__(self, token: int, previous=None):
        self.token, self.previous = token, previous
        self.maps: dict[int, list[torch.Tensor]] = {}

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        out = (self.previous(func, q, k, v, heads, *args, **kwargs) if self.previous is not None
               else func(q, k, v, heads, *args, **kwargs))
        if not kwargs.get("skip_reshape") and q.ndim == 3 and k.shape[1] != q.shape[1] and self.token < k.shape[1]:
            b, n, inner = q.shape
            d = inner // heads
            qh = q.float().view(b, n, heads, d).transpose(1, 2)
            kh = k.float().view(b, k.shape[1], heads, d).transpose(1, 2)
            probs = torch.softmax(qh @ kh.transpose(-1, -2) / math.sqrt(d), dim=-1)[..., self.token].mean(1)
            self.maps.setdefault(n, []).append(probs)
        return out

    def nearest(self, tokens: int) -> tuple[int, torch.Tensor]:
        if not self.maps:
            raise ValueError("the model made no cross-attention call to record (is it a text-conditioned model?)")
        n = min(self.maps, key=lambda m: abs(math.log(m / tokens)))
        return n, torch.stack(self.maps[n]).mean(0)


class ComfyDenoiserHost:
    def __init__(self, model, vae, positive, image_size: int):
        self.base = gradient_ready(model)
        self.vae, self.image_size = vae, image_size
        self.layers = host_layers(model)
        self.flux = is_flux(model)
        if self.flux:
            self.base.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, FLUX_STATE,
                                           record_flux_call)
        self.sampling = model.get_model_object("model_sampling")
        self.positive = comfy.sampler_helpers.convert_cond(positive)

    def check_adapter(self, adapter) -> None:
        dims = tuple(layer.inner_dim for layer in self.layers)
        if adapter.config.layer_dims != dims:
            raise ValueError(f"the adapter has {len(adapter.config.layer_dims)} layers {adapter.config.layer_dims}, "
                             f"this model's cross-attention layers are {dims}")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        latent = self.vae.encode(images.permute(0, 2, 3, 1)[..., :3])
        return self.base.model.process_latent_in(latent).float().cpu()

    def sigma_at(self, u: torch.Tensor) -> torch.Tensor:
        return torch.tensor([float(self.sampling.percent_to_sigma(float(x))) for x in u])

    def noise(self, x0, sigma, eps):
        return self.sampling.noise_scaling(sigma.reshape(-1, *([1] * (x0.dim() - 1))), eps, x0)

    def _run(self, patched, conds_in, x_t, sigma) -> torch.Tensor:
        mm.load_models_gpu([patched])
        device = mm.get_torch_device()
        x_t, sigma = x_t.to(device), sigma.to(device)
        conds = comfy.samplers.process_conds(patched.model, x_t, {"positive": conds_in}, device,
                                             latent_image=torch.zeros_like(x_t), seed=0)["positive"]
        patched.pre_run()               # as a sampler does: the model knows its patcher for this call
        try:
            out = comfy.samplers.calc_cond_batch(patched.model, [conds], x_t, sigma, patched.model_options)[0]
        finally:
            patched.cleanup()
        return out.float().cpu()

    def denoise_conditioned(self, x_t, sigma, conditioning, token: int):
        """D(x_t) with the prompt's conditioning replaced (per sample), and ``token``'s attention map."""
        patched = self.base.clone()
        transformer = patched.model_options.setdefault("transformer_options", {})
        capture = TokenAttentionCapture(token, transformer.get("optimized_attention_override"))
        transformer["optimized_attention_override"] = capture
        conds = [dict(c, cross_attn=conditioning.to(mm.get_torch_device())) for c in self.positive]
        out = self._run(patched, conds, x_t, sigma)
        latent_tokens = x_t.shape[-2] * x_t.shape[-1]
        n, attention = capture.nearest(max(1, latent_tokens // 16))
        return out, attention.cpu(), token_grid(n, *x_t.shape[-2:])

    def denoise(self, x_t, sigma, identity_kv, text_attention: bool) -> torch.Tensor:
        if self.flux and not text_attention:
            raise ValueError("identity-enhanced training (text attention off) needs a UNet model (SD1.5/SDXL): "
                             "FLUX attends to text and image in one joint attention")
        patched = self.base.clone()
        for layer, (keys, values) in zip(self.layers, identity_kv):
            injection = LayerInjection({COND: keys, UNCOND: keys}, {COND: values, UNCOND: values}, 1.0)
            if self.flux:
                _add_flux_injection(patched, layer.key, injection)
            elif text_attention:
                _add_unet_injection(patched, layer.key, injection)
            else:
                patched.set_model_attn2_replace(IdentityOnlyAttention(comfy_attention.optimized_attention,
                                                                      [injection]), *layer.key)
        return self._run(patched, list(self.positive), x_t, sigma)
