"""Omni-ID's masked transformer decoder (MTD): reconstruct heavily masked targets from the identity.

Appendix A.2: 6 cross-attention blocks and 2 self-attention blocks, 14 x 14 patches,
95% of the target's patches masked (85% and 99% as the ablations), L1 reconstruction
at 448 px. The decoder's tokens are the target's patches (the visible 5% embedded, the
rest a learned mask token) plus positions; the cross-attention blocks read the identity
tokens (projected to the decoder's width), then the self-attention blocks mix patches.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn as nn

from ..encoders.omni_id import CrossAttentionBlock, SelfAttentionBlock


@dataclass(frozen=True)
class MTDConfig:
    image_size: int = 448
    patch: int = 14
    dim: int = 1024
    num_heads: int = 16
    cross_depth: int = 6
    self_depth: int = 2
    mlp_ratio: float = 4.0
    id_dim: int = 1280
    mask_ratio: float = 0.95
    loss_on: str = "masked"           # "masked" patches only (MAE), or "all"

    def __post_init__(self):
        if self.image_size % self.patch:
            raise ValueError(f"image_size {self.image_size} is not a multiple of the patch size {self.patch}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError("mask_ratio must be in [0, 1)")
        if self.loss_on not in ("masked", "all"):
            raise ValueError("loss_on must be 'masked' or 'all'")

    @property
    def patches(self) -> int:
        return (self.image_size // self.patch) ** 2

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "MTDConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def patchify(images: torch.Tensor, patch: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, N, patch * patch * 3), rows of patches left to right, top to bottom."""
    b, c, h, w = images.shape
    x = images.reshape(b, c, h // patch, patch, w // patch, patch)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // patch) * (w // patch), patch * patch * c)


def unpatchify(patches: torch.Tensor, patch: int, size: int) -> torch.Tensor:
    b, n, _ = patches.shape
    side = size // patch
    x = patches.reshape(b, side, side, patch, patch, 3).permute(0, 5, 1, 3, 2, 4)
    return x.reshape(b, 3, size, size)


def masked_count(patches: int, ratio: float) -> int:
    return int(round(patches * ratio))


def random_mask(batch: int, patches: int, ratio: float, generators: list[torch.Generator]) -> torch.Tensor:
    """(B, N) bool, True = masked: exactly round(ratio * N) per row, one generator per row."""
    count = masked_count(patches, ratio)
    mask = torch.zeros(batch, patches, dtype=torch.bool)
    for row, generator in enumerate(generators[:batch]):
        mask[row, torch.randperm(patches, generator=generator)[:count]] = True
    return mask


class MaskedTransformerDecoder(nn.Module):
    def __init__(self, config: MTDConfig):
        super().__init__()
        self.config = config
        pixels = config.patch * config.patch * 3
        self.patch_embed = nn.Linear(pixels, config.dim)
        self.positions = nn.Parameter(torch.randn(config.patches, config.dim) * 0.02)
        self.mask_token = nn.Parameter(torch.zeros(config.dim))
        self.id_proj = nn.Linear(config.id_dim, config.dim)
        self.cross_blocks = nn.ModuleList(CrossAttentionBlock(config.dim, config.num_heads, config.mlp_ratio)
                                          for _ in range(config.cross_depth))
        self.self_blocks = nn.ModuleList(SelfAttentionBlock(config.dim, config.num_heads, config.mlp_ratio)
                                         for _ in range(config.self_depth))
        self.norm = nn.LayerNorm(config.dim)
        self.head = nn.Linear(config.dim, pixels)

    def forward(self, target_patches: torch.Tensor, identity: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """target_patches (B, N, P) in [0, 1], identity (B, L, id_dim), mask (B, N) -> predicted patches."""
        visible = self.patch_embed(target_patches * 2 - 1)
        x = torch.where(mask[..., None], self.mask_token.to(visible.dtype).expand_as(visible), visible)
        x = x + self.positions.to(x.dtype)
        context = self.id_proj(identity.to(x.dtype))
        for block in self.cross_blocks:
            x = block(x, context)
        for block in self.self_blocks:
            x = block(x)
        return (self.head(self.norm(x)) + 1) / 2


def mtd_loss(predicted: torch.Tensor, target_patches: torch.Tensor, mask: torch.Tensor,
             loss_on: str = "masked") -> torch.Tensor:
    """Per target (B,): the L1 error over its masked patches (or over all its patches)."""
    error = (predicted.float() - target_patches.float()).abs().mean(-1)          # (B, N)
    weights = mask.float() if loss_on == "masked" else torch.ones_like(error)
    return (error * weights).sum(-1) / weights.sum(-1).clamp_min(1.0)


class MTDModel(nn.Module):
    """Encoder + decoder as one module, so DDP sees one forward."""

    def __init__(self, encoder: nn.Module, decoder: MaskedTransformerDecoder):
        super().__init__()
        self.encoder, self.decoder = encoder, decoder

    def forward(self, clip_tokens, counts, target_patches, owners, mask):
        identity = self.encoder(clip_tokens, counts=counts)
        return self.decoder(target_patches, identity[owners], mask)


class ImageCache:
    """Training photos loaded once per size (a bounded number), and their CLIP features computed
    once per photo in a ``TokenCache`` (the CLIP is frozen).

    ``token_fn`` takes ComfyUI-layout images (B, H, W, 3) in [0, 1]; photos here are (3, H, W).
    """

    def __init__(self, token_fn, clip_size: int = 224, capacity: int = 4096):
        from ..encoders.clip_features import TokenCache
        self.token_fn, self.clip_size, self.capacity = token_fn, clip_size, capacity
        self.images: dict = {}
        self.tokens = TokenCache(capacity)

    def image(self, path, size: int) -> torch.Tensor:
        from .dataset import load_image
        key = (str(path), size)
        if key not in self.images:
            if len(self.images) >= self.capacity:
                self.images.clear()
            self.images[key] = load_image(path, size)
        return self.images[key]

    def clip_tokens(self, paths: list) -> torch.Tensor:
        def compute(missing: list[int]) -> torch.Tensor:
            with torch.no_grad(), torch.autocast("cpu", enabled=False):
                batch = torch.stack([self.image(paths[i], self.clip_size) for i in missing])
                return self.token_fn(batch.permute(0, 2, 3, 1)).float()
        return self.tokens.lookup([("photo", str(p)) for p in paths], compute)[0]

    def padded_tokens(self, photo_lists: list[list]) -> tuple[torch.Tensor, list[int]]:
        """(B, N, T, C) tokens of each identity's input photos, zero-padded to the longest, and the counts."""
        counts = [len(photos) for photos in photo_lists]
        rows = []
        for photos in photo_lists:
            tokens = self.clip_tokens(photos)
            rows.append(torch.cat([tokens, tokens.new_zeros(max(counts) - len(photos), *tokens.shape[1:])]))
        return torch.stack(rows), counts


class MTDObjective:
    """Stage 1: few inputs -> identity -> reconstruct every target from 5% of its patches."""

    def __init__(self, encoder, decoder: MaskedTransformerDecoder, sampler, token_fn, seed: int = 0,
                 clip_size: int = 224):
        self.module = MTDModel(encoder, decoder)
        self.sampler, self.seed = sampler, seed
        self.cache = ImageCache(token_fn, clip_size)

    def draw(self, step: int, count: int) -> list:
        return self.sampler.sample(step, count)

    def loss(self, model, samples, step: int, first_index: int) -> torch.Tensor:
        from .trainer import sample_seed, sum_of_sample_means
        cfg = self.module.decoder.config
        identities = self.sampler.dataset.identities
        tokens, counts = self.cache.padded_tokens([[identities[s.identity].images[i] for i in s.inputs]
                                                   for s in samples])
        targets, owners, generators = [], [], []
        for row, s in enumerate(samples):
            for j, index in enumerate(s.targets):
                targets.append(self.cache.image(identities[s.identity].images[index], cfg.image_size))
                owners.append(row)
                generators.append(torch.Generator().manual_seed(sample_seed(self.seed, step, first_index + row, j)))
        device = next(model.parameters()).device
        target_patches = patchify(torch.stack(targets), cfg.patch).to(device)
        mask = random_mask(len(targets), cfg.patches, cfg.mask_ratio, generators).to(device)
        predicted = model(tokens.to(device), counts, target_patches, torch.tensor(owners, device=device), mask)
        per_target = mtd_loss(predicted, target_patches, mask, cfg.loss_on)
        return sum_of_sample_means(per_target, torch.tensor(owners), len(samples))


def create_decoder(config: MTDConfig, seed: int | None = None) -> MaskedTransformerDecoder:
    if seed is None:
        return MaskedTransformerDecoder(config)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MaskedTransformerDecoder(config)
