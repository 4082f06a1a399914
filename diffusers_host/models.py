"""Loading the frozen base model and its VAE with diffusers: a folder or a single file.

- a pipeline folder (``unet/`` or ``transformer/``, and ``vae/``; diffusers' layout on the Hub),
- a model folder (``config.json``) with ``vae`` given separately,
- a single checkpoint file (``from_single_file``); ``config`` names a folder with the model's
  diffusers config (a pipeline folder or its ``unet``/``transformer`` folder) so no download
  is needed (its ``vae/``, ``scheduler/`` and ``text_embeds.safetensors`` are used too), ``vae``
  a VAE folder or file.

A ``text_embeds.safetensors`` beside the model (or given) is the prompt conditioning of the
training stage: ``encoder_hidden_states`` and, for SDXL, ``text_embeds`` (pooled), for FLUX
``pooled_projections``. Without one the conditioning is zeros, an empty caption.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Optional

import torch

from .layers import DIT_CLASSES


@dataclass
class BaseModel:
    family: str                   # "unet", "flux", "flux2", "chroma", "qwen_image" or "z_image"
    model: torch.nn.Module
    vae: torch.nn.Module
    text: dict                    # the prompt conditioning (see the module docstring)
    scheduler: dict               # the scheduler config (SD: the noise schedule and prediction type)


FAMILY_OF_CLASS = {"UNet2DConditionModel": "unet", **DIT_CLASSES}
MODELS_OF_CLASS = {"UNet2DConditionModel": "SD1.5, SDXL", "FluxTransformer2DModel": "FLUX.1",
                   "Flux2Transformer2DModel": "FLUX.2", "ChromaTransformer2DModel": "Chroma",
                   "QwenImageTransformer2DModel": "Qwen-Image", "ZImageTransformer2DModel": "Z-Image"}


def _class_for(folder: str):
    """(family, diffusers class) of the model whose ``config.json`` is in ``folder``."""
    import diffusers
    with open(os.path.join(folder, "config.json")) as f:
        name = json.load(f).get("_class_name", "")
    if name not in FAMILY_OF_CLASS:
        known = ", ".join(f"{cls} ({MODELS_OF_CLASS[cls]})" for cls in FAMILY_OF_CLASS)
        raise ValueError(f"{folder}: a {name or 'model of no known class'}; the diffusers host trains on {known}")
    return FAMILY_OF_CLASS[name], getattr(diffusers, name)


VAE_CLASSES = ("AutoencoderKLFlux2", "AutoencoderKLQwenImage")   # beside AutoencoderKL, by their configs' class name


def _load_vae(path: str, dtype):
    import diffusers
    if os.path.isdir(path):
        with open(os.path.join(path, "config.json")) as f:
            name = json.load(f).get("_class_name")
        cls = getattr(diffusers, name) if name in VAE_CLASSES else diffusers.AutoencoderKL
        return cls.from_pretrained(path, torch_dtype=dtype)
    from diffusers import AutoencoderKL
    return AutoencoderKL.from_single_file(path, torch_dtype=dtype)


def load_base(path: str, dtype=torch.float32, config: Optional[str] = None, vae: Optional[str] = None,
              text_embeds: Optional[str] = None) -> BaseModel:
    from safetensors.torch import load_file
    root = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        sub = next((s for s in ("transformer", "unet") if os.path.isdir(os.path.join(path, s))), None)
        if sub is None:
            raise ValueError(f"{path} has neither unet/ nor transformer/ (nor a config.json)")
        family, cls = _class_for(os.path.join(path, sub))
        model = cls.from_pretrained(path, subfolder=sub, torch_dtype=dtype)
        vae = vae or os.path.join(path, "vae")
    elif os.path.isdir(path):
        family, cls = _class_for(path)
        model = cls.from_pretrained(path, torch_dtype=dtype)
        root = os.path.dirname(os.path.abspath(path))
    else:
        if config is None:
            raise ValueError("a single-file model needs --model-config: the model's diffusers config folder")
        sub = next((s for s in ("transformer", "unet") if os.path.isdir(os.path.join(config, s))), None)
        family, cls = _class_for(os.path.join(config, sub) if sub else config)
        kwargs = {"config": config, "torch_dtype": dtype}
        if sub:
            kwargs["subfolder"] = sub
        model = cls.from_single_file(path, **kwargs)
        vae = vae or (os.path.join(config, "vae") if os.path.isdir(os.path.join(config, "vae")) else None)
        root = config                              # its scheduler/ and text_embeds.safetensors, if any
    if vae is None or not os.path.exists(vae):
        raise ValueError(f"no VAE for {path}: give one with --vae")
    scheduler = {}
    scheduler_file = os.path.join(root, "scheduler", "scheduler_config.json")
    if os.path.isfile(scheduler_file):
        with open(scheduler_file) as f:
            scheduler = json.load(f)
    text_embeds = text_embeds or os.path.join(root, "text_embeds.safetensors")
    text = load_file(text_embeds) if os.path.isfile(text_embeds) else {}
    model.requires_grad_(False).eval()
    autoencoder = _load_vae(vae, torch.float32).requires_grad_(False).eval()
    return BaseModel(family, model, autoencoder, text, scheduler)
