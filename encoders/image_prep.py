"""Reference photos prepared for a 224 px CLIP encoder as IPAdapter_plus's Prep Image For ClipVision does:
a square chosen by ``crop_position`` (or black padding), resized with a PIL filter, then optionally
sharpened with contrast-adaptive sharpening (AMD FidelityFX CAS). Pure torch and PIL.

Pixels go through 8 bits on the way to PIL as torchvision's ToPILImage takes them (x 255, truncated), so
the result matches IPAdapter_plus's bit for bit before sharpening.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

INTERPOLATIONS = ("LANCZOS", "BICUBIC", "HAMMING", "BILINEAR", "BOX", "NEAREST")
CROP_POSITIONS = ("top", "bottom", "left", "right", "center", "pad")


def square(images: torch.Tensor, position: str) -> torch.Tensor:
    """(B, C, H, W) -> the square of side min(H, W) at ``position``, or (``pad``) the shorter side padded with
    black by (long - short) // 2 on each side."""
    if position not in CROP_POSITIONS:
        raise ValueError(f"crop_position must be one of {CROP_POSITIONS}, not {position!r}")
    h, w = images.shape[-2:]
    if position == "pad":
        margin = abs(h - w) // 2
        return F.pad(images, (margin, margin, 0, 0) if h > w else (0, 0, margin, margin)) if h != w else images
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    top = {"top": 0, "bottom": h - side}.get(position, top)
    left = {"left": 0, "right": w - side}.get(position, left)
    return images[..., top:top + side, left:left + side]


def cas_sharpen(images: torch.Tensor, amount: float) -> torch.Tensor:
    """Contrast-adaptive sharpening of (B, C, H, W) images in [0, 1] (zero outside the border): each pixel
    gets a negative-lobe weight from the contrast of its 3 x 3 neighbourhood (cross and diagonals)."""
    padded = F.pad(images, (1, 1, 1, 1))
    h, w = images.shape[-2:]

    def at(dy: int, dx: int) -> torch.Tensor:
        return padded[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]

    cross = torch.stack([at(-1, 0), at(0, -1), at(0, 0), at(0, 1), at(1, 0)])
    diagonal = torch.stack([at(-1, -1), at(-1, 1), at(1, -1), at(1, 1)])
    low = cross.min(0).values.clamp(min=0) + diagonal.min(0).values.clamp(min=0)
    high = cross.max(0).values.clamp(max=1) + diagonal.max(0).values.clamp(max=1)
    amplitude = torch.sqrt(torch.minimum(low, 2 - high) / high)
    lobe = -amplitude * (amount * (1 / 5 - 1 / 8) + 1 / 8)
    ring = at(-1, 0) + at(0, -1) + at(0, 1) + at(1, 0)
    out = (ring * lobe + at(0, 0)) / (1 + 4 * lobe)
    return torch.nan_to_num(out).clamp(0, 1)


def prep_for_clip_vision(images: torch.Tensor, interpolation: str = "LANCZOS", crop_position: str = "center",
                         sharpening: float = 0.0, size: int = 224) -> torch.Tensor:
    """ComfyUI IMAGE (B, H, W, C) -> (B, size, size, C): squared, resized with PIL's ``interpolation``,
    sharpened by ``sharpening`` (0: none)."""
    if interpolation not in INTERPOLATIONS:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, not {interpolation!r}")
    chw = square(images.permute(0, 3, 1, 2), crop_position)
    resample = getattr(Image.Resampling, interpolation)
    resized = []
    for image in chw:
        pixels = image.mul(255).byte().permute(1, 2, 0).cpu().numpy()
        pil = Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels)
        array = np.asarray(pil.resize((size, size), resample=resample), dtype=np.float32) / 255.0
        resized.append(torch.from_numpy(array.reshape(size, size, -1)).permute(2, 0, 1))
    out = torch.stack(resized)
    if sharpening > 0:
        out = cas_sharpen(out, sharpening)
    return out.permute(0, 2, 3, 1)
