"""ArcFace embeddings for dlib-found faces through the real insightface + onnxruntime path.

The ArcFace ONNX is random (real ArcFace weights cannot be obtained here) but has
ArcFace's interface, so insightface's model zoo, its alignment and onnxruntime all run.
"""
import numpy as np
import pytest

from omniid.encoders.face import BackendUnavailableError, create_analyzer
from support.assets import load_photo, random_arcface_onnx

pytest.importorskip("insightface")
pytest.importorskip("onnxruntime")


@pytest.fixture(scope="module")
def arcface_onnx(tmp_path_factory):
    return random_arcface_onnx(tmp_path_factory.mktemp("arcface") / "random_arcface.onnx")


def test_dlib_with_an_arcface_model_gives_512_d_embeddings(arcface_onnx, photos):
    analyzer = create_analyzer("dlib", arcface_model=str(arcface_onnx))
    assert analyzer.name == "dlib/hog+random_arcface.onnx"
    face = analyzer.detect(load_photo(photos / "obama.jpg"))[0]
    assert face.embedding_kind == "arcface512" and face.embedding.shape == (512,)
    again = analyzer.detect(load_photo(photos / "obama.jpg"))[0]
    np.testing.assert_array_equal(face.embedding, again.embedding)          # deterministic
    other = analyzer.detect(load_photo(photos / "biden.jpg"))[0]
    assert np.abs(face.embedding - other.embedding).max() > 1e-4             # depends on the face


def test_embedding_follows_the_keypoints(arcface_onnx, photos):
    """insightface aligns from our keypoints: moving them changes the embedding."""
    from omniid.encoders.face.insightface_backend import ArcFaceRecognizer
    recognizer = ArcFaceRecognizer(str(arcface_onnx))
    image = load_photo(photos / "obama.jpg")
    kps = create_analyzer("dlib").detect(image, with_embedding=False)[0].keypoints5
    assert np.abs(recognizer.embed(image, kps) - recognizer.embed(image, kps + 25.0)).max() > 1e-4


def test_a_non_arcface_onnx_is_refused(tmp_path):
    import onnx
    from onnx import TensorProto, helper
    graph = helper.make_graph([helper.make_node("Relu", ["x"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 50, 60])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3, 50, 60])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "relu.onnx"))
    with pytest.raises(BackendUnavailableError, match="not an ArcFace recognition model"):
        create_analyzer("dlib", arcface_model=str(tmp_path / "relu.onnx"))
    with pytest.raises(BackendUnavailableError, match="not found"):
        create_analyzer("dlib", arcface_model=str(tmp_path / "absent.onnx"))
