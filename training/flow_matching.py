"""Stage 2: the identity adapter on a frozen base model, trained with the model's own denoising loss.

Appendix A.2: the encoder and the per-layer K/V projections of the decoupled attention
are trained, the base model stays frozen. The loss is written once for any model
parameterisation: with x_t the model's noising of x0 at sigma and D(x_t) its denoised
prediction, loss = |(x_t - D(x_t)) / sigma - (x_t - x0) / sigma|^2. For a flow model
(FLUX: x_t = (1 - sigma) x0 + sigma eps) the target (x_t - x0) / sigma is eps - x0, the
flow-matching velocity; for an epsilon model (SD1.5) it is eps. Modes:

- ``omni_id``: text and identity attention, as the paper trains Omni-ID's adapter;
- ``identity_enhanced``: Infinite-ID's identity-enhanced training, text cross-attention
  off so the identity branch alone must explain the image.

The base model enters through a ``DenoiserHost`` (ComfyUI's model in the nodes, a small
torch model in the tests): it encodes images to latents, noises them, and denoises with
given identity keys/values per layer.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn

from .mtd import ImageCache
from .trainer import sample_seed, sum_of_sample_means

FM_MODES = ("omni_id", "identity_enhanced")


class DenoiserHost(Protocol):
    image_size: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) in [0, 1] (ComfyUI's IMAGE layout) -> the model's latents x0 (no gradient)."""

    def sigma_at(self, u: torch.Tensor) -> torch.Tensor:
        """u in (0, 1) -> noise levels covering the model's schedule."""

    def noise(self, x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor: ...

    def denoise(self, x_t: torch.Tensor, sigma: torch.Tensor, identity_kv: list[tuple[torch.Tensor, torch.Tensor]],
                text_attention: bool) -> torch.Tensor:
        """D(x_t): the denoised prediction with the identity's (B, L, inner) K/V at every layer."""


def noise_draw(seed: int, step: int, index: int, target: int, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """One target's noise level u in (0.001, 0.999) and noise eps, fixed by (seed, step, sample, target)."""
    generator = torch.Generator().manual_seed(sample_seed(seed, step, index, target))
    u = torch.rand((), generator=generator) * 0.998 + 0.001
    return u, torch.randn(shape, generator=generator)


def denoising_loss(denoised: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Per target: mean of ((D(x_t) - x0) / sigma)^2, the model's own parameterisation (see the module)."""
    scale = sigma.reshape(-1, *([1] * (x0.dim() - 1)))
    return (((denoised.float() - x0) / scale) ** 2).flatten(1).mean(1)


class AdapterTraining(nn.Module):
    """The trainable part of stage 2: the encoder and the adapter's per-layer projections."""

    def __init__(self, encoder: nn.Module, adapter: nn.Module):
        super().__init__()
        self.encoder, self.adapter = encoder, adapter

    def forward(self, clip_tokens, counts):
        identity = self.encoder(clip_tokens, counts=counts)            # (B, L, D)
        return [(layer.to_k(identity), layer.to_v(identity)) for layer in self.adapter.layers]


class FlowMatchingObjective:
    def __init__(self, encoder, adapter, host: DenoiserHost, sampler, token_fn, seed: int = 0,
                 mode: str = "omni_id", clip_size: int = 224):
        if mode not in FM_MODES:
            raise ValueError(f"mode must be one of {FM_MODES}, not {mode!r}")
        if adapter.config.projection != "none":
            raise ValueError("stage 2 trains the pack's own adapters (identity tokens straight into K/V); "
                             f"this adapter has a '{adapter.config.projection}' image projection")
        if adapter.config.token_dim != encoder.config.dim:
            raise ValueError(f"the adapter reads tokens of width {adapter.config.token_dim}, the encoder makes "
                             f"{encoder.config.dim}")
        self.module = AdapterTraining(encoder, adapter)
        self.host, self.sampler, self.seed, self.mode = host, sampler, seed, mode
        self.cache = ImageCache(token_fn, clip_size)
        self.latents: dict[str, torch.Tensor] = {}

    def draw(self, step: int, count: int) -> list:
        return self.sampler.sample(step, count)

    def _latent(self, path) -> torch.Tensor:
        key = str(path)
        if key not in self.latents:
            with torch.no_grad():
                self.latents[key] = self.host.encode(self.cache.image(path, self.host.image_size).permute(1, 2, 0)[None])[0]
        return self.latents[key]

    def loss(self, model, samples, step: int, first_index: int) -> torch.Tensor:
        identities = self.sampler.dataset.identities
        tokens, counts = self.cache.padded_tokens([[identities[s.identity].images[i] for i in s.inputs]
                                                   for s in samples])
        layer_kv = model(tokens, counts)                                # per layer (B, L, inner) pairs
        x0, owners, u, eps = [], [], [], []
        for row, s in enumerate(samples):
            for j, index in enumerate(s.targets):
                latent = self._latent(identities[s.identity].images[index])
                level, noise = noise_draw(self.seed, step, first_index + row, j, latent.shape)
                x0.append(latent)
                owners.append(row)
                u.append(level)
                eps.append(noise)
        x0, eps = torch.stack(x0), torch.stack(eps)
        sigma = self.host.sigma_at(torch.stack(u))
        x_t = self.host.noise(x0, sigma, eps)
        index = torch.tensor(owners)
        kv = [(k[index], v[index]) for k, v in layer_kv]
        denoised = self.host.denoise(x_t, sigma, kv, text_attention=self.mode != "identity_enhanced")
        return sum_of_sample_means(denoising_loss(denoised, x0, sigma), index, len(samples))
