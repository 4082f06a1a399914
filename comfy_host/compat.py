"""What this ComfyUI offers at the points where supported releases differ, found by looking.

Every touchpoint the pack adapts to is detected here, never inferred from a version number:
the pack logs the ComfyUI it found and each adaptation once at load (``describe``), and the
rest of ``comfy_host`` asks these functions.
"""
from __future__ import annotations

import functools
import inspect
import logging

LOG = logging.getLogger("ComfyUI-OmniIdentity")


def comfyui_version() -> str:
    try:
        import comfyui_version
        return str(comfyui_version.__version__)
    except Exception:        # a checkout without the version module
        return "unknown"


def options_position(forward) -> int:
    """Where transformer_options sits among a diffusion model's forward arguments after x, as the
    wrappers around the model receive them."""
    names = [p.name for p in inspect.signature(forward).parameters.values()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name != "self"]
    if "transformer_options" not in names:
        raise RuntimeError(f"ComfyUI {comfyui_version()}: {forward.__qualname__} takes no transformer_options; this "
                           "ComfyUI cannot carry the pack's patches")
    return names.index("transformer_options") - 1


@functools.lru_cache(maxsize=None)
def flux_options_position() -> int:
    from comfy.ldm.flux.model import Flux
    return options_position(Flux.forward)


@functools.lru_cache(maxsize=None)
def options_position_of(model_class) -> int:
    """``options_position`` of a diffusion model class's forward (each DiT family orders its arguments its own way)."""
    return options_position(model_class.forward)


@functools.lru_cache(maxsize=None)
def unet_options_position() -> int:
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    return options_position(UNetModel.forward)


def has_dynamic_vram() -> bool:
    import comfy.model_patcher
    return hasattr(comfy.model_patcher.ModelPatcher, "is_dynamic")


def has_training_flag() -> bool:
    import comfy.model_management
    return hasattr(comfy.model_management, "in_training")


def has_attention_containers() -> bool:
    import comfy.ldm.modules.attention
    return hasattr(comfy.ldm.modules.attention, "AttentionTensorContainer")


def clip_preprocess():
    """ComfyUI's CLIP image preprocessing: in comfy.clip_model where it lives now, else in comfy.clip_vision."""
    import importlib
    for name in ("comfy.clip_model", "comfy.clip_vision"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if callable(getattr(module, "clip_preprocess", None)):
            return module.clip_preprocess
    raise RuntimeError(f"ComfyUI {comfyui_version()} has no clip_preprocess in comfy.clip_model or comfy.clip_vision")


def adaptations() -> list[str]:
    """One line per touchpoint where this ComfyUI needs the pack to take a particular path."""
    found = []
    if has_dynamic_vram():
        found.append("dynamic VRAM: RB-Guidance and training differentiate through the model's non-dynamic delegate")
    if has_training_flag():
        found.append("training flag: tracked forwards set comfy.model_management.in_training")
    if has_attention_containers():
        found.append("attention tensor containers: attention overrides receive q/k/v taken from them")
    preprocess_module = clip_preprocess().__module__
    if preprocess_module != "comfy.clip_vision":
        found.append(f"CLIP preprocessing from {preprocess_module}")
    flux, unet = flux_options_position(), unet_options_position()
    if (flux, unet) != (6, 4):
        found.append(f"model call arguments: transformer_options at position {flux} (FLUX) and {unet} (UNet)")
    return found


def describe() -> str:
    found = adaptations()
    return (f"ComfyUI-OmniIdentity: ComfyUI {comfyui_version()}"
            + ("; adapted to: " + "; ".join(found) if found else "; no adaptation needed"))
