"""A ComfyUI model from a state dict in a published layout and the config ComfyUI's detection gave for it,
built through ComfyUI's own model config (its dtype, its state-dict processing), held by a CPU ModelPatcher."""
from __future__ import annotations

import torch


def detected_patcher(unet_config: dict, state: dict, dtype: torch.dtype, name: str):
    """``name``: the layout's name in the error when the weights do not fill the model exactly."""
    import comfy.model_detection
    import comfy.model_patcher

    model_config = comfy.model_detection.model_config_from_unet_config(unet_config, state)
    model_config.set_inference_dtype(dtype, None)
    base = model_config.get_model({})
    weights = model_config.process_unet_state_dict({k: v.to(dtype) for k, v in state.items()})
    missing, unexpected = base.diffusion_model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise ValueError(f"{name} layout mismatch: missing {missing[:4]}, unexpected {unexpected[:4]}")
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
