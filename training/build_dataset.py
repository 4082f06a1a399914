"""Building an identity dataset from photos or video frames (Omni-ID's MFHQ pipeline, Fig. II).

1. detect faces, with a descriptor and a head pose each;
2. split identities: a face joins the identity whose centre it resembles most if the
   similarity clears the same-person threshold, else starts a new identity;
3. drop faces smaller than the crop size in the source (MFHQ's faces are 448 px or more:
   a face is dropped rather than upscaled; ``min_face_size`` relaxes it), then the
   lowest-quality 20% of each identity (quality: sharpness of the aligned crop; the paper
   uses a learned quality estimator, TOPIQ, which no bundled model provides);
4. cluster the head poses (yaw, pitch, roll) into 16 with k-means;
5. take 8 faces, at most one per pose cluster, each pair's sum of absolute pose differences
   (yaw, pitch and roll) above 15 degrees (the sharpest of each cluster first);
6. write the aligned crops as ``<out>/<identity>/<n>.png``. Identities that cannot give
   enough faces are reported and left out, and so is every dropped face's reason.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch

from ..encoders.face.crop import align_face, to_uint8
from .metrics import THRESHOLDS, pairwise_similarity


@dataclass
class BuildSettings:
    photos_per_identity: int = 8
    pose_clusters: int = 16
    min_pose_difference: float = 15.0     # degrees between any two chosen faces
    drop_fraction: float = 0.2
    similarity_threshold: Optional[float] = None    # None: the backend's same-person threshold
    crop_size: int = 448
    padding: float = 0.25
    seed: int = 0
    min_face_size: int = 448              # source pixels across the crop; smaller faces are dropped, 0 keeps all


@dataclass
class FaceEntry:
    image_index: int
    face: object
    embedding: np.ndarray
    pose: np.ndarray                      # yaw, pitch, roll in degrees
    quality: float = 0.0
    crop: Optional[torch.Tensor] = None
    source_size: float = 0.0              # source pixels the crop spans


@dataclass
class BuildReport:
    identities: list[dict] = field(default_factory=list)
    left_out: list[dict] = field(default_factory=list)
    images_without_face: list[int] = field(default_factory=list)
    faces: int = 0
    too_small: list[dict] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"faces": self.faces, "identities": self.identities, "left_out": self.left_out,
                "images_without_face": self.images_without_face, "dropped_too_small": len(self.too_small),
                "too_small": self.too_small}


def sharpness(crop: torch.Tensor) -> float:
    """Variance of the Laplacian of the grey crop (H, W, 3)."""
    grey = crop[..., :3].float().mean(-1)
    lap = grey[1:-1, 1:-1] * 4 - grey[:-2, 1:-1] - grey[2:, 1:-1] - grey[1:-1, :-2] - grey[1:-1, 2:]
    return float(lap.var())


def group_identities(entries: list[FaceEntry], kind: str, threshold: float) -> list[list[FaceEntry]]:
    groups: list[list[FaceEntry]] = []
    centres: list[np.ndarray] = []
    for entry in entries:
        if centres:
            scores = pairwise_similarity(entry.embedding[None], np.stack(centres), kind)[0]
            best = int(np.argmax(scores))
            if scores[best] > threshold:
                groups[best].append(entry)
                members = np.stack([e.embedding for e in groups[best]])
                centres[best] = members.mean(0)
                continue
        groups.append([entry])
        centres.append(entry.embedding.astype(np.float64))
    return groups


def kmeans(points: np.ndarray, k: int, seed: int = 0, iterations: int = 50) -> np.ndarray:
    """Labels of a plain k-means (k-means++ start) over (N, D) points."""
    rng = np.random.default_rng(seed)
    k = min(k, len(points))
    centres = [points[rng.integers(len(points))]]
    for _ in range(1, k):
        d = np.min(((points[:, None] - np.array(centres)[None]) ** 2).sum(-1), 1)
        centres.append(points[rng.choice(len(points), p=d / d.sum())] if d.sum() > 0 else points[rng.integers(len(points))])
    centres = np.array(centres, dtype=np.float64)
    labels = np.zeros(len(points), dtype=np.int64)
    for _ in range(iterations):
        labels = np.argmin(((points[:, None] - centres[None]) ** 2).sum(-1), 1)
        moved = np.array([points[labels == c].mean(0) if (labels == c).any() else centres[c] for c in range(k)])
        if np.allclose(moved, centres):
            break
        centres = moved
    return labels


def pose_difference(a: np.ndarray, b: np.ndarray) -> float:
    """Sum of absolute differences of yaw, pitch and roll, in degrees."""
    return float(np.abs(np.asarray(a[:3], dtype=np.float64) - np.asarray(b[:3], dtype=np.float64)).sum())


def choose_by_pose(entries: list[FaceEntry], settings: BuildSettings) -> list[FaceEntry]:
    """Up to photos_per_identity faces, at most one per pose cluster, every pair's pose difference
    (``pose_difference``) above min_pose_difference."""
    poses = np.stack([e.pose[:3] for e in entries])
    labels = kmeans(poses, settings.pose_clusters, settings.seed)
    clusters = {}
    for label, entry in sorted(zip(labels, entries), key=lambda pair: -pair[1].quality):
        clusters.setdefault(int(label), []).append(entry)
    chosen: list[FaceEntry] = []
    for members in sorted(clusters.values(), key=lambda m: -m[0].quality):
        for entry in members:
            if all(pose_difference(entry.pose, c.pose) > settings.min_pose_difference for c in chosen):
                chosen.append(entry)
                break
        if len(chosen) == settings.photos_per_identity:
            break
    return chosen


def build_dataset(images: torch.Tensor, analyzer, out_dir: str | Path, settings: BuildSettings = BuildSettings(),
                  on_image: Optional[Callable[[int], None]] = None) -> BuildReport:
    """Detect, group, filter and write identities from an IMAGE batch (photos or video frames)."""
    report = BuildReport()
    entries: list[FaceEntry] = []
    kind = None
    for index in range(images.shape[0]):
        faces = analyzer.detect(to_uint8(images[index]), with_embedding=True)
        usable = [f for f in faces if f.embedding is not None and f.pose is not None]
        if not usable:
            report.images_without_face.append(index)
        for face in usable:
            kind = kind or face.embedding_kind
            crop, _, matrix = align_face(images[index], face, settings.crop_size, settings.padding)
            scale = float(np.sqrt(abs(np.linalg.det(matrix[:, :2]))))          # crop pixels per source pixel
            source_size = settings.crop_size / max(scale, 1e-6)
            if source_size < settings.min_face_size:
                report.too_small.append({"image": index, "face_size": round(source_size, 1)})
                continue
            entries.append(FaceEntry(index, face, np.asarray(face.embedding, dtype=np.float64),
                                     np.asarray(face.pose, dtype=np.float64),
                                     quality=sharpness(crop) * min(1.0, 1.0 / max(scale, 1e-6)), crop=crop,
                                     source_size=source_size))
        if on_image is not None:
            on_image(index)
    report.faces = len(entries) + len(report.too_small)
    if not entries:
        return report
    threshold = settings.similarity_threshold if settings.similarity_threshold is not None else THRESHOLDS[kind]
    out_dir = Path(out_dir)
    for number, group in enumerate(group_identities(entries, kind, threshold)):
        kept = sorted(group, key=lambda e: -e.quality)
        kept = kept[:max(1, int(round(len(kept) * (1 - settings.drop_fraction))))]
        chosen = choose_by_pose(kept, settings)
        name = f"identity_{number:04d}"
        info = {"name": name, "faces": len(group), "after_quality_filter": len(kept), "chosen": len(chosen),
                "images": sorted(e.image_index for e in chosen)}
        if len(chosen) < settings.photos_per_identity:
            info["reason"] = (f"only {len(chosen)} faces with poses {settings.min_pose_difference:g} degrees apart "
                              f"(needs {settings.photos_per_identity})")
            report.left_out.append(info)
            continue
        folder = out_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        from PIL import Image
        for n, entry in enumerate(chosen):
            Image.fromarray(to_uint8(entry.crop)).save(folder / f"{n:02d}.png")
        info["poses"] = [[round(float(a), 1) for a in e.pose[:3]] for e in chosen]
        report.identities.append(info)
    return report
