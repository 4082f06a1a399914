"""The tiny checkpoints the fixtures write load and sample in a real ComfyUI."""
import json

import numpy as np

from support.testing import images_of, image_change


def sampling_prompt(seed: int, controlnet: bool) -> dict:
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "omniid_tiny_sd15.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "a portrait photo"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": seed, "steps": 4, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "tiny"}},
    }
    if controlnet:
        prompt["8"] = {"class_type": "ControlNetLoader",
                       "inputs": {"control_net_name": "omniid_tiny_controlnet.safetensors"}}
        prompt["9"] = {"class_type": "EmptyImage", "inputs": {"width": 64, "height": 64, "batch_size": 1,
                                                              "color": 16777215}}
        prompt["10"] = {"class_type": "ControlNetApplyAdvanced", "inputs": {
            "positive": ["2", 0], "negative": ["3", 0], "control_net": ["8", 0], "image": ["9", 0],
            "strength": 1.0, "start_percent": 0.0, "end_percent": 1.0}}
        prompt["5"]["inputs"].update(positive=["10", 0], negative=["10", 1])
        prompt["11"] = {"class_type": "VAELoader", "inputs": {"vae_name": "omniid_tiny_taesd.safetensors"}}
        prompt["6"]["inputs"]["vae"] = ["11", 0]
    return prompt


def model_info(comfy, result, node_id) -> dict:
    """What ComfyUI's loaders built, as the test-only OmniTestModelInfo node read it off the objects."""
    return json.loads("".join(result.outputs[node_id]["text"]))


def test_checkpoint_is_detected_as_sd15_and_samples(comfy):
    prompt = sampling_prompt(1, controlnet=False)
    prompt["20"] = {"class_type": "OmniTestModelInfo", "inputs": {"model": ["1", 0], "clip": ["1", 1]}}
    result = comfy.run(prompt, timeout=300)
    image = images_of(comfy, result, "7")[0]
    assert image.shape == (64, 64, 3)
    assert 20 < image.mean() < 235 and image.std() > 1.0            # neither blank nor saturated
    info = model_info(comfy, result, "20")
    assert (info["model_type"], info["model_class"], info["text_encoder"]) == ("EPS", "BaseModel", "SD1ClipModel")
    assert info["model_config"][0] == "SD15", info


def test_controlnet_changes_the_image_and_the_separate_vae_decodes_like_the_checkpoints(comfy):
    plain_prompt = sampling_prompt(2, controlnet=False)
    # the same latent decoded by the separate VAE file too: it holds the checkpoint's VAE weights
    plain_prompt["11"] = {"class_type": "VAELoader", "inputs": {"vae_name": "omniid_tiny_taesd.safetensors"}}
    plain_prompt["12"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["11", 0]}}
    plain_prompt["13"] = {"class_type": "SaveImage", "inputs": {"images": ["12", 0], "filename_prefix": "tiny_vae"}}
    result = comfy.run(plain_prompt, timeout=300)
    plain, separate_vae = images_of(comfy, result, "7")[0], images_of(comfy, result, "13")[0]
    assert np.array_equal(separate_vae, plain)
    controlled = images_of(comfy, comfy.run(sampling_prompt(2, controlnet=True), timeout=300), "7")[0]
    assert controlled.shape == plain.shape
    # the ControlNet's residuals move the whole image (measured: mean 4.3 grey levels, 92% of the
    # values changed), not a few round-off pixels
    mean, changed = image_change(controlled, plain)
    assert mean > 2.0 and changed > 0.5, (mean, changed)


def test_sdxl_checkpoint_is_detected_as_sdxl_family_and_samples(comfy):
    prompt = sampling_prompt(3, controlnet=False)
    prompt["1"]["inputs"]["ckpt_name"] = "omniid_tiny_sdxl.safetensors"
    prompt["20"] = {"class_type": "OmniTestModelInfo", "inputs": {"model": ["1", 0], "clip": ["1", 1]}}
    result = comfy.run(prompt, timeout=600)
    image = images_of(comfy, result, "7")[0]
    assert image.shape == (64, 64, 3) and image.std() > 1.0
    # the SDXL model class with CLIP-L + CLIP-G; ComfyUI's detection names the one-level tiny UNet KOALA_700M,
    # a distilled SDXL whose config it matches, which is SDXL's supported-model class underneath
    info = model_info(comfy, result, "20")
    assert (info["model_type"], info["model_class"], info["text_encoder"]) == ("EPS", "SDXL", "SDXLClipModel")
    assert "SDXL" in info["model_config"], info
