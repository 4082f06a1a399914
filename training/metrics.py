"""Identity and prompt metrics: ID similarity, CLIP-T, CLIP-I (pure numpy / torch).

ID similarity compares face embeddings of generated images with those of references:
- ArcFace (insightface, 512-d): cosine similarity, the papers' "ID Sim" / "SIM";
- dlib (128-D, the bundled backend): 1 - Euclidean distance, so dlib's documented
  same-person rule (distance < 0.6) reads similarity > 0.4.
Either way an image scores 1 against itself. A generated image's score is its mean over
the references; images without a face are reported, not scored.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

# same-person thresholds on the similarity above
THRESHOLDS = {"arcface512": 0.35, "dlib128": 0.4}


def pairwise_similarity(a: np.ndarray, b: np.ndarray, kind: str) -> np.ndarray:
    """(len(a), len(b)) similarities between embedding rows of one kind."""
    a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
    b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)
    if kind == "dlib128":
        return 1.0 - np.linalg.norm(a[:, None, :] - b[None, :, :], axis=-1)
    if kind == "arcface512":
        a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
        b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
        return a @ b.T
    raise ValueError(f"unknown face embedding kind {kind!r}: expected one of {sorted(THRESHOLDS)}")


@dataclass
class IdentityReport:
    kind: str
    per_image: list[Optional[float]]            # None where no face was found
    threshold: float
    reference_count: int
    notes: list[str] = field(default_factory=list)

    @property
    def scored(self) -> list[float]:
        return [s for s in self.per_image if s is not None]

    @property
    def mean(self) -> float:
        return float(np.mean(self.scored)) if self.scored else math.nan

    @property
    def std(self) -> float:
        return float(np.std(self.scored)) if self.scored else math.nan

    @property
    def same_person(self) -> list[Optional[bool]]:
        return [None if s is None else bool(s > self.threshold) for s in self.per_image]

    def to_dict(self) -> dict:
        return {"kind": self.kind, "per_image": self.per_image, "mean": _finite(self.mean), "std": _finite(self.std),
                "threshold": self.threshold, "same_person": self.same_person,
                "references": self.reference_count, "notes": self.notes}


def _finite(value: float):
    return None if value is None or not math.isfinite(value) else value


def identity_report(generated: Sequence[Optional[np.ndarray]], references: Sequence[np.ndarray],
                    kind: str) -> IdentityReport:
    """Score each generated face embedding (None = no face) against every reference embedding."""
    if not len(references):
        raise ValueError("no reference face: at least one reference image must show a face")
    refs = np.stack(references)
    scores = [None if g is None else float(pairwise_similarity(np.asarray(g)[None], refs, kind).mean())
              for g in generated]
    missing = [i + 1 for i, g in enumerate(generated) if g is None]
    notes = [f"no face found in generated image(s) {', '.join(map(str, missing))}"] if missing else []
    return IdentityReport(kind, scores, THRESHOLDS[kind], len(references), notes)


def clip_image_similarity(generated: torch.Tensor, references: torch.Tensor) -> torch.Tensor:
    """CLIP-I: mean cosine of each generated image embedding (G, D) with the references (R, D)."""
    return (F.normalize(generated.float(), dim=-1) @ F.normalize(references.float(), dim=-1).T).mean(dim=-1)


def clip_text_similarity(images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
    """CLIP-T: cosine of each image embedding (G, D) with its prompt's text embedding ((G or 1), D)."""
    if images.shape[-1] != texts.shape[-1]:
        raise ValueError(f"CLIP-T needs image and text embeddings from one CLIP model; widths "
                         f"{images.shape[-1]} and {texts.shape[-1]} differ")
    return (F.normalize(images.float(), dim=-1) * F.normalize(texts.float(), dim=-1)).sum(dim=-1)


def summarize(values) -> dict:
    values = [float(v) for v in values]
    if not values:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "n": len(values)}


def face_embeddings(images: torch.Tensor, analyzer) -> tuple[list[Optional[np.ndarray]], Optional[str]]:
    """The largest face's embedding per image (None where no face), and the embedding kind."""
    from ..encoders.face.crop import to_uint8
    embeddings, kinds = [], set()
    for image in images:
        faces = analyzer.detect(to_uint8(image), with_embedding=True)
        if not faces:
            embeddings.append(None)
            continue
        face = max(faces, key=lambda f: f.area)
        embeddings.append(face.embedding)
        kinds.add(face.embedding_kind)
    if len(kinds) > 1:
        raise ValueError(f"mixed face embedding kinds {sorted(kinds)}")
    return embeddings, (kinds.pop() if kinds else None)
