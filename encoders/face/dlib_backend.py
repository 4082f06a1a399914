"""The bundled backend: dlib's detectors, 68-point landmarks and 128-D descriptor.

dlib comes from the ``dlib-bin`` wheel (no compiler needed) and its weights from
the ``face_recognition_models`` package, both on PyPI; nothing is downloaded at
run time. The weight files are located through the import system rather than
``face_recognition_models``' own helper, which needs ``pkg_resources``.
"""
from __future__ import annotations

import importlib.util
import os

import numpy as np

from .landmarks import ibug68_to_kps5
from .pose import estimate_pose
from .types import BackendUnavailableError, DetectedFace

INSTALL_HINT = "pip install dlib-bin face_recognition_models"
DETECTORS = ("hog", "cnn")
WEIGHT_FILES = {
    "landmarks": "shape_predictor_68_face_landmarks.dat",
    "descriptor": "dlib_face_recognition_resnet_model_v1.dat",
    "cnn": "mmod_human_face_detector.dat",
}


def _import_dlib():
    try:
        import dlib
    except Exception as exc:  # a broken wheel raises more than ImportError
        raise BackendUnavailableError(
            f"The dlib face backend needs the 'dlib' module, which failed to import ({exc}). "
            f"Install it into ComfyUI's Python with: {INSTALL_HINT}") from exc
    return dlib


def weights_dir() -> str:
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError(
            "The dlib face backend needs the weights of the 'face_recognition_models' package, "
            f"which is not installed. Install it into ComfyUI's Python with: {INSTALL_HINT}")
    folder = os.path.join(list(spec.submodule_search_locations)[0], "models")
    missing = [f for f in WEIGHT_FILES.values() if not os.path.isfile(os.path.join(folder, f))]
    if missing:
        raise BackendUnavailableError(
            f"face_recognition_models is installed but lacks {', '.join(missing)} in {folder}. "
            f"Reinstall it with: pip install --force-reinstall face_recognition_models")
    return folder


class DlibFaceAnalyzer:
    """Detection (HOG or CNN), iBUG 68 landmarks and the 128-D dlib descriptor.

    ``det_size``: detection runs on a copy whose longer side is ``det_size``
    pixels; landmarks and descriptors then use the full-resolution image.
    ``recognizer``: an ArcFaceRecognizer; its 512-d ArcFace embedding then replaces
    dlib's 128-D descriptor.
    """

    def __init__(self, detector: str = "hog", det_size: int = 640, recognizer=None):
        if detector not in DETECTORS:
            raise ValueError(f"dlib detector must be one of {DETECTORS}, not {detector!r}")
        dlib = _import_dlib()
        folder = weights_dir()
        self.detector_kind = detector
        self.det_size = int(det_size)
        self.recognizer = recognizer
        self.name = f"dlib/{detector}" + (f"+{recognizer.name}" if recognizer is not None else "")
        if detector == "cnn":
            self._detector = dlib.cnn_face_detection_model_v1(os.path.join(folder, WEIGHT_FILES["cnn"]))
        else:
            self._detector = dlib.get_frontal_face_detector()
        self._predictor = dlib.shape_predictor(os.path.join(folder, WEIGHT_FILES["landmarks"]))
        self._descriptor = dlib.face_recognition_model_v1(os.path.join(folder, WEIGHT_FILES["descriptor"]))
        self._dlib = dlib

    def _detect_boxes(self, image: np.ndarray) -> list[tuple[np.ndarray, float]]:
        height, width = image.shape[:2]
        scale = self.det_size / max(height, width)
        small = image
        if abs(scale - 1.0) > 1e-3:
            from PIL import Image
            size = (max(1, round(width * scale)), max(1, round(height * scale)))
            small = np.asarray(Image.fromarray(image).resize(size, Image.BILINEAR))
        boxes = []
        if self.detector_kind == "cnn":
            for det in self._detector(small, 0):
                r = det.rect
                boxes.append((np.array([r.left(), r.top(), r.right(), r.bottom()], dtype=np.float64), float(det.confidence)))
        else:
            rects, scores, _ = self._detector.run(small, 0, 0.0)
            for r, s in zip(rects, scores):
                boxes.append((np.array([r.left(), r.top(), r.right(), r.bottom()], dtype=np.float64), float(s)))
        return [(box / scale, score) for box, score in boxes]

    def detect(self, image: np.ndarray, with_embedding: bool = True) -> list[DetectedFace]:
        image = np.ascontiguousarray(image, dtype=np.uint8)
        faces = []
        for box, score in self._detect_boxes(image):
            rect = self._dlib.rectangle(*(int(round(v)) for v in box))
            shape = self._predictor(image, rect)
            landmarks = np.array([(p.x, p.y) for p in shape.parts()], dtype=np.float64)
            keypoints5 = ibug68_to_kps5(landmarks)
            embedding, kind = None, None
            if with_embedding and self.recognizer is not None:
                embedding, kind = self.recognizer.embed(image, keypoints5), "arcface512"
            elif with_embedding:
                embedding = np.array(self._descriptor.compute_face_descriptor(image, shape), dtype=np.float32)
                kind = "dlib128"
            faces.append(DetectedFace(
                bbox=box, score=score, keypoints5=keypoints5, landmarks=landmarks,
                landmark_format="ibug68", embedding=embedding, embedding_kind=kind,
                pose=estimate_pose(landmarks, "ibug68")))
        return faces
