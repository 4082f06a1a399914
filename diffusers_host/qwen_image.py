"""Qwen-Image (and -Edit's base) as the frozen denoiser of the flow-matching objective.

Qwen-Image's latent is its video VAE's mean for a one-frame clip, minus the VAE's per-channel
``latents_mean``, over its ``latents_std`` (as diffusers' Qwen-Image pipelines and ComfyUI's latent
format have it). The transformer reads 2 x 2 patches of it as tokens (channels first, then the
patch's rows and columns), the one-frame shape (1, h/2, w/2) for its rotary positions, the timestep
as sigma, and predicts the velocity in the same packing.
"""
from __future__ import annotations

import torch


def latent(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1] -> the normalised (B, C, h, w) latent (the one frame's axis dropped)."""
    mean = vae.encode(pixels[:, :, None]).latent_dist.mean[:, :, 0]
    shift = torch.tensor(vae.config.latents_mean).view(1, -1, 1, 1).to(mean)
    scale = torch.tensor(vae.config.latents_std).view(1, -1, 1, 1).to(mean)
    return (mean - shift) / scale


def pack(x: torch.Tensor) -> torch.Tensor:
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def unpack(tokens: torch.Tensor, shape) -> torch.Tensor:
    b, c, h, w = shape
    return tokens.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def velocity(model, x: torch.Tensor, sigma: torch.Tensor, text: dict, device, dtype, guidance: float) -> torch.Tensor:
    """The transformer's velocity for latents ``x`` (B, C, h, w) at ``sigma`` (B,), under the prompt ``text``."""
    b, c, h, w = x.shape
    context = text.get("encoder_hidden_states", torch.zeros(1, 1, model.config.joint_attention_dim))
    context = context.to(device, dtype).expand(b, -1, -1)
    v = model(hidden_states=pack(x).to(dtype), encoder_hidden_states=context, timestep=sigma.to(dtype),
              img_shapes=[(1, h // 2, w // 2)] * b).sample.float()
    return unpack(v, x.shape)
