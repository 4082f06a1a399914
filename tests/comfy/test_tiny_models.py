"""The tiny checkpoints the fixtures write load and sample in a real ComfyUI."""
import numpy as np

from support.testing import images_of


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


def test_checkpoint_is_detected_as_sd15_and_samples(comfy, comfy_server):
    image = images_of(comfy, comfy.run(sampling_prompt(1, controlnet=False), timeout=300), "7")[0]
    assert image.shape == (64, 64, 3)
    assert 20 < image.mean() < 235 and image.std() > 1.0            # neither blank nor saturated
    assert "model_type EPS" in comfy_server.log_text()


def test_controlnet_and_separate_vae_change_the_image(comfy):
    plain = images_of(comfy, comfy.run(sampling_prompt(2, controlnet=False), timeout=300), "7")[0]
    controlled = images_of(comfy, comfy.run(sampling_prompt(2, controlnet=True), timeout=300), "7")[0]
    assert controlled.shape == plain.shape
    assert np.abs(controlled.astype(int) - plain.astype(int)).max() > 0


def test_sdxl_checkpoint_is_detected_as_sdxl_family_and_samples(comfy, comfy_server):
    prompt = sampling_prompt(3, controlnet=False)
    prompt["1"]["inputs"]["ckpt_name"] = "omniid_tiny_sdxl.safetensors"
    image = images_of(comfy, comfy.run(prompt, timeout=600), "7")[0]
    assert image.shape == (64, 64, 3) and image.std() > 1.0
    assert "Requested to load SDXLClipModel" in comfy_server.log_text()           # CLIP-L + CLIP-G: the SDXL family
