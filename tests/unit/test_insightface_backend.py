"""The insightface adapter, driven through a stand-in for insightface's FaceAnalysis.

No insightface model pack can be obtained here, so these tests replace the
``insightface.app`` module with a recording fake and check everything our code
does around it: pack discovery, provider mapping, BGR input, record conversion,
and the errors a user sees when insightface or a pack is missing.
"""
import importlib.abc
import sys
import types

import numpy as np
import pytest

from omniid.encoders.face import BackendUnavailableError, create_analyzer
from omniid.encoders.face.insightface_backend import list_packs
from omniid.encoders.face.pose import TEMPLATE_KPS5


class FakeFace(dict):
    __getattr__ = dict.get


class FakeFaceAnalysis:
    instances = []
    faces = []
    fail_without_detector = False

    def __init__(self, name, root, allowed_modules=None, **kwargs):
        if self.fail_without_detector:
            raise AssertionError
        self.name, self.root, self.kwargs = name, root, kwargs
        self.prepared = None
        self.seen = None
        FakeFaceAnalysis.instances.append(self)

    def prepare(self, ctx_id, det_thresh=0.5, det_size=(640, 640)):
        self.prepared = (ctx_id, det_thresh, det_size)

    def get(self, img, max_num=0):
        self.seen = img.copy()
        return list(self.faces)


@pytest.fixture
def fake_insightface(monkeypatch):
    package = types.ModuleType("insightface")
    app = types.ModuleType("insightface.app")
    app.FaceAnalysis = FakeFaceAnalysis
    package.app = app
    monkeypatch.setitem(sys.modules, "insightface", package)
    monkeypatch.setitem(sys.modules, "insightface.app", app)
    FakeFaceAnalysis.instances, FakeFaceAnalysis.faces = [], []
    FakeFaceAnalysis.fail_without_detector = False
    return FakeFaceAnalysis


@pytest.fixture
def pack_root(tmp_path):
    folder = tmp_path / "insightface" / "models" / "antelopev2"
    folder.mkdir(parents=True)
    (folder / "scrfd_10g_bnkps.onnx").write_bytes(b"")
    (tmp_path / "insightface" / "models" / "empty").mkdir()
    return tmp_path / "insightface"


def face_with(kps, **extra):
    return FakeFace(bbox=np.array([10.0, 20.0, 110.0, 150.0]), kps=kps, det_score=np.float32(0.93), **extra)


def test_packs_are_folders_holding_onnx_files(pack_root):
    assert list_packs([str(pack_root)]) == ["antelopev2"]
    assert list_packs([str(pack_root / "nowhere")]) == []


def test_provider_det_size_and_bgr_input(fake_insightface, pack_root):
    analyzer = create_analyzer("insightface/antelopev2", provider="CUDA", det_size=512,
                               insightface_roots=[str(pack_root)])
    fake = fake_insightface.instances[-1]
    assert fake.name == "antelopev2" and fake.root == str(pack_root)
    assert fake.kwargs["providers"] == ["CUDAExecutionProvider"]
    assert fake.prepared == (0, 0.5, (512, 512))
    rgb = np.zeros((8, 8, 3), np.uint8)
    rgb[..., 0] = 200                                     # red
    assert analyzer.detect(rgb) == []
    assert (fake.seen[..., 2] == 200).all() and (fake.seen[..., 0] == 0).all()   # handed over as BGR
    create_analyzer("insightface/antelopev2", insightface_roots=[str(pack_root)])
    assert fake_insightface.instances[-1].prepared[0] == -1                      # CPU -> ctx_id -1


def test_faces_convert_to_records(fake_insightface, pack_root):
    kps = TEMPLATE_KPS5[:, :2] * np.array([1.0, -1.0]) + 60.0
    embedding = np.arange(512, dtype=np.float32)
    lm68 = np.column_stack([np.linspace(10, 100, 68), np.linspace(20, 140, 68), np.zeros(68)])
    fake_insightface.faces = [face_with(kps, embedding=embedding), face_with(kps, landmark_3d_68=lm68)]
    plain, with_68 = create_analyzer("insightface/antelopev2", insightface_roots=[str(pack_root)]).detect(
        np.zeros((200, 200, 3), np.uint8))
    assert plain.landmark_format == "kps5" and plain.landmarks.shape == (5, 2)
    np.testing.assert_array_equal(plain.keypoints5, kps)
    assert plain.embedding_kind == "arcface512" and np.array_equal(plain.embedding, embedding)
    assert plain.score == pytest.approx(0.93) and isinstance(plain.score, float)
    np.testing.assert_allclose(plain.pose, [0, 0, 0], atol=1e-6)                # the template itself: frontal
    assert with_68.landmark_format == "ibug68" and with_68.landmarks.shape == (68, 2)
    assert with_68.embedding is None and with_68.embedding_kind is None


def test_missing_pack_names_the_folder_and_downloads_nothing(fake_insightface, pack_root):
    with pytest.raises(BackendUnavailableError, match=r"buffalo_l.*models/buffalo_l.*Nothing is downloaded"):
        create_analyzer("insightface/buffalo_l", insightface_roots=[str(pack_root)])
    with pytest.raises(BackendUnavailableError, match="empty"):
        create_analyzer("insightface/empty", insightface_roots=[str(pack_root)])
    assert fake_insightface.instances == []


def test_pack_without_detector(fake_insightface, pack_root):
    fake_insightface.fail_without_detector = True
    with pytest.raises(BackendUnavailableError, match="no face detection model"):
        create_analyzer("insightface/antelopev2", insightface_roots=[str(pack_root)])


def test_missing_insightface_says_what_to_install(monkeypatch, pack_root):
    monkeypatch.setitem(sys.modules, "insightface", None)
    monkeypatch.delitem(sys.modules, "insightface.app", raising=False)
    with pytest.raises(BackendUnavailableError, match=r"pip install -r requirements-insightface\.txt.*dlib"):
        create_analyzer("insightface/antelopev2", insightface_roots=[str(pack_root)])


def test_broken_insightface_is_reported_not_raised_raw(monkeypatch, pack_root):
    class Exploding(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name.split(".")[0] == "insightface":
                raise RuntimeError("numpy.dtype size changed, may indicate binary incompatibility")
            return None

    for name in [m for m in sys.modules if m.split(".")[0] == "insightface"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(sys, "meta_path", [Exploding(), *sys.meta_path])
    with pytest.raises(BackendUnavailableError, match="RuntimeError: numpy.dtype size changed"):
        create_analyzer("insightface/antelopev2", insightface_roots=[str(pack_root)])


def test_unknown_provider(fake_insightface, pack_root):
    with pytest.raises(ValueError, match="provider"):
        create_analyzer("insightface/antelopev2", provider="TPU", insightface_roots=[str(pack_root)])
