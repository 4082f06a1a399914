"""Example API workflows made small: model files -> the tiny test models, photos -> the test photos,
sizes and steps -> small (the real-ComfyUI tests run every example this way)."""
from __future__ import annotations

from .assets import TEST_ARCFACE_ONNX

TINY_ENCODERS = {"omni_id.safetensors": "omniid_tiny_omni_id.safetensors",
                 "arcface.safetensors": "omniid_tiny_arcface.safetensors",
                 "arcface_clip.safetensors": "omniid_tiny_arcface_clip.safetensors"}
TINY_CLIP_VISION = {"clip-vit-large-patch14.safetensors": "omniid_random_clip_vit_l.safetensors"}
TINY_CHECKPOINTS = {"v1-5-pruned-emaonly.safetensors": "omniid_tiny_sd15.safetensors",
                    "sd_xl_base_1.0.safetensors": "omniid_tiny_sdxl.safetensors"}
TINY_ADAPTERS = {"omni_id_sd15.safetensors": "omniid_tiny_sd15_omni.safetensors",
                 "omni_id_sdxl.safetensors": "omniid_tiny_sdxl_omni.safetensors",
                 "omni_id_flux.safetensors": "omniid_tiny_flux_omni.safetensors",
                 "flux-ip-adapter.safetensors": "omniid_tiny_flux_xlabs.safetensors",
                 "clip_sd15.safetensors": "omniid_tiny_sd15_plus_h94.safetensors",
                 "arcface_sd15.safetensors": "omniid_tiny_sd15_arcface.safetensors",
                 "arcface_clip_sd15.safetensors": "omniid_tiny_sd15_arcface_clip.safetensors",
                 "ip-adapter-plus-face_sd15.safetensors": "omniid_tiny_sd15_plus_h94.safetensors"}


def tiny(prompt: dict, flux_text_encoders: bool = False) -> dict:
    """Model files -> the tiny test models, photos -> the test photos, sizes and steps -> small.

    Unless ``flux_text_encoders``, CLIP Text Encode on FLUX's text encoders becomes the test
    node OmniTestFluxText (same conditioning layout, no full-size T5-XXL on the CPU).
    """
    for node in prompt.values():
        kind, inputs = node["class_type"], node["inputs"]
        if kind == "CheckpointLoaderSimple":
            inputs["ckpt_name"] = TINY_CHECKPOINTS[inputs["ckpt_name"]]
        elif kind == "CLIPVisionLoader":
            inputs["clip_name"] = TINY_CLIP_VISION.get(inputs["clip_name"], "omniid_random_clip_vit_h.safetensors")
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
        elif kind == "OmniIdentityFaceAnalysisLoader" and inputs["backend"].startswith("insightface/"):
            inputs.update(backend="dlib", arcface_model=TEST_ARCFACE_ONNX)   # ArcFace embeddings without a pack
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
    if not flux_text_encoders:
        _without_flux_text_encoders(prompt)
    return prompt


def _without_flux_text_encoders(prompt: dict) -> None:
    loaders = {node_id for node_id, node in prompt.items()
               if node["class_type"] == "DualCLIPLoader" and node["inputs"].get("type") == "flux"}
    for node in prompt.values():
        clip = node["inputs"].get("clip")
        if node["class_type"] == "CLIPTextEncode" and isinstance(clip, list) and clip[0] in loaders:
            node["class_type"] = "OmniTestFluxText"
            node["inputs"] = {"text": node["inputs"]["text"], "tokens": 8}
    still_used = {value[0] for node in prompt.values() for value in node["inputs"].values() if isinstance(value, list)}
    for node_id in loaders - still_used:
        del prompt[node_id]
