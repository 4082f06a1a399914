"""OmniPortrait's Pivot ID Encoder training: the diffusion loss plus the face-localisation loss.

The reference face's image embedding (OpenCLIP ViT-L/14) and the class word's text
embedding are fused by the Pivot ID Encoder into e_mix, which replaces the class word in
the prompt's conditioning; the denoiser stays frozen. Loss (paper, eq. 1):
L = L_diff + eta * L_loc with L_loc = mean over the attention grid of (A_t - M)^2, where
A_t is e_mix's cross-attention map (head- and layer-averaged at the grid nearest 1/4 of
the latent, scaled to [0, 1] by its maximum) and M the target's face mask on that grid;
eta = 2e-3. L_diff is the model's own denoising loss, as in ``flow_matching``.
The reference is one photo of the person, the targets are their other photos.
"""
from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from .flow_matching import denoising_loss, noise_draw
from .mtd import ImageCache
from .trainer import sum_of_sample_means

ETA = 2e-3


class PivotHost(Protocol):
    image_size: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) in [0, 1] -> the model's latents x0 (no gradient)."""

    def sigma_at(self, u: torch.Tensor) -> torch.Tensor: ...

    def noise(self, x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor: ...

    def denoise_conditioned(self, x_t: torch.Tensor, sigma: torch.Tensor, conditioning: torch.Tensor,
                            token: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """D(x_t) under ``conditioning`` (B, L, C), and the token's cross-attention map (B, h*w) on grid (h, w)."""


def localisation_loss(attention: torch.Tensor, face_mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Per sample: mean of (A / max A - M)^2 with M the (B, H, W) face mask resized to ``grid``."""
    mask = F.interpolate(face_mask[:, None].float(), size=grid, mode="area")[:, 0].flatten(1)
    scaled = attention / attention.amax(dim=1, keepdim=True).clamp_min(1e-8)
    return ((scaled - mask) ** 2).mean(1)


class PivotObjective:
    def __init__(self, pivot: nn.Module, host: PivotHost, sampler, image_embed_fn: Callable, face_mask_fn: Callable,
                 conditioning: torch.Tensor, class_token: int, seed: int = 0, eta: float = ETA,
                 clip_size: int = 224):
        if not 0 < class_token < conditioning.shape[1]:
            raise ValueError(f"class_token {class_token} is not a token of the {conditioning.shape[1]}-token prompt")
        self.module = pivot
        self.host, self.sampler, self.seed, self.eta = host, sampler, seed, eta
        self.conditioning, self.class_token = conditioning.detach().float(), class_token
        self.cache = ImageCache(image_embed_fn, clip_size)       # its "tokens" are image embeddings here
        self.face_mask_fn = face_mask_fn
        self.latents: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.last_parts: tuple[float, float] = (0.0, 0.0)

    def draw(self, step: int, count: int) -> list:
        return self.sampler.sample(step, count)

    def _target(self, path) -> tuple[torch.Tensor, torch.Tensor]:
        key = str(path)
        if key not in self.latents:
            image = self.cache.image(path, self.host.image_size).permute(1, 2, 0)      # (H, W, 3)
            with torch.no_grad():
                self.latents[key] = self.host.encode(image[None])[0]
            self.masks[key] = self.face_mask_fn(image)
        return self.latents[key], self.masks[key]

    def loss(self, model, samples, step: int, first_index: int) -> torch.Tensor:
        identities = self.sampler.dataset.identities
        refs = self.cache.clip_tokens([identities[s.identity].images[s.inputs[0]] for s in samples])   # (B, D)
        x0, masks, owners, u, eps = [], [], [], [], []
        for row, s in enumerate(samples):
            targets = [t for t in s.targets if t != s.inputs[0]] or list(s.targets)
            for j, index in enumerate(targets):
                latent, mask = self._target(identities[s.identity].images[index])
                level, noise = noise_draw(self.seed, step, first_index + row, j, latent.shape)
                x0.append(latent)
                masks.append(mask)
                owners.append(row)
                u.append(level)
                eps.append(noise)
        index = torch.tensor(owners)
        x0, eps = torch.stack(x0), torch.stack(eps)
        sigma = self.host.sigma_at(torch.stack(u))
        x_t = self.host.noise(x0, sigma, eps)
        base = self.conditioning.expand(len(index), -1, -1)
        mixed = model(base[:, self.class_token], refs[index].to(base))
        conditioning = torch.cat([base[:, :self.class_token], mixed[:, None], base[:, self.class_token + 1:]], 1)
        denoised, attention, grid = self.host.denoise_conditioned(x_t, sigma, conditioning, self.class_token)
        diffusion = denoising_loss(denoised, x0, sigma)
        localisation = localisation_loss(attention.float(), torch.stack(masks), grid)
        self.last_parts = (float(diffusion.detach().mean()), float(localisation.detach().mean()))
        return sum_of_sample_means(diffusion + self.eta * localisation, index, len(samples))
