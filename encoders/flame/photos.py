"""Landmarks from photos: the input of FLAME fitting and the path for users without FLAME."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..face.crop import select_faces, to_uint8
from ..face.types import DetectedFace
from .render import draw_points, with_pupils


@dataclass
class PhotoLandmarks:
    faces: list[DetectedFace]                 # the chosen face of each photo that has one
    image_indices: list[int]
    image_sizes: list[tuple[int, int]]        # (height, width) of those photos
    skipped: list[int] = field(default_factory=list)


def photo_landmarks(images: torch.Tensor, analyzer, selection: str = "largest") -> PhotoLandmarks:
    """The chosen face (largest by default) of every photo; photos without one are listed."""
    out = PhotoLandmarks([], [], [])
    for index in range(images.shape[0]):
        pixels = to_uint8(images[index])
        h, w = pixels.shape[:2]
        found = select_faces(analyzer.detect(pixels, with_embedding=False), selection, h, w)
        if not found:
            out.skipped.append(index)
            continue
        out.faces.append(found[0])
        out.image_indices.append(index)
        out.image_sizes.append((h, w))
    return out


def photo_conditions(images: torch.Tensor, analyzer, radius: int | None = None) -> tuple[torch.Tensor, list[int]]:
    """Every face's 68 landmarks drawn in place, OpenPose-face style: (B, H, W, 3), faceless photos."""
    from .render import default_radius
    frames, faceless = [], []
    for index in range(images.shape[0]):
        pixels = to_uint8(images[index])
        h, w = pixels.shape[:2]
        r = default_radius(w, h) if radius is None else radius
        canvas = np.zeros((h, w), dtype=np.float32)
        faces = [f for f in analyzer.detect(pixels, with_embedding=False) if f.landmark_format == "ibug68"]
        if not faces:
            faceless.append(index)
        for face in faces:
            canvas = np.maximum(canvas, draw_points(with_pupils(face.landmarks, "ibug68"), w, h, r))
        frames.append(torch.from_numpy(canvas))
    return torch.stack(frames)[..., None].expand(-1, -1, -1, 3).contiguous(), faceless
