"""Detect, select, align and crop the faces of an image batch.

Images are ComfyUI-layout tensors (B, H, W, C) with values in [0, 1].
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch
from PIL import Image, ImageDraw

from .alignment import (estimate_similarity, face_outline, render_mask, template_points,
                        transform_points, warp_crop)
from .types import DetectedFace, FaceAnalyzer, FaceRecord, FaceSet, NoFaceFoundError

SELECTIONS = ("largest", "most_confident", "closest_to_center", "all")


@dataclass
class CropResult:
    crops: torch.Tensor            # (F, S, S, 3)
    masks: torch.Tensor            # (F, S, S)
    faces: FaceSet
    warnings: list[str] = field(default_factory=list)


def to_uint8(image: torch.Tensor) -> np.ndarray:
    """(H, W, C) float in [0, 1] -> RGB uint8 (H, W, 3)."""
    rgb = image[..., :3].detach().float().clamp(0.0, 1.0).mul(255.0).round()
    return rgb.to(torch.uint8).cpu().numpy()


def select_faces(faces: list[DetectedFace], selection: str, height: int, width: int) -> list[DetectedFace]:
    if not faces:
        return []
    if selection == "all":
        return sorted(faces, key=lambda f: -f.area)
    if selection == "largest":
        return [max(faces, key=lambda f: f.area)]
    if selection == "most_confident":
        return [max(faces, key=lambda f: f.score)]
    if selection == "closest_to_center":
        centre = np.array([(width - 1) / 2.0, (height - 1) / 2.0])
        return [min(faces, key=lambda f: float(np.linalg.norm(
            (f.bbox[:2] + f.bbox[2:]) / 2.0 - centre)))]
    raise ValueError(f"face selection must be one of {SELECTIONS}, not {selection!r}")


def align_face(image: torch.Tensor, face: DetectedFace, crop_size: int, padding: float):
    """One aligned crop (S, S, 3), its face mask (S, S) and the source->crop matrix."""
    matrix = estimate_similarity(face.keypoints5, template_points(crop_size, padding))
    crop = warp_crop(image[..., :3], matrix, crop_size)
    mask = render_mask(transform_points(face_outline(face), matrix), crop_size)
    return crop, mask, matrix


def crop_faces(images: torch.Tensor, analyzer: FaceAnalyzer, crop_size: int = 224,
               padding: float = 0.25, selection: str = "largest", with_embedding: bool = True,
               on_image_done: Optional[Callable[[int], None]] = None) -> CropResult:
    """Crop the selected face(s) of every image; images without a face are skipped.

    Raises NoFaceFoundError when no image of the batch has a face.
    ``on_image_done(i)`` runs after each image (progress, cancellation).
    """
    if selection not in SELECTIONS:
        raise ValueError(f"face selection must be one of {SELECTIONS}, not {selection!r}")
    if images.ndim != 4:
        raise ValueError(f"expected an image batch (B, H, W, C), got shape {tuple(images.shape)}")
    records, crops, masks, skipped, warnings = [], [], [], [], []
    sizes = [(int(images.shape[1]), int(images.shape[2]))] * int(images.shape[0])
    for index, image in enumerate(images):
        height, width = sizes[index]
        found = analyzer.detect(to_uint8(image), with_embedding=with_embedding)
        chosen = select_faces(found, selection, height, width)
        if not chosen:
            skipped.append(index)
            warnings.append(f"no face found in image {index + 1} of {len(images)}; skipped it")
        for face in chosen:
            crop, mask, matrix = align_face(image, face, crop_size, padding)
            crops.append(crop)
            masks.append(mask)
            records.append(FaceRecord(image_index=index, face=face, crop_matrix=matrix, crop_size=crop_size))
        if on_image_done is not None:
            on_image_done(index)
    if not records:
        raise NoFaceFoundError(
            f"No face found in any of the {len(images)} input image(s) with the {analyzer.name} "
            "backend. Check that each photo shows a face at least ~80 px wide; try a larger "
            "det_size, the 'cnn' dlib detector, or an insightface pack.")
    faces = FaceSet(records=records, image_sizes=sizes, skipped_images=skipped, backend=analyzer.name)
    return CropResult(torch.stack(crops), torch.stack(masks).to(images.dtype), faces, warnings)


def draw_faces(images: torch.Tensor, faces: FaceSet) -> torch.Tensor:
    """The batch with every kept face's box, landmarks and five keypoints drawn on it."""
    out = []
    for index, image in enumerate(images):
        canvas = Image.fromarray(to_uint8(image))
        draw = ImageDraw.Draw(canvas)
        unit = max(1, round(max(canvas.size) / 400))
        for record in faces.records:
            if record.image_index != index:
                continue
            f = record.face
            draw.rectangle([float(v) for v in f.bbox], outline=(0, 255, 0), width=2 * unit)
            for x, y in np.asarray(f.landmarks):
                draw.ellipse([x - unit, y - unit, x + unit, y + unit], fill=(0, 200, 255))
            for x, y in np.asarray(f.keypoints5):
                r = 2 * unit
                draw.ellipse([x - r, y - r, x + r, y + r], fill=(255, 40, 40))
        out.append(torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0))
    return torch.stack(out).to(images.dtype)


def largest_face_mask(image: torch.Tensor, analyzer: FaceAnalyzer) -> torch.Tensor:
    """(H, W) mask of the largest face in one (H, W, C) image: the hull of its landmarks.

    Raises NoFaceFoundError when there is no face."""
    found = analyzer.detect(to_uint8(image), with_embedding=False)
    if not found:
        raise NoFaceFoundError("no face found in the image")
    face = max(found, key=lambda f: f.area)
    height, width = image.shape[:2]
    return render_mask(face_outline(face), max(height, width))[:height, :width]
