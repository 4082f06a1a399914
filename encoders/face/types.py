"""Data records shared by every face-analysis backend.

Coordinates are pixels of the image the face was found in, x to the right, y down.
``keypoints5`` always follows insightface's order, whatever the backend:
eye on the image's left, eye on the image's right, nose tip, mouth corner on the
image's left, mouth corner on the image's right.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Protocol

import numpy as np


class FaceAnalysisError(RuntimeError):
    """A face-analysis problem the user can act on; the message says how."""


class BackendUnavailableError(FaceAnalysisError):
    """A backend's Python package or model files are missing or broken."""


class NoFaceFoundError(FaceAnalysisError):
    """No face was left after detection over a whole batch."""


@dataclass
class DetectedFace:
    bbox: np.ndarray                      # (4,) x0, y0, x1, y1
    score: float
    keypoints5: np.ndarray                # (5, 2)
    landmarks: np.ndarray                 # (K, 2); K = 68 (iBUG order) or 5
    landmark_format: str                  # "ibug68" or "kps5"
    embedding: Optional[np.ndarray] = None
    embedding_kind: Optional[str] = None  # "dlib128" or "arcface512"
    pose: Optional[np.ndarray] = None     # (3,) yaw, pitch, roll in degrees
    landmarks_3d: Optional[np.ndarray] = None   # (68, 3) iBUG, image frame: x right, y down, z into the scene (px)

    @property
    def area(self) -> float:
        x0, y0, x1, y1 = (float(v) for v in self.bbox)
        return max(0.0, x1 - x0) * max(0.0, y1 - y0)


@dataclass
class FaceRecord:
    """One face that FaceCrop kept: where it came from and how it was cropped."""
    image_index: int
    face: DetectedFace
    crop_matrix: np.ndarray               # (2, 3) source pixels -> crop pixels
    crop_size: int

    def to_dict(self) -> dict:
        f = self.face
        out = {
            "image_index": self.image_index,
            "bbox": [round(float(v), 2) for v in f.bbox],
            "score": round(float(f.score), 4),
            "keypoints5": np.round(f.keypoints5, 2).tolist(),
            "landmark_format": f.landmark_format,
            "crop_size": self.crop_size,
            "crop_matrix": np.round(self.crop_matrix, 6).tolist(),
        }
        if f.pose is not None:
            out["pose"] = dict(zip(("yaw", "pitch", "roll"), (round(float(a), 2) for a in f.pose)))
        if f.embedding_kind is not None:
            out["embedding_kind"] = f.embedding_kind
        return out


@dataclass
class FaceSet:
    """The FACES value: the faces kept over a batch, in the order of the crops."""
    records: list[FaceRecord]
    image_sizes: list[tuple[int, int]]    # (height, width) per input image
    skipped_images: list[int] = field(default_factory=list)
    backend: str = ""

    def __len__(self) -> int:
        return len(self.records)

    def to_dict(self) -> dict:
        return {
            "backend": self.backend,
            "image_sizes": [list(s) for s in self.image_sizes],
            "skipped_images": list(self.skipped_images),
            "faces": [r.to_dict() for r in self.records],
        }


class FaceAnalyzer(Protocol):
    """What every backend provides. ``image`` is an RGB uint8 array (H, W, 3)."""
    name: str

    def detect(self, image: np.ndarray, with_embedding: bool = True) -> list[DetectedFace]:
        ...
