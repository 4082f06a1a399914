"""Face analysis: detection, landmarks, descriptors, pose, alignment and crops."""
from functools import lru_cache

from .alignment import ARCFACE_TEMPLATE_112, estimate_similarity, template_points, transform_points
from .crop import SELECTIONS, CropResult, crop_faces, draw_faces
from .regions import face_region, overlapping_pairs
from .types import (BackendUnavailableError, DetectedFace, FaceAnalysisError, FaceAnalyzer,
                    FaceRecord, FaceSet, NoFaceFoundError)


def create_analyzer(backend: str, *, det_size: int = 640, provider: str = "CPU",
                    dlib_detector: str = "hog", insightface_roots: list[str] | None = None,
                    arcface_model: str | None = None, library_dir: str | None = None):
    """A backend by name: ``dlib`` or ``insightface/<pack>``.

    ``arcface_model`` (dlib only): path of an ArcFace ONNX whose embeddings replace
    dlib's descriptor. ``library_dir``: where insightface's libraries may keep their caches
    (nothing is written to the user's home, nothing is fetched over the network).
    """
    if backend == "dlib":
        from .dlib_backend import DlibFaceAnalyzer
        recognizer = None
        if arcface_model:
            from .insightface_backend import ArcFaceRecognizer
            recognizer = ArcFaceRecognizer(arcface_model, provider=provider, library_dir=library_dir)
        return DlibFaceAnalyzer(detector=dlib_detector, det_size=det_size, recognizer=recognizer)
    if backend.startswith("insightface/"):
        from .insightface_backend import InsightFaceAnalyzer
        return InsightFaceAnalyzer(backend.split("/", 1)[1], insightface_roots or [],
                                   provider=provider, det_size=det_size, library_dir=library_dir)
    raise ValueError(f"unknown face backend {backend!r}: use 'dlib' or 'insightface/<pack name>'")


def overlap_warnings(faces: FaceSet) -> list[str]:
    """One line per pair of kept faces whose regions overlap in their image (never merged silently)."""
    notes = []
    for index in sorted({r.image_index for r in faces.records}):
        numbers = [n for n, r in enumerate(faces.records) if r.image_index == index]
        height, width = faces.image_sizes[index]
        regions = [face_region(faces.records[n].face, height, width) for n in numbers]
        for i, j, share in overlapping_pairs(regions):
            notes.append(f"faces {numbers[i] + 1} and {numbers[j] + 1} of image {index + 1} overlap "
                         f"({share:.0%} of the smaller); their identities would mix there")
    return notes


@lru_cache(maxsize=1)
def bundled_analyzer():
    """The bundled dlib backend (HOG detector, 68 landmarks), loaded once: for nodes that need a face
    when the user connected no face analysis."""
    return create_analyzer("dlib")


__all__ = [
    "ARCFACE_TEMPLATE_112", "BackendUnavailableError", "CropResult", "DetectedFace",
    "FaceAnalysisError", "FaceAnalyzer", "FaceRecord", "FaceSet", "NoFaceFoundError",
    "SELECTIONS", "bundled_analyzer", "create_analyzer", "crop_faces", "draw_faces", "estimate_similarity",
    "face_region", "overlap_warnings", "overlapping_pairs",
    "template_points", "transform_points",
]
