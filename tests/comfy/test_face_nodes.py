"""FaceAnalysisLoader -> FaceCrop on real photos, queued over ComfyUI's HTTP API."""
import numpy as np
import pytest

from omniid.encoders.face import create_analyzer, template_points
from omniid.cli.client import ExecutionFailed, PromptRejected
from support.testing import images_of, load_workflow


@pytest.fixture(scope="module")
def dlib_analyzer():
    return create_analyzer("dlib")


def test_face_crop_aligns_an_uploaded_photo(comfy, photos, dlib_analyzer):
    name = comfy.upload_image(photos / "obama2.jpg")
    prompt = load_workflow("api/face_crop.json", f"Photo.image={name}", "Face crop.crop_size=256")
    result = comfy.run(prompt, timeout=300)
    crops, masks, previews = (images_of(comfy, result, n) for n in ("4", "6", "7"))
    assert len(crops) == len(masks) == len(previews) == 1
    crop = crops[0]
    assert crop.shape == (256, 256, 3) and masks[0].shape == (256, 256, 3)
    assert masks[0][128, 128, 0] == 255 and masks[0][3, 3, 0] == 0
    width, height = 626, 1200
    assert previews[0].shape[:2] in ((height, width), (width, height))
    faces = dlib_analyzer.detect(crop, with_embedding=False)
    assert len(faces) == 1
    error = np.linalg.norm(faces[0].keypoints5[:2] - template_points(256, 0.25)[:2], axis=1)
    assert error.max() < 6.0, f"eye centres {error} px from the template"


def test_rgba_photo_is_cropped(comfy):
    result = comfy.run(load_workflow("api/face_crop.json", "Photo.image=32bit.png"), timeout=300)
    assert images_of(comfy, result, "4")[0].shape == (224, 224, 3)


def test_no_face_is_a_clear_error_and_the_server_serves_on(comfy):
    with pytest.raises(ExecutionFailed) as failure:
        comfy.run(load_workflow("api/face_crop.json", "Photo.image=cat.png"), timeout=300)
    error = failure.value.error
    assert error["node_type"] == "OmniIdentityFaceCrop"
    assert "No face found in any of the 1 input image(s)" in error["exception_message"]
    assert "det_size" in error["exception_message"]
    assert comfy.system_stats()["system"]["comfyui_version"]
    result = comfy.run(load_workflow("api/face_crop.json", "Photo.image=biden.jpg"), timeout=300)
    assert len(images_of(comfy, result, "4")) == 1


def test_faceless_image_in_a_batch_is_skipped_with_a_warning(comfy, comfy_server):
    prompt = load_workflow("api/face_crop.json", "Photo.image=obama.jpg")
    prompt["20"] = {"class_type": "LoadImage", "inputs": {"image": "cat.png"}}
    prompt["21"] = {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["20", 0]}}
    prompt["3"]["inputs"]["image"] = ["21", 0]
    result = comfy.run(prompt, timeout=300)
    assert len(images_of(comfy, result, "4")) == 1
    assert len(images_of(comfy, result, "7")) == 2                     # the preview shows both inputs
    assert "FaceCrop: no face found in image 2 of 2; skipped it" in comfy_server.log_text()


def test_all_faces_of_a_batch(comfy):
    prompt = load_workflow("api/face_crop.json", "Photo.image=obama.jpg", "Face crop.selection=all")
    prompt["20"] = {"class_type": "LoadImage", "inputs": {"image": "obama2.jpg"}}
    prompt["21"] = {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["20", 0]}}
    prompt["3"]["inputs"]["image"] = ["21", 0]
    result = comfy.run(prompt, timeout=300)
    assert len(images_of(comfy, result, "4")) == 2


def test_missing_insightface_pack_names_the_folder(comfy, comfy_server):
    prompt = load_workflow("api/face_crop.json", "Photo.image=obama.jpg",
                           "Face analysis.backend=insightface/antelopev2")
    with pytest.raises(ExecutionFailed) as failure:
        comfy.run(prompt, timeout=300)
    error = failure.value.error
    assert error["node_type"] == "OmniIdentityFaceAnalysisLoader"
    expected = comfy_server.base_directory / "models" / "insightface" / "models" / "antelopev2"
    assert str(expected) in error["exception_message"]
    assert "Nothing is downloaded" in error["exception_message"]


def test_invalid_inputs_are_rejected_before_running(comfy):
    with pytest.raises(PromptRejected) as rejected:
        comfy.queue_prompt(load_workflow("api/face_crop.json", "Photo.image=obama.jpg",
                                         "Face crop.selection=random", "Face crop.crop_size=8",
                                         "Face analysis.backend=insightface/nope"))
    text = str(rejected.value)
    # The pack's own queue-time check (comfy_host/inputs.py) answers for every input, naming the
    # node, the input, the value and what is valid (ComfyUI leaves ranges and options to a node
    # whose validate_inputs takes **kwargs).
    assert "selection is 'random', not one of its options ['largest'" in text
    assert "crop_size is 8, outside its range; give a number from 64 to " in text
    assert "backend is 'insightface/nope', not one of its options ['dlib'" in text
