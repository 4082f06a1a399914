"""FLUX.2 (dev, klein) as the frozen denoiser of the flow-matching objective.

FLUX.2's latent is the VAE's 32-channel mean patchified 2 x 2 into 128 channels and normalised by
the VAE's batch-norm statistics (as diffusers' FLUX.2 pipelines and ComfyUI's Flux2 latent format
have it), so each latent pixel is one image token. The transformer reads the tokens with position
ids (t, h, w, l) = (0, row, column, 0), the text with (0, 0, 0, index), the timestep as sigma, and
predicts the velocity.
"""
from __future__ import annotations

import torch


def patchify(latent: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4C, H/2, W/2): each 2 x 2 patch's channels side by side (channel-major)."""
    b, c, h, w = latent.shape
    return latent.view(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def latent(vae, pixels: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) pixels in [-1, 1] -> the latent FLUX.2 reads: the VAE's mean, patchified, minus the
    batch-norm mean, over its std."""
    packed = patchify(vae.encode(pixels).latent_dist.mean)
    mean = vae.bn.running_mean.view(1, -1, 1, 1).to(packed)
    std = (vae.bn.running_var.view(1, -1, 1, 1) + vae.config.batch_norm_eps).sqrt().to(packed)
    return (packed - mean) / std


def position_ids(h: int, w: int, txt_len: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    rows, cols = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
    zeros = torch.zeros_like(rows)
    img_ids = torch.stack([zeros, rows, cols, zeros], -1).reshape(-1, 4)
    txt_ids = torch.zeros(txt_len, 4, dtype=torch.long)
    txt_ids[:, 3] = torch.arange(txt_len)
    return img_ids.to(device, dtype), txt_ids.to(device, dtype)


def velocity(model, x: torch.Tensor, sigma: torch.Tensor, text: dict, device, dtype, guidance: float) -> torch.Tensor:
    """The transformer's velocity for latents ``x`` (B, C, h, w) at ``sigma`` (B,), under the prompt ``text``."""
    b, c, h, w = x.shape
    context = text.get("encoder_hidden_states", torch.zeros(1, 1, model.config.joint_attention_dim))
    context = context.to(device, dtype).expand(b, -1, -1)
    img_ids, txt_ids = position_ids(h, w, context.shape[1], device, dtype)
    tokens = x.reshape(b, c, h * w).transpose(1, 2)
    g = torch.full((b,), guidance, device=device, dtype=dtype) if model.config.guidance_embeds else None
    v = model(hidden_states=tokens.to(dtype), encoder_hidden_states=context, timestep=sigma.to(dtype),
              img_ids=img_ids, txt_ids=txt_ids, guidance=g).sample.float()
    return v.transpose(1, 2).reshape(b, c, h, w)
