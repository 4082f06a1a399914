"""Chroma as the frozen denoiser of the flow-matching objective.

Chroma keeps FLUX.1's blocks and latent (FLUX.1's autoencoder, 2 x 2 patches as tokens, position ids
(0, row, column), text ids zero) but reads no pooled text embedding and no guidance: its modulations come
from the timestep alone. The transformer reads sigma as the timestep and predicts the velocity.
"""
from __future__ import annotations

import torch

from .z_image import latent  # noqa: F401  (the same shifted and scaled FLUX.1 latent)


def velocity(model, x: torch.Tensor, sigma: torch.Tensor, text: dict, device, dtype, guidance: float) -> torch.Tensor:
    b, c, h, w = x.shape
    packed = x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
    rows, cols = torch.meshgrid(torch.arange(h // 2), torch.arange(w // 2), indexing="ij")
    img_ids = torch.stack([torch.zeros_like(rows), rows, cols], -1).reshape(-1, 3).to(device, dtype)
    context = text.get("encoder_hidden_states", torch.zeros(1, 1, model.config.joint_attention_dim))
    context = context.to(device, dtype).expand(b, -1, -1)
    txt_ids = torch.zeros(context.shape[1], 3, device=device, dtype=dtype)
    v = model(hidden_states=packed.to(dtype), encoder_hidden_states=context, timestep=sigma.to(dtype),
              img_ids=img_ids, txt_ids=txt_ids).sample.float()
    return v.view(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)
