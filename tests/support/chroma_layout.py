"""Small Chroma models for tests: a diffusers ``ChromaTransformer2DModel``'s weights as a ComfyUI model.

ComfyUI converts the blocks from diffusers' keys with its own FLUX map (``convert_diffusers_mmdit``, as
when it loads a diffusers-format FLUX file); Chroma's approximator, which that map does not know, is
moved key by key into its published layout (``in_proj``, ``layers.N.in_layer/out_layer``,
``norms.N.scale``, ``out_proj``). ComfyUI's detection then configures the model; the sizes it fixes for
the published width (heads, rotary split, the approximator's widths and depth) are set from the small
model's config.
"""
from __future__ import annotations

import torch

from .comfy_build import detected_patcher

APPROXIMATOR = "distilled_guidance_layer."


def bfl_state_dict(diffusers_state: dict) -> dict[str, torch.Tensor]:
    import comfy.model_detection
    blocks = {k: v for k, v in diffusers_state.items() if not k.startswith(APPROXIMATOR)}
    out = comfy.model_detection.convert_diffusers_mmdit(dict(blocks), "")
    for key, value in diffusers_state.items():
        if key.startswith(APPROXIMATOR):
            name = (key.replace(".linear_1.", ".in_layer.").replace(".linear_2.", ".out_layer.")
                    .replace(".weight", ".scale") if ".norms." in key else
                    key.replace(".linear_1.", ".in_layer.").replace(".linear_2.", ".out_layer."))
            out[name] = value
    return out


def comfy_chroma(state: dict, config, dtype=torch.float32):
    import comfy.model_detection

    unet_config = comfy.model_detection.detect_unet_config(state, "")
    if unet_config is None or unet_config.get("image_model") != "chroma":
        raise ValueError(f"ComfyUI does not detect these weights as Chroma: {unet_config}")
    # hosts that fix FLUX.1's sizes at detection (ComfyUI 0.3.64) take the tiny model's from its weights
    unet_config.update({"hidden_size": state["img_in.weight"].shape[0], "context_in_dim": state["txt_in.weight"].shape[1],
                        "num_heads": config.num_attention_heads, "axes_dim": list(config.axes_dims_rope),
                        "in_dim": config.approximator_num_channels, "out_dim": state["img_in.weight"].shape[0],
                        "hidden_dim": config.approximator_hidden_dim, "n_layers": config.approximator_layers})
    return detected_patcher(unet_config, state, dtype, "Chroma")
