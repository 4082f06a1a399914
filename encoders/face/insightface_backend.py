"""The insightface backend: a model pack (antelopev2, buffalo_l, ...) run by onnxruntime.

insightface and onnxruntime are imported only when this backend is asked for, so
the pack loads, and the dlib backend works, when either is missing or broken.
Packs are folders ``<root>/models/<name>/`` holding the pack's ``.onnx`` files;
nothing is ever downloaded (insightface's own downloader is never reached, because
the folder is checked before insightface sees it).
"""
from __future__ import annotations

import glob
import os

import numpy as np

from .pose import estimate_pose
from .types import BackendUnavailableError, DetectedFace

INSTALL_HINT = ("pip install -r requirements-insightface.txt from the pack's folder (insightface 0.7.3 compiles C++: "
                "it needs a compiler; and onnxruntime-gpu, or onnxruntime on macOS/ARM or if another pack "
                "already installed it)")
KNOWN_PACKS = ("antelopev2", "buffalo_l")
PROVIDERS = {
    "CPU": "CPUExecutionProvider",
    "CUDA": "CUDAExecutionProvider",
    "ROCm": "ROCMExecutionProvider",
    "CoreML": "CoreMLExecutionProvider",
    "DirectML": "DmlExecutionProvider",
}


def offline_environment(library_dir: str | None = None) -> None:
    """Before importing insightface: no update check over the network (albumentations, which insightface
    imports, asks PyPI for a newer version at import unless told not to), and matplotlib's config and
    font cache in ``library_dir`` instead of the user's home. Values the user set are kept."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")
    if library_dir:
        os.makedirs(library_dir, exist_ok=True)
        os.environ.setdefault("MPLCONFIGDIR", library_dir)


def _import_insightface(library_dir: str | None = None):
    offline_environment(library_dir)
    try:
        from insightface.app import FaceAnalysis
    except Exception as exc:  # missing, or broken (numpy ABI, onnxruntime clash, ...)
        raise BackendUnavailableError(
            f"The insightface face backend could not import insightface ({type(exc).__name__}: {exc}). "
            f"Install it into ComfyUI's Python with: {INSTALL_HINT}. "
            "The bundled 'dlib' backend works without it.") from exc
    return FaceAnalysis


def list_packs(roots: list[str]) -> list[str]:
    """Names of the packs found under ``<root>/models/`` for each root."""
    names = set()
    for root in roots:
        for folder in glob.glob(os.path.join(root, "models", "*")):
            if os.path.isdir(folder) and glob.glob(os.path.join(folder, "*.onnx")):
                names.add(os.path.basename(folder))
    return sorted(names)


def find_pack(name: str, roots: list[str]) -> str:
    """The root holding pack ``name``; a clear error naming the folders otherwise."""
    for root in roots:
        if glob.glob(os.path.join(root, "models", name, "*.onnx")):
            return root
    wanted = " or ".join(os.path.join(r, "models", name) for r in roots) or f"models/insightface/models/{name}"
    raise BackendUnavailableError(
        f"insightface pack '{name}' not found: place its .onnx files (detection, landmarks, "
        f"recognition) in {wanted}. Nothing is downloaded automatically.")


class InsightFaceAnalyzer:
    def __init__(self, pack: str, roots: list[str], provider: str = "CPU", det_size: int = 640,
                 det_thresh: float = 0.5, library_dir: str | None = None):
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {sorted(PROVIDERS)}, not {provider!r}")
        face_analysis_cls = _import_insightface(library_dir)
        root = find_pack(pack, roots)
        try:
            app = face_analysis_cls(name=pack, root=root, providers=[PROVIDERS[provider]])
        except AssertionError as exc:
            raise BackendUnavailableError(
                f"insightface pack '{pack}' in {os.path.join(root, 'models', pack)} has no face "
                "detection model (e.g. scrfd_10g_bnkps.onnx or det_10g.onnx).") from exc
        app.prepare(ctx_id=-1 if provider == "CPU" else 0, det_thresh=det_thresh,
                    det_size=(int(det_size), int(det_size)))
        self._app = app
        self.name = f"insightface/{pack}"

    def detect(self, image: np.ndarray, with_embedding: bool = True) -> list[DetectedFace]:
        bgr = np.ascontiguousarray(np.asarray(image, dtype=np.uint8)[..., ::-1])
        return [convert_insightface_face(face) for face in self._app.get(bgr)]


def image_frame_3d(points: np.ndarray) -> np.ndarray:
    """68 3D landmarks with z pointing into the scene (the right-handed image frame: x right, y down).

    insightface's 1k3d68 gives z in pixels; whichever way it points, the nose tip (point 30) is
    nearer the camera than the jaw ends (points 0 and 16), which fixes the sign."""
    points = np.asarray(points, dtype=np.float64).copy()
    if points[30, 2] > points[[0, 16], 2].mean():
        points[:, 2] = -points[:, 2]
    return points


def convert_insightface_face(face) -> DetectedFace:
    """insightface's Face (a dict with attribute access) to our record."""
    kps = np.asarray(face.kps, dtype=np.float64)
    lm68 = face.get("landmark_3d_68")
    landmarks_3d = None
    if lm68 is not None:
        landmarks, fmt = np.asarray(lm68, dtype=np.float64)[:, :2], "ibug68"
        landmarks_3d = image_frame_3d(lm68)
    else:
        landmarks, fmt = kps, "kps5"
    embedding = face.get("embedding")
    if embedding is not None:
        embedding = np.asarray(embedding, dtype=np.float32)
    return DetectedFace(
        bbox=np.asarray(face.bbox, dtype=np.float64), score=float(face.det_score),
        keypoints5=kps, landmarks=landmarks, landmark_format=fmt, embedding=embedding,
        embedding_kind="arcface512" if embedding is not None else None,
        pose=estimate_pose(landmarks, fmt), landmarks_3d=landmarks_3d)



class ArcFaceRecognizer:
    """An ArcFace ONNX model (112 x 112 in, 512-d out) run through insightface's model zoo.

    Gives ArcFace embeddings for faces another backend found (the dlib backend with an
    ``arcface_model``): the face is aligned from its five keypoints by insightface
    itself, exactly as inside an insightface pack.
    """

    def __init__(self, onnx_path: str, provider: str = "CPU", library_dir: str | None = None):
        if provider not in PROVIDERS:
            raise ValueError(f"provider must be one of {sorted(PROVIDERS)}, not {provider!r}")
        _import_insightface(library_dir)
        from insightface.app.common import Face
        from insightface.model_zoo import get_model
        if not os.path.isfile(onnx_path):
            raise BackendUnavailableError(f"ArcFace model not found: {onnx_path}")
        model = get_model(onnx_path, providers=[PROVIDERS[provider]])
        if model is None or getattr(model, "taskname", None) != "recognition":
            raise BackendUnavailableError(
                f"{onnx_path} is not an ArcFace recognition model (expected a square input of 112 px "
                "or more and a 512-d embedding output)")
        model.prepare(ctx_id=-1 if provider == "CPU" else 0)
        self._model, self._face = model, Face
        self.name = os.path.basename(onnx_path)

    def embed(self, image: np.ndarray, keypoints5: np.ndarray) -> np.ndarray:
        bgr = np.ascontiguousarray(np.asarray(image, dtype=np.uint8)[..., ::-1])
        face = self._face(kps=np.asarray(keypoints5, dtype=np.float32))
        return np.asarray(self._model.get(bgr, face), dtype=np.float32).reshape(-1)
