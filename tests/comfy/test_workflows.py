"""Every example API workflow runs in a real ComfyUI on the tiny models (model names substituted)."""
from pathlib import Path

import pytest

from support.assets import TEST_ARCFACE_ONNX
from support.testing import WORKFLOWS, images_of, load_workflow

# workflows whose run is tested elsewhere, with their own substitutions
RUN_ELSEWHERE = {
    "face_crop.json": "test_face_nodes.py",
    "similarity.json": "test_metrics_nodes.py",
    "flame_controlnet_grid.json": "test_flame_nodes.py",
    "train_omni_id.json": "test_training_nodes.py",
}
TINY_ENCODERS = {"omni_id.safetensors": "omniid_tiny_omni_id.safetensors",
                 "arcface.safetensors": "omniid_tiny_arcface.safetensors",
                 "arcface_clip.safetensors": "omniid_tiny_arcface_clip.safetensors"}
TINY_CHECKPOINTS = {"v1-5-pruned-emaonly.safetensors": "omniid_tiny_sd15.safetensors",
                    "sd_xl_base_1.0.safetensors": "omniid_tiny_sdxl.safetensors"}
TINY_ADAPTERS = {"omni_id_sd15.safetensors": "omniid_tiny_sd15_omni.safetensors",
                 "omni_id_sdxl.safetensors": "omniid_tiny_sdxl_omni.safetensors",
                 "omni_id_flux.safetensors": "omniid_tiny_flux_omni.safetensors",
                 "clip_sd15.safetensors": "omniid_tiny_sd15_plus_h94.safetensors",
                 "arcface_sd15.safetensors": "omniid_tiny_sd15_arcface.safetensors",
                 "arcface_clip_sd15.safetensors": "omniid_tiny_sd15_arcface_clip.safetensors",
                 "ip-adapter-plus-face_sd15.safetensors": "omniid_tiny_sd15_plus_h94.safetensors"}


def tiny(prompt: dict) -> dict:
    """Model files -> the tiny test models, photos -> the test photos, sizes and steps -> small."""
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = TINY_CHECKPOINTS[inputs["ckpt_name"]]
        elif kind == "CLIPVisionLoader":
            inputs["clip_name"] = "omniid_random_clip_vit_h.safetensors"
        elif kind == "UNETLoader":
            inputs["unet_name"] = "omniid_tiny_flux.safetensors"
        elif kind == "DualCLIPLoader":
            inputs.update(clip_name1="omniid_tiny_clip_l.safetensors", clip_name2="omniid_random_t5xxl_fp8.safetensors")
        elif kind == "VAELoader":
            inputs["vae_name"] = "omniid_tiny_flux_ae.safetensors"
        elif kind == "ControlNetLoader":
            inputs["control_net_name"] = "omniid_tiny_controlnet.safetensors"
        elif kind == "OmniIdentityEncoderLoader":
            inputs["encoder_name"] = TINY_ENCODERS[inputs["encoder_name"]]
        elif kind == "OmniIdentityAdapterLoader":
            inputs["adapter_name"] = TINY_ADAPTERS.get(inputs["adapter_name"], inputs["adapter_name"])
        elif kind == "OmniIdentityFaceAnalysisLoader" and inputs.get("arcface_model", "none") != "none":
            inputs["arcface_model"] = TEST_ARCFACE_ONNX
        elif kind == "LoadImage" and inputs["image"].startswith("person_"):
            inputs["image"] = inputs["image"].replace("person_", "id_")
        elif kind in ("EmptyLatentImage", "EmptySD3LatentImage"):
            wide = inputs["width"] > inputs["height"]
            inputs.update(width=128 if wide else 64, height=64)
        elif kind == "KSampler":
            inputs.update(steps=2, sampler_name="euler", scheduler="normal")
        elif kind == "BasicScheduler":
            inputs.update(steps=3)
        elif kind == "OmniIdentityRBGuidance":
            inputs.update(feature_block=1)
        elif kind == "OmniIdentityFlameLandmarks":
            inputs.update(width=128, height=128)
    return prompt


def api_workflows() -> list[str]:
    return sorted(p.name for p in (WORKFLOWS / "api").glob("*.json"))


def test_every_api_workflow_is_run_by_a_test():
    tests = Path(__file__).parent
    for name, where in RUN_ELSEWHERE.items():
        assert f'"api/{name}"' in (tests / where).read_text(), (name, where)
    assert set(api_workflows()) >= set(RUN_ELSEWHERE)


@pytest.mark.parametrize("name", [n for n in api_workflows() if n not in RUN_ELSEWHERE])
def test_api_workflow_runs_on_the_tiny_models(comfy, name):
    prompt = tiny(load_workflow(f"api/{name}"))
    result = comfy.run(prompt, timeout=900)
    savers = [node_id for node_id, node in prompt.items() if node["class_type"] == "SaveImage"]
    assert savers
    for node_id in savers:
        assert images_of(comfy, result, node_id), f"{name}: {prompt[node_id]['_meta']['title']} saved nothing"

