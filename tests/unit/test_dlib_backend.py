"""The bundled dlib backend on real photos (face_recognition's test images)."""
import numpy as np
import pytest

from omniid.encoders.face import create_analyzer
from omniid.encoders.face.landmarks import ibug68_to_kps5
from support.assets import load_photo as load_rgb


@pytest.fixture(scope="module")
def analyzer():
    return create_analyzer("dlib")


def test_one_face_with_68_landmarks_and_a_descriptor(analyzer, photos):
    faces = analyzer.detect(load_rgb(photos / "obama.jpg"))
    assert len(faces) == 1
    face = faces[0]
    assert face.landmarks.shape == (68, 2) and face.landmark_format == "ibug68"
    assert face.embedding.shape == (128,) and face.embedding_kind == "dlib128"
    x0, y0, x1, y1 = face.bbox
    assert np.all((face.keypoints5 > [x0, y0]) & (face.keypoints5 < [x1, y1]))
    np.testing.assert_allclose(face.keypoints5, ibug68_to_kps5(face.landmarks))
    left_eye, right_eye = face.keypoints5[0], face.keypoints5[1]
    assert left_eye[0] < right_eye[0]                      # kps5 order: image-left eye first
    assert abs(face.pose[0]) < 20 and abs(face.pose[2]) < 15   # a near-frontal portrait


def test_descriptor_separates_people(analyzer, photos):
    """Same person < 0.6 < different people (dlib's documented threshold)."""
    def descriptor(name):
        return analyzer.detect(load_rgb(photos / name))[0].embedding

    obama = descriptor("obama.jpg")
    for other in ("obama2.jpg", "obama3.jpg"):
        assert np.linalg.norm(obama - descriptor(other)) < 0.6
    assert np.linalg.norm(obama - descriptor("biden.jpg")) > 0.6


def test_no_face_in_a_cat_photo(analyzer, no_face_photo):
    assert analyzer.detect(load_rgb(no_face_photo)) == []


def test_det_size_controls_the_detection_resolution(photos):
    """A face too small for HOG at det_size 128 is found at 640, at the same place."""
    image = load_rgb(photos / "obama.jpg")
    small = create_analyzer("dlib", det_size=128).detect(image)
    large = create_analyzer("dlib", det_size=640).detect(image)
    assert len(large) == 1 and len(small) == 0


def test_cnn_detector_finds_the_same_face(photos):
    image = load_rgb(photos / "obama.jpg")
    hog = create_analyzer("dlib").detect(image, with_embedding=False)[0]
    cnn = create_analyzer("dlib", dlib_detector="cnn").detect(image, with_embedding=False)[0]
    iod = np.linalg.norm(hog.keypoints5[1] - hog.keypoints5[0])
    assert np.abs(hog.keypoints5 - cnn.keypoints5).max() < 0.15 * iod


def test_unknown_backend_and_detector_are_clear_errors():
    with pytest.raises(ValueError, match="dlib.*insightface"):
        create_analyzer("mediapipe")
    with pytest.raises(ValueError, match="hog"):
        create_analyzer("dlib", dlib_detector="yolo")
