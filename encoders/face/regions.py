"""Face regions in image space, for one identity per face in a picture of several people."""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .alignment import face_outline, render_mask
from .types import DetectedFace


def face_region(face: DetectedFace, height: int, width: int, grow: float = 0.0, feather: int = 0) -> torch.Tensor:
    """(H, W) mask of a face in its image: the landmark hull (jaw and lifted brows), scaled about its
    centre by 1 + ``grow``, with a soft edge of ``feather`` pixels."""
    polygon = np.asarray(face_outline(face), dtype=np.float64)
    centre = polygon.mean(0)
    polygon = centre + (polygon - centre) * (1.0 + grow)
    mask = render_mask(polygon, max(height, width))[:height, :width]
    if feather > 0:
        mask = blur(mask, feather)
    return mask.clamp(0.0, 1.0)


def blur(mask: torch.Tensor, radius: int) -> torch.Tensor:
    """Separable Gaussian blur of an (H, W) mask, sigma = radius / 2."""
    sigma = max(radius / 2.0, 1e-3)
    x = torch.arange(-radius, radius + 1, dtype=torch.float32)
    kernel = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    kernel = (kernel / kernel.sum()).to(mask.dtype)
    out = F.conv2d(F.pad(mask[None, None], (radius, radius, 0, 0), mode="replicate"), kernel.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), kernel.view(1, 1, -1, 1))
    return out[0, 0]


def overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Share of the smaller of two masks (> 0.5 counts as inside) that lies inside the other."""
    a_in, b_in = a > 0.5, b > 0.5
    smaller = min(int(a_in.sum()), int(b_in.sum()))
    return float((a_in & b_in).sum()) / smaller if smaller else 0.0


def overlapping_pairs(masks: list[torch.Tensor], least: float = 0.02) -> list[tuple[int, int, float]]:
    """(i, j, overlap) for every pair of masks of the same size that overlap by more than ``least``."""
    pairs = []
    for i in range(len(masks)):
        for j in range(i + 1, len(masks)):
            if masks[i].shape == masks[j].shape:
                share = overlap(masks[i], masks[j])
                if share > least:
                    pairs.append((i, j, share))
    return pairs
