"""ComfyUI's CLIP vision model as the Pivot ID Encoder's trainable visual encoder.

OmniPortrait trains the visual encoder (OpenCLIP ViT-L/14) with the pivot's linear layer. The
loaded CLIP_VISION is shared and its weights are inference tensors, so training works on a
private float32 copy whose layers run as plain torch modules (ComfyUI's weight casting off);
nothing of the loaded model changes. The copy's parameter names are ComfyUI's
(``vision_model.encoder.layers.N...``): the layout a pivot file's ``vision.`` tensors use.
"""
from __future__ import annotations

import copy

import comfy.model_management as mm
import torch
import torch.nn as nn

from ..encoders.pivot import VisionTower, load_vision_state
from ..guidance.rb_guidance import SUBJECT_TOKEN_KEY
from .clip_vision import ClipVision
from .compat import clip_preprocess

LAYOUT = "comfy_clip_vision"


def _out_of_place(layer):
    """ComfyUI's CLIPLayer adds its residuals in place (x += ...), which autograd cannot differentiate once
    LayerNorm has saved x; the same pre-norm residual block, written out of place, for the private copy."""
    def forward(x, mask=None, optimized_attention=None):
        x = x + layer.self_attn(layer.layer_norm1(x), mask, optimized_attention)
        return x + layer.mlp(layer.layer_norm2(x))
    return forward


class ComfyVisionTower(VisionTower):
    layout = LAYOUT

    def __init__(self, clip_vision, device=None):
        super().__init__()
        if not hasattr(getattr(clip_vision, "model", None), "vision_model"):
            raise TypeError("clip_vision must come from ComfyUI's 'Load CLIP Vision'")
        with torch.inference_mode(False):
            model = copy.deepcopy(clip_vision.model)
            for module in model.modules():
                for name, param in list(module._parameters.items()):
                    if param is not None:
                        module._parameters[name] = nn.Parameter(param.detach().float().clone())
                for name, buffer in list(module._buffers.items()):
                    if buffer is not None:
                        module._buffers[name] = buffer.detach().clone()
                if hasattr(module, "comfy_cast_weights"):
                    module.comfy_cast_weights = False          # plain torch forward: differentiable
            for layer in model.vision_model.encoder.layers:
                layer.forward = _out_of_place(layer)
        model = model.to(device or mm.get_torch_device())
        # CLIPVisionModelProjection's two parts as this module's own, so the names are ComfyUI's
        self.vision_model = model.vision_model
        self.visual_projection = model.visual_projection
        self.image_size = int(getattr(clip_vision, "image_size", 224))
        self.mean = list(getattr(clip_vision, "image_mean", [0.48145466, 0.4578275, 0.40821073]))
        self.std = list(getattr(clip_vision, "image_std", [0.26862954, 0.26130258, 0.27577711]))

    def blocks(self) -> list[nn.Module]:
        return list(self.vision_model.encoder.layers)

    def stem(self) -> list[nn.Module]:
        vision = self.vision_model
        return [m for m in (vision.embeddings, vision.pre_layrnorm) if isinstance(m, nn.Module)]

    def head(self) -> list[nn.Module]:
        return [m for m in (self.vision_model.post_layernorm, self.visual_projection) if isinstance(m, nn.Module)]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, H, W, 3) in [0, 1] -> the projected image embeddings (B, D), as ClipVision.image_embeds."""
        device = next(self.vision_model.parameters()).device
        with torch.no_grad():
            pixels = clip_preprocess()(images[..., :3].to(device), size=self.image_size,
                                       mean=self.mean, std=self.std, crop=True).float()
        pooled = self.vision_model(pixels, intermediate_output=None)[2]
        return self.visual_projection(pooled)           # as CLIPVisionModelProjection.forward


def pivot_image_embeds(pivot, clip_vision, images: torch.Tensor):
    """The reference's image embedding for a pivot: through the visual encoder the pivot trained, if it did
    (the file's tensors in a copy of ``clip_vision``), else through ``clip_vision`` itself. None for the latter."""
    if not pivot.vision_state:
        return None
    with torch.inference_mode(False):
        tower = load_vision_state(ComfyVisionTower(clip_vision), pivot.vision_state, pivot.config.vision_layout)
        with torch.no_grad():
            return tower.eval()(images).float().cpu()


def apply_pivot(conditioning, pivot, pivot_name: str, clip_vision, reference: torch.Tensor, class_token: int):
    """The conditioning with the class word replaced by e_mix (OmniPortrait's first stream), the word's
    position marked for RB-Guidance; new tensors, the given conditioning untouched."""
    image = pivot_image_embeds(pivot, clip_vision, reference[:1])      # its trained visual encoder, if any
    if image is None:
        image = ClipVision(clip_vision).image_embeds(reference[:1])
    if image.shape[-1] != pivot.config.image_dim:
        raise ValueError(f"the CLIP vision model gives {image.shape[-1]}-d embeddings; {pivot_name} was trained "
                         f"on {pivot.config.image_dim}-d ones")
    out = []
    with torch.inference_mode(False):
        for tensor, extra in conditioning:
            mixed = pivot.apply(tensor.float().cpu().clone(), class_token, image).to(tensor)
            out.append([mixed, {**extra, SUBJECT_TOKEN_KEY: class_token}])
    return out
