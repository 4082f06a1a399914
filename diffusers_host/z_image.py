"""Z-Image as the frozen denoiser of the flow-matching objective.

Z-Image reads FLUX.1's autoencoder latent (the VAE's mean, shifted and scaled), one frame per sample, as
a list of (C, 1, H, W) tensors with a list of captions; it takes t = 1 - sigma and predicts the negative
velocity (as diffusers' Z-Image pipeline and ComfyUI's NextDiT have it).
"""
from __future__ import annotations

import torch


def latent(vae, pixels: torch.Tensor) -> torch.Tensor:
    mean = vae.encode(pixels).latent_dist.mean
    return (mean - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def velocity(model, x: torch.Tensor, sigma: torch.Tensor, text: dict, device, dtype, guidance: float) -> torch.Tensor:
    """The transformer's velocity for latents ``x`` (B, C, h, w) at ``sigma`` (B,), under the prompt ``text``."""
    context = text.get("encoder_hidden_states", torch.zeros(1, 1, model.config.cap_feat_dim)).to(device, dtype)
    out = model([sample[:, None].to(dtype) for sample in x], (1 - sigma).to(dtype),
                [context[min(i, context.shape[0] - 1)] for i in range(x.shape[0])]).sample
    return -torch.stack([sample[:, 0] for sample in out]).float()
