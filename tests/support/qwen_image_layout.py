"""Small Qwen-Image models for tests: a diffusers ``QwenImageTransformer2DModel``'s weights as a ComfyUI model.

Qwen-Image's published single-file layout is diffusers' own key layout, which ComfyUI's detection reads
as it is; the sizes ComfyUI fixes for the published model (heads, head width, text width, output
channels, rotary split) are set from the small model's config.
"""
from __future__ import annotations

import torch

from .comfy_build import detected_patcher


def comfy_qwen_image(state: dict, config, dtype=torch.float32):
    """A ComfyUI ModelPatcher holding ``state``, configured by ComfyUI's detection and ``config`` (the
    diffusers model's config) for the sizes the weights leave open."""
    import comfy.model_detection

    unet_config = comfy.model_detection.detect_unet_config(state, "")
    if unet_config is None or unet_config.get("image_model") != "qwen_image":
        raise ValueError(f"ComfyUI does not detect these weights as Qwen-Image: {unet_config}")
    unet_config.update({"out_channels": config.out_channels, "attention_head_dim": config.attention_head_dim,
                        "num_attention_heads": config.num_attention_heads,
                        "joint_attention_dim": config.joint_attention_dim, "axes_dims_rope": tuple(config.axes_dims_rope)})
    return detected_patcher(unet_config, state, dtype, "Qwen-Image")
