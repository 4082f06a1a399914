"""The identity similarity workflow in a real ComfyUI: scores and the report image."""
import json

from support.testing import images_of, load_workflow


def test_similarity_workflow_returns_scores_and_a_report(comfy):
    prompt = load_workflow("api/similarity.json", "Generated image.image=id_2.png", "Reference photo.image=id_1.png",
                           "CLIP vision.clip_name=omniid_random_clip_vit_h.safetensors")
    prompt["20"] = {"class_type": "LoadImage", "inputs": {"image": "no_face.png"}}
    prompt["21"] = {"class_type": "ImageBatch", "inputs": {"image1": ["1", 0], "image2": ["20", 0]}}
    prompt["22"] = {"class_type": "LoadImage", "inputs": {"image": "id_3.png"}}
    prompt["23"] = {"class_type": "ImageBatch", "inputs": {"image1": ["2", 0], "image2": ["22", 0]}}
    prompt["5"]["inputs"].update(images=["21", 0], reference_images=["23", 0])
    result = comfy.run(prompt, timeout=600)
    text = result.outputs["5"]["text"][0]
    assert "ID similarity (dlib128)" in text and "no face found in generated image(s) 2" in text
    assert "CLIP-I: mean" in text
    report = images_of(comfy, result, "6")[0]
    assert report.shape[0] > 400 and report.shape[1] >= 2 * 192


def test_similarity_scores_as_a_string_output(comfy):
    prompt = load_workflow("api/similarity.json", "Generated image.image=id_5.png", "Reference photo.image=id_1.png",
                           "CLIP vision.clip_name=omniid_random_clip_vit_h.safetensors")
    prompt["30"] = {"class_type": "PreviewAny", "inputs": {"source": ["5", 2]}}
    result = comfy.run(prompt, timeout=600)
    scores = json.loads(result.outputs["30"]["text"][0])
    identity = scores["id_similarity"]
    assert identity["same_person"] == [True] and identity["per_image"][0] > 0.4          # a mirror image of id_1
    assert len(scores["clip_i"]["per_image"]) == 1
