"""PuLID's face inputs from photos, as the authors' ``get_id_embedding`` builds them (pure torch / numpy).

Per photo: the largest face's ArcFace embedding (antelopev2's glintr100 through the pack's face
analysis), the face aligned to facexlib's 512 px FFHQ five-point template, its background whitened
and the rest turned grey (``features_image``). The authors find the background with a BiSeNet face
parsing model (labels background, neck, clothes, ears, earrings, necklace, hat); without one the pack
takes the face outline from the landmarks (jaw and lifted brows with 68 landmarks, an ellipse from
the five keypoints otherwise), which also whitens the hair the parsing model keeps.

A photo without a face is skipped and reported; only a batch with no face at all is an error.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from .face.alignment import estimate_similarity, face_outline, render_mask, transform_points, warp_crop
from .face.crop import to_uint8
from .face.types import NoFaceFoundError

# facexlib's FaceRestoreHelper template for 512 px crops (crop_ratio 1:1), insightface's keypoint order
FFHQ_TEMPLATE_512 = np.array([[192.98138, 239.94708], [318.90277, 240.1936], [256.63416, 314.01935],
                              [201.26117, 371.41043], [313.08905, 371.15118]])
FACE_SIZE = 512
# BiSeNet (CelebAMask-HQ) labels the authors treat as background
PARSING_BACKGROUND = (0, 16, 18, 7, 8, 9, 14, 15)


@dataclass
class PuLIDFaces:
    arcface: torch.Tensor                 # (N, 512) as the recogniser returns it (not normalised)
    images: torch.Tensor                  # (N, 3, 512, 512): grey face, white background, in [0, 1]
    kept: list[int]                       # photo indices that gave a face
    skipped: list[int] = field(default_factory=list)
    background: str = "landmark outline"

    def report(self, total: int) -> str:
        text = f"{len(self.kept)} of {total} photo(s) used; background from the {self.background}"
        if self.skipped:
            text += f"; no face in photo(s) {', '.join(str(i + 1) for i in self.skipped)} (skipped)"
        return text


def to_gray(images: torch.Tensor) -> torch.Tensor:
    """(B, 3, H, W) -> the luma (0.299 R + 0.587 G + 0.114 B) in all three channels, as the authors'."""
    luma = 0.299 * images[:, 0:1] + 0.587 * images[:, 1:2] + 0.114 * images[:, 2:3]
    return luma.repeat(1, 3, 1, 1)


def features_image(face: torch.Tensor, background: torch.Tensor) -> torch.Tensor:
    """The authors' ``torch.where(bg, white, to_gray(face))``: face (B, 3, S, S), background (B, 1, S, S) bool."""
    return torch.where(background, torch.ones_like(face), to_gray(face))


def parsing_background(labels: torch.Tensor) -> torch.Tensor:
    """Per-pixel class indices of a face parsing model (B, 1, S, S) -> the authors' background (bool)."""
    return sum(labels == i for i in PARSING_BACKGROUND).bool()


def largest_face(faces: list):
    return max(faces, key=lambda f: f.area) if faces else None


def pulid_faces(images: torch.Tensor, analyzer, parsing: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                name: str = "face analysis") -> PuLIDFaces:
    """ArcFace embeddings and background-free grey faces of the photos (B, H, W, 3) in [0, 1].

    ``parsing``: a function (B, 3, 512, 512) RGB in [0, 1] -> class indices (B, 1, 512, 512) of a
    BiSeNet-style face parser; without it the landmark outline is the face."""
    arcface, crops, backgrounds, kept, skipped = [], [], [], [], []
    for index, photo in enumerate(images):
        photo = photo[..., :3]
        face = largest_face(analyzer.detect(to_uint8(photo), with_embedding=True))
        if face is None:
            skipped.append(index)
            continue
        if face.embedding is None or face.embedding_kind != "arcface512":
            raise ValueError(f"PuLID-FLUX needs ArcFace embeddings, but {name} gives "
                             f"{face.embedding_kind or 'none'}: load an insightface pack (antelopev2), or the dlib "
                             "backend with antelopev2's glintr100.onnx, in Face Analysis Loader")
        matrix = estimate_similarity(np.asarray(face.keypoints5, dtype=np.float64), FFHQ_TEMPLATE_512)
        crops.append(warp_crop(photo.float(), matrix, FACE_SIZE).permute(2, 0, 1))
        if parsing is None:
            outline = transform_points(face_outline(face), matrix)
            backgrounds.append(render_mask(outline, FACE_SIZE) < 0.5)
        arcface.append(torch.from_numpy(np.asarray(face.embedding, dtype=np.float32)))
        kept.append(index)
    if not kept:
        raise NoFaceFoundError(f"{name} found no face in any of the {len(images)} photo(s) given to PuLID-FLUX")
    faces = torch.stack(crops)
    if parsing is not None:
        background = parsing_background(parsing(faces))
        how = "face parsing model"
    else:
        background = torch.stack(backgrounds)[:, None]
        how = "landmark outline"
    return PuLIDFaces(torch.stack(arcface), features_image(faces, background), kept, skipped, how)
