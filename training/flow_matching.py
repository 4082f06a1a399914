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

Representations (Omni-ID appendix A.1: the baselines are trained "in the same Flow Matching
Decoder stage"), ``method``:

- ``omni_id``: the Omni-ID encoder (from stage 1) and the projections train;
- ``arcface``: the ArcFace projection (``IdentityEncoder`` of architecture ``arcface``, 512 ->
  256 x 1280) and the projections train; several photos are concatenated along the tokens
  (the paper's choice) or averaged (``arcface_merge``);
- ``arcface_clip``: the FaceIDPlus-style transformer (ArcFace queries, CLIP keys/values) and the
  projections train;
- ``clip``: no encoder: the CLIP tokens of all input photos, concatenated, go straight into
  the K/V projections, and only those train (IP-Adapter Full).
- ``infinite_id``: Infinite-ID's identity extractor (its CLIP and face mappers over the photos'
  CLIP *last*-layer features and ArcFace embeddings, concatenated) and the projections train;
  with ``mode = identity_enhanced`` this is Infinite-ID's own training.

Identities of one batch may then have different token counts (concatenation over 1-3
photos): the targets are denoised in groups of equal length, so no padding token is ever
attended to.

The base model enters through a ``DenoiserHost`` (ComfyUI's model in the nodes, a small
torch model in the tests): it encodes images to latents, noises them, and denoises with
given identity keys/values per layer.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch
import torch.nn as nn

from .mtd import ImageCache
from .trainer import sample_seed, sum_of_sample_means

FM_MODES = ("omni_id", "identity_enhanced")
FM_METHODS = ("omni_id", "arcface", "clip", "arcface_clip", "infinite_id")   # Omni-ID's table rows, Infinite-ID
ARCFACE_METHODS = ("arcface", "arcface_clip", "infinite_id")                  # those that read ArcFace embeddings


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
    """The trainable part of stage 2: the encoder (none for ``clip``) and the adapter's per-layer projections."""

    def __init__(self, encoder: Optional[nn.Module], adapter: nn.Module, method: str = "omni_id",
                 arcface_merge: str = "concat"):
        super().__init__()
        self.encoder, self.adapter, self.method, self.arcface_merge = encoder, adapter, method, arcface_merge

    def identity(self, clip_tokens, counts, arcface=None) -> tuple[torch.Tensor, list[int]]:
        """(B, L, D) identity tokens, padded, and each identity's real length L_b."""
        if self.method == "clip":                       # IP-Adapter Full: the photos' tokens, concatenated
            per_image = clip_tokens.shape[2]
            return clip_tokens.flatten(1, 2), [c * per_image for c in counts]
        if self.method == "arcface" and self.arcface_merge == "concat":
            # the encoder's own projection per photo, concatenated (IdentityEncoder._arcface_tokens)
            tokens = self.encoder.arcface_proj(self.encoder._check_arcface(arcface))      # (B, N, Q, D)
            per_image = tokens.shape[2]
            return tokens.flatten(1, 2), [c * per_image for c in counts]
        identity = self.encoder(clip_tokens, arcface, counts=counts, arcface_merge=self.arcface_merge)
        return identity, [identity.shape[1]] * identity.shape[0]

    def forward(self, clip_tokens, counts, arcface=None):
        identity, lengths = self.identity(clip_tokens, counts, arcface)
        return [(layer.to_k(identity), layer.to_v(identity)) for layer in self.adapter.layers], lengths


def check_representation(method: str, encoder: Optional[nn.Module], adapter) -> None:
    """The encoder and adapter fit the representation ``method`` trains (clear errors otherwise)."""
    if method not in FM_METHODS:
        raise ValueError(f"method must be one of {FM_METHODS}, not {method!r}")
    if adapter.config.projection != "none":
        raise ValueError("stage 2 trains the pack's own adapters (identity tokens straight into K/V); "
                         f"this adapter has a '{adapter.config.projection}' image projection")
    if adapter.config.embeds_kind != method:
        raise ValueError(f"the adapter reads {adapter.config.embeds_kind} embeds; training the {method} "
                         f"representation needs an adapter made for {method} embeds")
    if method == "clip":
        if encoder is not None:
            raise ValueError("the clip representation has no encoder (CLIP tokens go straight into K/V); "
                             "disconnect it")
        return
    if encoder is None:
        raise ValueError(f"the {method} representation needs an encoder of architecture {method!r}")
    if encoder.config.architecture != method:
        raise ValueError(f"the encoder is an {encoder.config.architecture!r} encoder; the {method} "
                         f"representation trains an {method!r} one")
    if adapter.config.token_dim != encoder.config.dim:
        raise ValueError(f"the adapter reads tokens of width {adapter.config.token_dim}, the encoder makes "
                         f"{encoder.config.dim}")


class FlowMatchingObjective:
    def __init__(self, encoder, adapter, host: DenoiserHost, sampler, token_fn, seed: int = 0,
                 mode: str = "omni_id", clip_size: int = 224, method: str = "omni_id",
                 arcface_fn: Optional[Callable] = None, arcface_merge: str = "concat", face_size: int = 256):
        if mode not in FM_MODES:
            raise ValueError(f"mode must be one of {FM_MODES}, not {mode!r}")
        check_representation(method, encoder, adapter)
        needs_arcface = method in ARCFACE_METHODS
        if needs_arcface and arcface_fn is None:
            raise ValueError(f"the {method} representation needs ArcFace embeddings of the photos: connect a "
                             "face analysis with an ArcFace model")
        self.module = AdapterTraining(encoder, adapter, method, arcface_merge)
        self.host, self.sampler, self.seed, self.mode, self.method = host, sampler, seed, mode, method
        self.cache = ImageCache(token_fn, clip_size)
        self.arcface = ImageCache(arcface_fn, face_size) if needs_arcface else None
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
        inputs = [[identities[s.identity].images[i] for i in s.inputs] for s in samples]
        tokens, arcface = None, None
        if self.method != "arcface":
            tokens, counts = self.cache.padded_tokens(inputs)
            if self.method == "clip" and tokens.shape[-1] != self.module.adapter.config.token_dim:
                raise ValueError(f"the adapter reads tokens of width {self.module.adapter.config.token_dim}, the "
                                 f"CLIP vision model gives {tokens.shape[-1]}")
        if self.arcface is not None:
            arcface, counts = self.arcface.padded_tokens(inputs)
        layer_kv, lengths = model(tokens, counts, arcface)             # per layer (B, L, inner) pairs
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
        target_lengths = torch.tensor([lengths[o] for o in owners])
        per_target = torch.zeros(len(owners), dtype=torch.float32, device=x0.device)
        for length in sorted(set(target_lengths.tolist())):           # equal token counts share a forward
            group = (target_lengths == length).nonzero().flatten()
            kv = [(k[index[group], :length], v[index[group], :length]) for k, v in layer_kv]
            denoised = self.host.denoise(x_t[group], sigma[group], kv, text_attention=self.mode != "identity_enhanced")
            per_target = per_target.index_put((group.to(per_target.device),),
                                              denoising_loss(denoised, x0[group], sigma[group]).to(per_target))
        return sum_of_sample_means(per_target, index, len(samples))
