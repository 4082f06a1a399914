"""Identity encoders under ComfyUI's memory manager (the OMNI_ID_ENCODER value)."""
from __future__ import annotations

import comfy.model_management as mm
import comfy.model_patcher
import torch


class LoadedEncoder:
    """An encoder module with a ModelPatcher, so ComfyUI loads it onto the device and offloads it."""

    def __init__(self, model, name: str):
        load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
        dtype = torch.float32
        if mm.should_use_bf16(load_device):
            dtype = torch.bfloat16
        elif mm.should_use_fp16(load_device):
            dtype = torch.float16
        self.model = model.to(offload_device, dtype)
        self.name = name
        self.config = model.config
        self.patcher = comfy.model_patcher.ModelPatcher(self.model, load_device=load_device,
                                                        offload_device=offload_device)

    def ready(self):
        """The encoder, loaded onto the compute device by ComfyUI's model manager."""
        mm.load_model_gpu(self.patcher)
        return self.model


def require_encoder(encoder) -> LoadedEncoder:
    if not isinstance(encoder, LoadedEncoder):
        raise TypeError("encoder must come from 'Identity Encoder Loader (OmniIdentity)' or a training node, not a "
                        f"{type(encoder).__name__}")
    return encoder
