"""OmniPortrait's Pivot ID Encoder training: the diffusion loss plus the face-localisation loss.

The reference face's image embedding (OpenCLIP ViT-L/14) and the class word's text
embedding are fused by the Pivot ID Encoder into e_mix, which replaces the class word in
the prompt's conditioning; the denoiser stays frozen. Loss (paper, eq. 1):
L = L_diff + eta * L_loc with L_loc = mean over the attention grid of (A_t - M)^2, where
A_t is e_mix's cross-attention map (head- and layer-averaged at the layers whose grid is
nearest 1/4 of the latent, brought to the paper's 16 x 16 grid and scaled to [0, 1] by its
maximum) and M the target's face mask averaged onto that 16 x 16 grid (the "scaled" mask);
eta = 2e-3. L_diff is the model's own denoising loss, as in ``flow_matching``.
The reference is one photo of the person, the targets are their other photos.

Trained (paper: "only the Pivot ID Encoder and linear layer are optimized"): the fusing layer
and, when a ``VisionTower`` is given, the visual encoder (all its blocks or its last N, see
``encoders.pivot.prepare_vision``); its embedding of the reference is then computed with
gradients at every step instead of once. Condition dropout for classifier-free guidance
(paper: "10% dropout is applied to text and ID conditions"): per sample, independently, with
probability ``text_dropout`` the prompt's tokens are replaced by the unconditional
conditioning (e_mix stays at the class word's place) and with probability ``id_dropout`` the
reference's image embedding is replaced by zeros.
"""
from __future__ import annotations

from typing import Callable, Optional, Protocol

import torch
import torch.nn as nn
import torch.nn.functional as F

from .flow_matching import denoising_loss, noise_draw
from .mtd import ImageCache
from .trainer import sample_seed, sum_of_sample_means

ETA = 2e-3
PAPER_GRID = (16, 16)          # A_t in [0, 1]^(16 x 16)
CONDITION_DROPOUT = 0.1        # text and ID conditions, each


class PivotHost(Protocol):
    image_size: int

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) in [0, 1] -> the model's latents x0 (no gradient)."""

    def sigma_at(self, u: torch.Tensor) -> torch.Tensor: ...

    def noise(self, x0: torch.Tensor, sigma: torch.Tensor, eps: torch.Tensor) -> torch.Tensor: ...

    def denoise_conditioned(self, x_t: torch.Tensor, sigma: torch.Tensor, conditioning: torch.Tensor,
                            token: int) -> tuple[torch.Tensor, torch.Tensor, tuple[int, int]]:
        """D(x_t) under ``conditioning`` (B, L, C), and the token's cross-attention map (B, h*w) on grid (h, w)."""


def to_grid(values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) -> (B, *size): averaged over the cells it covers (area), or repeated when ``size`` is finer."""
    if tuple(values.shape[-2:]) == tuple(size):
        return values
    finer = size[0] >= values.shape[-2] and size[1] >= values.shape[-1]
    return F.interpolate(values[:, None], size=size, mode="nearest" if finer else "area")[:, 0]


def localisation_loss(attention: torch.Tensor, face_mask: torch.Tensor, grid: tuple[int, int],
                      size: tuple[int, int] = PAPER_GRID) -> torch.Tensor:
    """Per sample: mean over the 16 x 16 grid of (A / max A - M)^2; A (B, h*w) is the attention map on
    ``grid`` brought to ``size``, M the (B, H, W) face mask averaged onto ``size``."""
    a = to_grid(attention.float().reshape(-1, *grid), size).flatten(1)
    mask = F.interpolate(face_mask[:, None].float(), size=size, mode="area")[:, 0].flatten(1)
    scaled = a / a.amax(dim=1, keepdim=True).clamp_min(1e-8)
    return ((scaled - mask) ** 2).mean(1)


class PivotTraining(nn.Module):
    """What the pivot stage trains: the fusing layer, and the visual encoder when one is given."""

    def __init__(self, pivot: nn.Module, vision: Optional[nn.Module] = None):
        super().__init__()
        self.pivot, self.vision = pivot, vision

    def forward(self, class_embedding, reference, keep_id: torch.Tensor):
        """e_mix (B, text_dim); ``reference`` is images (B, H, W, 3) for a trained visual encoder, else
        their (B, image_dim) embeddings; rows where ``keep_id`` is False get a zero image embedding."""
        image = self.vision(reference) if self.vision is not None else reference
        image = image.to(class_embedding) * keep_id.to(class_embedding)[:, None]
        return self.pivot(class_embedding, image)


def condition_drops(seed: int, step: int, index: int, text_p: float, id_p: float) -> tuple[bool, bool]:
    """(drop the text, drop the ID) of one sample, fixed by (seed, step, sample)."""
    generator = torch.Generator().manual_seed(sample_seed(seed, step, index, 0xD209))
    u = torch.rand(2, generator=generator)
    return bool(u[0] < text_p), bool(u[1] < id_p)


class PivotObjective:
    def __init__(self, pivot: nn.Module, host: PivotHost, sampler, image_embed_fn: Optional[Callable],
                 face_mask_fn: Callable, conditioning: torch.Tensor, class_token: int, seed: int = 0, eta: float = ETA,
                 clip_size: int = 224, vision: Optional[nn.Module] = None,
                 unconditional: Optional[torch.Tensor] = None, text_dropout: float = CONDITION_DROPOUT,
                 id_dropout: float = CONDITION_DROPOUT):
        """``vision``: the visual encoder to train with the pivot (images in, embeddings out); without it
        ``image_embed_fn`` gives the frozen embeddings, computed once per photo. ``unconditional``: the
        conditioning text dropout puts in place of the prompt (zeros when not given)."""
        if not 0 < class_token < conditioning.shape[1]:
            raise ValueError(f"class_token {class_token} is not a token of the {conditioning.shape[1]}-token prompt")
        if vision is None and image_embed_fn is None:
            raise ValueError("the pivot needs image embeddings: a visual encoder to train or a frozen embedding function")
        for name, p in (("text_dropout", text_dropout), ("id_dropout", id_dropout)):
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], not {p}")
        self.module = PivotTraining(pivot, vision)
        self.host, self.sampler, self.seed, self.eta = host, sampler, seed, eta
        self.conditioning, self.class_token = conditioning.detach().float(), class_token
        if unconditional is None:
            unconditional = torch.zeros_like(self.conditioning)
        if unconditional.shape[-1] != conditioning.shape[-1]:
            raise ValueError(f"the unconditional conditioning is {unconditional.shape[-1]} wide, the prompt's "
                             f"{conditioning.shape[-1]}")
        self.unconditional = self._fit_length(unconditional.detach().float(), conditioning.shape[1])
        self.text_dropout, self.id_dropout = text_dropout, id_dropout
        self.last_drops: list[tuple[bool, bool]] = []
        self.cache = ImageCache(image_embed_fn, clip_size)       # its "tokens" are image embeddings here
        self.face_mask_fn = face_mask_fn
        self.latents: dict[str, torch.Tensor] = {}
        self.masks: dict[str, torch.Tensor] = {}
        self.last_parts: tuple[float, float] = (0.0, 0.0)

    @staticmethod
    def _fit_length(tensor: torch.Tensor, length: int) -> torch.Tensor:
        if tensor.shape[1] >= length:
            return tensor[:, :length]
        return torch.cat([tensor, tensor[:, -1:].expand(-1, length - tensor.shape[1], -1)], 1)

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
        paths = [identities[s.identity].images[s.inputs[0]] for s in samples]
        if self.module.vision is not None:             # trained: the reference images, embedded with gradients
            refs = torch.stack([self.cache.image(p, self.cache.clip_size) for p in paths]).permute(0, 2, 3, 1)
        else:
            refs = self.cache.clip_tokens(paths)                                                        # (B, D)
        drops = [condition_drops(self.seed, step, first_index + row, self.text_dropout, self.id_dropout)
                 for row in range(len(samples))]
        self.last_drops = drops
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
        prompt = self.conditioning.expand(len(samples), -1, -1)
        keep_id = torch.tensor([not drop_id for _, drop_id in drops])
        mixed = model(prompt[:, self.class_token], refs.to(prompt) if refs.is_floating_point() else refs, keep_id)
        drop_text = torch.tensor([drop_text for drop_text, _ in drops])[:, None, None]
        base = torch.where(drop_text, self.unconditional.expand(len(samples), -1, -1), prompt)[index]
        mixed = mixed[index]
        conditioning = torch.cat([base[:, :self.class_token], mixed[:, None], base[:, self.class_token + 1:]], 1)
        denoised, attention, grid = self.host.denoise_conditioned(x_t, sigma, conditioning, self.class_token)
        diffusion = denoising_loss(denoised, x0, sigma)
        localisation = localisation_loss(attention.float(), torch.stack(masks), grid)
        self.last_parts = (float(diffusion.detach().mean()), float(localisation.detach().mean()))
        return sum_of_sample_means(diffusion + self.eta * localisation, index, len(samples))
