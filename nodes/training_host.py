"""A ComfyUI MODEL as the frozen base model of stage-2 training (training.flow_matching.DenoiserHost).

Each training step patches a clone of the (gradient-ready) model with the step's identity
keys/values, which carry gradients back to the adapter and the encoder, and runs the
conditional pass through ComfyUI's own ``calc_cond_batch`` (so SD1.5, SDXL and FLUX get
their usual conditioning). Identity-enhanced training replaces the UNet's text
cross-attention by the identity term alone.
"""
from __future__ import annotations

import comfy.model_management as mm
import comfy.patcher_extension
import comfy.sampler_helpers
import comfy.samplers
import torch
from comfy.ldm.modules import attention as comfy_attention

from ..guidance.decoupled import COND, UNCOND, DecoupledAttention, LayerInjection
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
        mm.load_models_gpu([patched])
        device = mm.get_torch_device()
        x_t, sigma = x_t.to(device), sigma.to(device)
        conds = comfy.samplers.process_conds(patched.model, x_t, {"positive": list(self.positive)}, device,
                                             latent_image=torch.zeros_like(x_t), seed=0)["positive"]
        patched.pre_run()               # as a sampler does: the model knows its patcher for this call
        try:
            out = comfy.samplers.calc_cond_batch(patched.model, [conds], x_t, sigma, patched.model_options)[0]
        finally:
            patched.cleanup()
        return out.float().cpu()
