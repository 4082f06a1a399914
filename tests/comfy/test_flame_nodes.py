"""FLAME nodes in a real ComfyUI on the synthetic FLAME: fit, landmark grid, ControlNet + adapter."""
import json

import numpy as np
import pytest

from omniid.cli.client import ComfyClient, ExecutionFailed, PromptRejected
from support.graph import Graph
from support.testing import images_of, load_workflow, populate_base, start_server

TINY = ("Checkpoint.ckpt_name=omniid_tiny_sd15.safetensors",
        "ControlNet.control_net_name=omniid_tiny_controlnet.safetensors",
        "CLIP vision.clip_name=omniid_random_clip_vit_h.safetensors",
        "Encoder.encoder_name=omniid_tiny_omni_id.safetensors",
        "Adapter.adapter_name=omniid_tiny_sd15_omni.safetensors",
        "Latent.width=64", "Latent.height=64", "Landmark grid.width=128", "Landmark grid.height=128",
        "Sampler.steps=2", "Sampler.sampler_name=euler", "Sampler.scheduler=normal")


def test_landmark_grid_drives_controlnet_and_adapter_to_nine_images(comfy):
    prompt = load_workflow("api/flame_controlnet_grid.json", "Identity photo.image=id_1.png", *TINY)
    result = comfy.run(prompt, timeout=900)
    images = images_of(comfy, result, "19")
    conditions = images_of(comfy, result, "20")
    assert len(images) == 9 and images[0].shape == (64, 64, 3)
    assert len(conditions) == 9 and conditions[0].shape == (128, 128, 3)
    for condition in conditions:
        values = set(np.unique(condition).tolist())
        assert values == {0, 255} and 70 * 3 < (condition[..., 0] == 255).sum() <= 70 * 5   # 70 dots of 5 px
    assert len({c.tobytes() for c in conditions}) == 9                                   # nine poses
    assert len({i.tobytes() for i in images}) == 9
    labels = json.loads(result.outputs["5"]["text"][0])
    assert labels[0] == "neutral yaw -30" and labels[-1] == "jaw_open yaw +30"
    fit = json.loads(result.outputs["4"]["text"][0])
    assert fit["photos"] == 1 and fit["residual_interocular"][0] < 0.2


def test_fit_several_photos_skips_faceless_ones_and_reposes_the_photos(comfy):
    g = Graph()
    faces = g.out(g.add("OmniIdentityFaceAnalysisLoader", backend="dlib", provider="CPU", det_size=640))
    flame = g.out(g.add("OmniIdentityFlameLoader", model="generic_model.pkl",
                        landmark_embedding="flame_static_embedding.pkl", shape_components=50,
                        expression_components=20))
    fit = g.add("OmniIdentityFlameFit", flame_model=flame, images=g.photos("id_1.png", "no_face.png", "id_3.png"),
                face_analysis=faces, shape_prior=1.0, expression_prior=1.0, iterations=20)
    draw = g.add("OmniIdentityFlameLandmarks", flame_model=flame, flame_params=g.out(fit), templates="fitted photos",
                 width=96, height=64, face_size=0.5, recenter=False, point_radius=1)
    single = g.add("OmniIdentityFlameLandmarks", flame_model=flame, flame_params=g.out(fit), templates="single",
                   width=64, height=64, face_size=0.5, recenter=True, point_radius=0, yaw=20.0, smile=1.0)
    g.add("SaveImage", images=g.out(fit, 1), filename_prefix="flame_preview")
    save = g.add("SaveImage", images=g.out(draw), filename_prefix="flame_photos")
    save_single = g.add("SaveImage", images=g.out(single), filename_prefix="flame_single")
    result = comfy.run(g.nodes, timeout=600)
    summary = json.loads(result.outputs[fit]["text"][0])
    assert summary["photos"] == 2 and summary["skipped_images"] == [1]
    drawn = images_of(comfy, result, save)
    assert len(drawn) == 2 and drawn[0].shape == (64, 96, 3)
    assert len(images_of(comfy, result, save_single)) == 1


def fit_graph(model_file: str, photo: str) -> dict:
    """Face analysis + FLAME Loader (model_file) + FLAME Fit of one photo, previewed."""
    g = Graph()
    faces = g.out(g.add("OmniIdentityFaceAnalysisLoader", backend="dlib", provider="CPU", det_size=640))
    flame = g.out(g.add("OmniIdentityFlameLoader", model=model_file, landmark_embedding="landmark_embedding.npy",
                        shape_components=100, expression_components=50))
    fit = g.add("OmniIdentityFlameFit", flame_model=flame, images=g.photos(photo), face_analysis=faces,
                shape_prior=1.0, expression_prior=1.0, iterations=5)
    g.add("PreviewImage", images=g.out(fit, 1))
    return g.nodes


def test_flame_errors_are_clear_and_the_server_keeps_serving(comfy):
    with pytest.raises(PromptRejected) as rejected:
        comfy.queue_prompt(load_workflow("api/flame_controlnet_grid.json", "FLAME.model=missing.pkl", *TINY))
    assert "'missing.pkl' not found in models/flame" in str(rejected.value)
    assert "https://flame.is.tue.mpg.de" in str(rejected.value)
    with pytest.raises(ExecutionFailed) as failed:
        comfy.run(fit_graph("generic_model.pkl", "no_face.png"), timeout=300)
    assert "no face found in any of the 1 photo(s)" in failed.value.error["exception_message"]
    with pytest.raises(ExecutionFailed) as failed:
        comfy.run(fit_graph("landmark_embedding.npy", "id_1.png"), timeout=300)
    assert "landmark_embedding.npy: not a FLAME model" in failed.value.error["exception_message"]
    g = Graph()
    faces = g.out(g.add("OmniIdentityFaceAnalysisLoader", backend="dlib", provider="CPU", det_size=640))
    g.add("PreviewImage", images=g.out(g.add("OmniIdentityFaceLandmarks", images=g.photos("id_2.png"),
                                             face_analysis=faces, point_radius=0)))
    comfy.run(g.nodes, timeout=300)


@pytest.fixture(scope="module")
def server_without_flame(comfyui, tiny_models, input_photos, tmp_path_factory):
    base = populate_base(tmp_path_factory.mktemp("comfy-base-noflame"), tiny_models, input_photos)
    for link in (base / "models" / "flame").iterdir():
        link.unlink()
    server = start_server(comfyui, base)
    yield server
    server.cleanup()


def test_without_flame_files_the_nodes_say_what_to_place_where(server_without_flame):
    client = ComfyClient(server_without_flame.url)
    options = client.object_info("OmniIdentityFlameLoader")["OmniIdentityFlameLoader"]["input"]["required"]
    spec = options["model"]
    assert (spec[1]["options"] if spec[0] == "COMBO" else spec[0]) == ["(no files in models/flame)"]
    prompt = load_workflow("api/flame_controlnet_grid.json", "FLAME.model=(no files in models/flame)",
                           "FLAME.landmark_embedding=(no files in models/flame)", *TINY)
    with pytest.raises(PromptRejected) as rejected:
        client.queue_prompt(prompt)
    text = str(rejected.value)
    assert "FLAME is licensed and not shipped" in text and "ComfyUI/models/flame/" in text
    assert "generic_model.pkl" in text and "landmark_embedding.npy" in text
