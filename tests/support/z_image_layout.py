"""Small Z-Image models for tests: a diffusers ``ZImageTransformer2DModel``'s weights as a ComfyUI model.

ComfyUI converts Z-Image's diffusers keys to its own layout itself (``convert_diffusers_mmdit``, as when it
loads a diffusers-format file) and its detection configures the model; the sizes ComfyUI fixes for the
published width (heads, rotary split, feed-forward ratio, refiner depth, Z-Image's modulation, caption padding) are set
from the small model's config.
"""
from __future__ import annotations

import torch

from .comfy_build import detected_patcher


def comfy_z_image(state: dict, config, dtype=torch.float32):
    import comfy.model_detection

    converted = comfy.model_detection.convert_diffusers_mmdit(dict(state), "")
    if converted is None:
        raise ValueError("ComfyUI does not detect these weights as Z-Image: it reads no diffusers-format Z-Image")
    unet_config = comfy.model_detection.detect_unet_config(converted, "")
    if unet_config is None or unet_config.get("image_model") != "lumina2":
        raise ValueError(f"ComfyUI does not detect these weights as Z-Image (NextDiT): {unet_config}")
    unet_config.update({"n_heads": config.n_heads, "n_kv_heads": config.n_kv_heads, "axes_dims": list(config.axes_dims),
                        "axes_lens": list(config.axes_lens), "rope_theta": config.rope_theta,
                        "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": config.t_scale,
                        "pad_tokens_multiple": 32, "n_refiner_layers": config.n_refiner_layers})
    return detected_patcher(unet_config, converted, dtype, "Z-Image")
