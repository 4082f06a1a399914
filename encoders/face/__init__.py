"""Face analysis: detection, landmarks, descriptors, pose, alignment and crops."""
from functools import lru_cache

from .alignment import ARCFACE_TEMPLATE_112, estimate_similarity, template_points, transform_points
from .crop import SELECTIONS, CropResult, crop_faces, draw_faces
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


@lru_cache(maxsize=1)
def bundled_analyzer():
    """The bundled dlib backend (HOG detector, 68 landmarks), loaded once: for nodes that need a face
    when the user connected no face analysis."""
    return create_analyzer("dlib")


__all__ = [
    "ARCFACE_TEMPLATE_112", "BackendUnavailableError", "CropResult", "DetectedFace",
    "FaceAnalysisError", "FaceAnalyzer", "FaceRecord", "FaceSet", "NoFaceFoundError",
    "SELECTIONS", "bundled_analyzer", "create_analyzer", "crop_faces", "draw_faces", "estimate_similarity",
    "template_points", "transform_points",
]
