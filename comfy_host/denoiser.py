"""A ComfyUI MODEL as the frozen base model of the training objectives.

Implements ``training.flow_matching.DenoiserHost`` and ``training.pivot.PivotHost``. Each
training step patches a clone of the (gradient-ready) model with the step's identity
keys/values, which carry gradients back to the adapter and the encoder, and runs the
conditional pass through ComfyUI's own ``calc_cond_batch`` (so every model gets its usual conditioning
and latent layout, Qwen-Image's frame axis included). The keys/values go in through the patch points the
inference adapter uses (``comfy_host.identity``): attn2 replace patches on UNets; on DiTs the family's own
(block patches and the attention override, or the override alone by layer number on Z-Image). The patches
live on a per-step clone of the ``gradient_ready`` model, so under dynamic VRAM the steps run on its
non-dynamic delegate. Identity-enhanced training replaces the UNet's text cross-attention by the identity
term alone.
"""
from __future__ import annotations

import comfy.model_management as mm
import comfy.sampler_helpers
import comfy.samplers
import torch
from comfy.ldm.modules import attention as comfy_attention

from ..guidance.attention_capture import AttentionMaps
from ..guidance.decoupled import COND, UNCOND, IdentityOnlyAttention, LayerInjection, token_grid
from .attention import record_attention
from .gradients import gradient_ready
from .compat import comfyui_version
from .identity import InjectionPointMissing, add_dit_injection, add_unet_injection, track_flux_calls
from .layers import dit_family, host_layers, model_description, patch_size


class ComfyDenoiserHost:
    def __init__(self, model, vae, positive, image_size: int):
        self.base = gradient_ready(model)
        self.vae, self.image_size = vae, image_size
        self.layers = host_layers(model)
        self.family = dit_family(model)          # None: a UNet
        if self.family is not None:
            track_flux_calls(self.base)
        self.sampling = model.get_model_object("model_sampling")
        self.positive = comfy.sampler_helpers.convert_cond(positive)

    def check_adapter(self, adapter) -> None:
        dims = tuple(layer.inner_dim for layer in self.layers)
        if adapter.config.layer_dims != dims:
            raise ValueError(f"the adapter has {len(adapter.config.layer_dims)} layers {adapter.config.layer_dims}, "
                             f"this model's cross-attention layers are {dims}")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) images in [0, 1] -> the model's latents."""
        latent = self.vae.encode(images[..., :3])
        return self.base.model.process_latent_in(latent).float().cpu()

    def sigma_at(self, u: torch.Tensor) -> torch.Tensor:
        return torch.tensor([float(self.sampling.percent_to_sigma(float(x))) for x in u])

    def noise(self, x0, sigma, eps):
        return self.sampling.noise_scaling(sigma.reshape(-1, *([1] * (x0.dim() - 1))), eps, x0)

    def _run(self, patched, conds_in, x_t, sigma) -> torch.Tensor:
        # as a sampler does: the patcher's wrappers (the DiT call tracking that the identity's attention override
        # reads) and callbacks go into transformer_options, where the diffusion model looks for them
        comfy.sampler_helpers.prepare_model_patcher(patched, {"positive": conds_in}, patched.model_options)
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
        maps = AttentionMaps(token=token, track_grad=True)
        patched.model_options["transformer_options"] = record_attention(
            patched.model_options.setdefault("transformer_options", {}), maps)
        conds = [dict(c, cross_attn=conditioning.to(mm.get_torch_device())) for c in self.positive]
        out = self._run(patched, conds, x_t, sigma)
        latent_tokens = x_t.shape[-2] * x_t.shape[-1]
        n = maps.nearest(max(1, latent_tokens // 16))
        if n is None or maps.cross_map(n) is None:
            raise ValueError("the model made no cross-attention call to record (is it a text-conditioned model?)")
        return out, maps.cross_map(n).cpu(), token_grid(n, *x_t.shape[-2:])

    def denoise(self, x_t, sigma, identity_kv, text_attention: bool) -> torch.Tensor:
        if self.family is not None and not text_attention:
            raise ValueError("identity-enhanced training (text attention off) needs a UNet model (SD1.5/SDXL): "
                             f"{self.family.name} attends to text and image in one joint attention")
        patched = self.base.clone()
        for layer, (keys, values) in zip(self.layers, identity_kv):
            injection = LayerInjection({COND: keys, UNCOND: keys}, {COND: values, UNCOND: values}, 1.0)
            if self.family is not None:
                add_dit_injection(patched, self.family, layer, injection, patch_size(self.base))
            elif text_attention:
                add_unet_injection(patched, layer.key, injection)
            else:
                patched.set_model_attn2_replace(IdentityOnlyAttention(comfy_attention.optimized_attention,
                                                                      [injection]), *layer.key)
        out = self._run(patched, list(self.positive), x_t, sigma)
        if torch.is_grad_enabled() and not out.requires_grad and any(k.requires_grad for k, _ in identity_kv):
            raise InjectionPointMissing(f"ComfyUI {comfyui_version()} ran {model_description(self.base)} without the "
                                        "pack's identity patches: the identity never reached its output, so the "
                                        "adapter cannot train on this release")
        return out
