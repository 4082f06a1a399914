"""Noise images for an IP-Adapter's negative (unconditional) image, as IPAdapter_plus's IPAdapter Noise makes
them: the photo's centre square at 224 px (or black), mixed with noise drawn from a seed that is the image's
pixel sum, clamped to [0, 1], then optionally blurred. Pure torch.

The seed makes the image a function of the photo: the same photo always gives the same noise. The noise is
drawn from a generator of its own (IPAdapter_plus reseeds torch's global one; on the CPU both give the same
numbers) and fills the square in its memory order, so the square is made with the same steps as
torchvision's centre crop and antialiased bicubic resize (channels first, the batch of one restrided as
channels last) and the same pixels get the same numbers. Types: ``fade`` (the photo faded into uniform noise
by ``strength``), ``dissolve`` (a ``strength`` share of pixels replaced by uniform noise), ``gaussian`` (the
photo plus normal noise times ``strength``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NOISE_TYPES = ("fade", "dissolve", "gaussian")
SIZE = 224


def centre_square(images: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """(B, H, W, C) -> the centre square (anchored as torchvision's center_crop anchors it) resized to ``size``
    with antialiased bicubic, in the memory layout torchvision's resize gives; a ``size`` square is kept."""
    chw = images.permute(0, 3, 1, 2)
    h, w = chw.shape[-2:]
    side = min(h, w)
    top, left = int(round((h - side) / 2.0)), int(round((w - side) / 2.0))
    chw = chw[..., top:top + side, left:left + side]
    if side != size:
        channels = chw.shape[1]
        chw = chw.reshape(-1, channels, side, side)
        numel, strides = chw.numel(), chw.stride()
        if chw.is_contiguous(memory_format=torch.channels_last) and chw.shape[0] == 1 and numel != strides[0]:
            chw = chw.as_strided((1, channels, side, side), [numel, *strides[1:]])
        chw = F.interpolate(chw, size=[size, size], mode="bicubic", align_corners=False, antialias=True)
    return chw.permute(0, 2, 3, 1)


def gaussian_blur(images: torch.Tensor, kernel: int) -> torch.Tensor:
    """(B, H, W, C) blurred with an odd ``kernel`` x ``kernel`` Gaussian of sigma 0.3 ((kernel - 1) / 2 - 1) + 0.8,
    reflected at the borders (torchvision's gaussian_blur with its default sigma)."""
    sigma = 0.3 * ((kernel - 1) * 0.5 - 1) + 0.8
    half = (kernel - 1) * 0.5
    x = torch.linspace(-half, half, steps=kernel, dtype=images.dtype, device=images.device)
    one = torch.exp(-0.5 * (x / sigma).pow(2))
    one = one / one.sum()
    weights = (one[:, None] * one[None, :]).expand(images.shape[-1], 1, kernel, kernel)
    chw = F.pad(images.permute(0, 3, 1, 2), [kernel // 2] * 4, mode="reflect")
    return F.conv2d(chw, weights, groups=images.shape[-1]).permute(0, 2, 3, 1)


def noise_image(kind: str, strength: float, blur: int, image: torch.Tensor | None = None) -> torch.Tensor:
    """IPAdapter Noise's image: (B, 224, 224, C) from ``image`` (B, H, W, C), or (1, 224, 224, 3) from black."""
    if kind not in NOISE_TYPES:
        raise ValueError(f"noise type must be one of {NOISE_TYPES}, not {kind!r}")
    base = torch.zeros(1, SIZE, SIZE, 3) if image is None else centre_square(image.cpu().float())
    generator = torch.Generator().manual_seed(int(torch.sum(base).item()) % 1000000007)

    def uniform():           # rand_like: the base's memory layout, filled in memory order
        return torch.empty_like(base).uniform_(0, 1, generator=generator)

    if kind == "fade":
        out = base * (1 - strength) + uniform() * strength
    elif kind == "dissolve":
        mask = (uniform() < strength).to(base.dtype)
        out = base * (1 - mask) + uniform() * mask
    else:
        out = base + torch.empty_like(base).normal_(0, 1, generator=generator) * strength
    out = torch.clamp(out, 0, 1)
    if blur > 0:
        out = gaussian_blur(out, blur + 1 if blur % 2 == 0 else blur)
    return out.contiguous()
