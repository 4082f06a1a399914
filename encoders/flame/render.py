"""Landmark condition images in the style of ControlNet 1.1's OpenPose face input.

The drawing follows the face part of OpenPose as ``lllyasviel/control_v11p_sd15_openpose``
(and the SDXL OpenPose ControlNets trained on the same renderer) reads it: the 68 iBUG
points plus the two pupils as filled white discs on black, radius 3 at 512 px. That
ControlNet was chosen because it is the public one whose face condition is exactly the
68-point iBUG layout FLAME's landmark embedding produces, so no point is invented or
dropped, and users already have it (its preprocessor is ``openpose_faceonly``).
Discs are drawn without anti-aliasing, as OpenPose's renderer does, centred on the
projected point rounded to the nearest pixel.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

EYES_68 = (list(range(36, 42)), list(range(42, 48)))


def with_pupils(points: np.ndarray, layout: str) -> np.ndarray:
    """The landmarks plus the two eye centres (OpenPose's face points 68 and 69)."""
    offset = 0 if layout == "ibug68" else 17
    pupils = [points[[i - offset for i in eye]].mean(0) for eye in EYES_68]
    return np.concatenate([points, np.stack(pupils)], 0)


def default_radius(width: int, height: int) -> int:
    return max(1, int(round(3 * min(width, height) / 512)))


def draw_points(points: np.ndarray, width: int, height: int, radius: int) -> np.ndarray:
    """White discs on black, (H, W) float32 in 0..1; points outside are clipped."""
    canvas = np.zeros((height, width), dtype=np.float32)
    offsets = np.arange(-radius, radius + 1)
    dy, dx = np.meshgrid(offsets, offsets, indexing="ij")
    disc = dx ** 2 + dy ** 2 <= radius ** 2 + (radius > 0) * 0.5
    ys, xs = dy[disc], dx[disc]
    for x, y in np.rint(np.asarray(points, dtype=np.float64)).astype(np.int64):
        px, py = xs + x, ys + y
        keep = (px >= 0) & (px < width) & (py >= 0) & (py < height)
        canvas[py[keep], px[keep]] = 1.0
    return canvas


@dataclass
class Framing:
    """Model metres to canvas pixels: x = cx_px + s (X - cx), y = cy_px - s (Y - cy)."""
    scale: float
    center: tuple[float, float]          # model x, y at the canvas centre
    width: int
    height: int

    def project(self, points: torch.Tensor | np.ndarray) -> np.ndarray:
        p = np.asarray(points, dtype=np.float64)
        x = self.width / 2 + self.scale * (p[..., 0] - self.center[0])
        y = self.height / 2 - self.scale * (p[..., 1] - self.center[1])
        return np.stack([x, y], -1)


def frame_face(reference: np.ndarray, width: int, height: int, face_size: float,
               offset: tuple[float, float] = (0.0, 0.0)) -> Framing:
    """Framing that makes the reference landmarks' larger extent ``face_size`` of the canvas's
    shorter side, centred (plus ``offset`` in canvas fractions)."""
    ref = np.asarray(reference, dtype=np.float64)
    lo, hi = ref[:, :2].min(0), ref[:, :2].max(0)
    extent = float((hi - lo).max())
    if extent <= 0:
        raise ValueError("the landmarks have no extent")
    scale = face_size * min(width, height) / extent
    centre = (lo + hi) / 2
    centre = (centre[0] - offset[0] * width / scale, centre[1] + offset[1] * height / scale)
    return Framing(scale, (float(centre[0]), float(centre[1])), width, height)


def render_conditions(points_batch: np.ndarray, layout: str, width: int, height: int,
                      radius: int | None = None) -> torch.Tensor:
    """(B, K, 2) canvas pixels -> IMAGE batch (B, H, W, 3)."""
    radius = default_radius(width, height) if radius is None else radius
    frames = [draw_points(with_pupils(p, layout), width, height, radius) for p in points_batch]
    return torch.from_numpy(np.stack(frames))[..., None].expand(-1, -1, -1, 3).contiguous()
