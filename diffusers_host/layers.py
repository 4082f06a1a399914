"""The attention layers of a diffusers model that identity adapters inject into, in adapter order.

UNets: the cross-attention (attn2) layers in the order of ``unet.attn_processors`` (down blocks,
up blocks, middle block), the order h94's ``ip_adapter.N`` keys and this pack's adapters use.
Each layer also carries ComfyUI's block name (``input``/``output``/``middle`` and the block
number in ComfyUI's ``input_blocks``/``output_blocks``), so block weights mean the same in
both hosts. FLUX.1, FLUX.2 and Chroma: the double blocks (``transformer_blocks``) then the single blocks;
Qwen-Image: its ``transformer_blocks``, as double blocks; Z-Image: its main ``layers``, as double blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch.nn as nn


@dataclass(frozen=True)
class DiffusersLayer:
    name: str                  # the attention module's name in the model
    attention: nn.Module       # the diffusers Attention / FluxAttention module
    group: str                 # input / middle / output / double / single
    number: int                # block number within its group (ComfyUI's numbering)
    inner_dim: int
    heads: int
    block: nn.Module = None    # FLUX: the transformer block holding the attention
    processor: type = None     # DiTs other than FLUX.1: the identity processor class of this layer


# the DiT families by diffusers class (as the adapter files name them)
DIT_CLASSES = {"FluxTransformer2DModel": "flux", "Flux2Transformer2DModel": "flux2",
               "ChromaTransformer2DModel": "chroma", "QwenImageTransformer2DModel": "qwen_image",
               "ZImageTransformer2DModel": "z_image"}
PATCH_SIZE = {"flux2": 1}      # latent pixels per image token along a side where not 2 (FLUX.2's latent is patchified)


def model_family(model) -> str:
    """``unet``, or the DiT family of ``model`` (its class or, under FSDP, the class it wraps)."""
    for cls in type(model).__mro__:
        if cls.__name__ in DIT_CLASSES:
            return DIT_CLASSES[cls.__name__]
    return "unet"


def is_dit(model) -> bool:
    return model_family(model) != "unet"


def is_flux(model) -> bool:
    return model_family(model) == "flux"


def _cross_attentions(prefix: str, block, group: str, first_number: int, layers: list) -> int:
    """Append ``block``'s attn2 layers; return the next ComfyUI block number."""
    resnets = len(getattr(block, "resnets", []))
    attentions = getattr(block, "attentions", None) or []
    for j, transformer in enumerate(attentions):
        for t, tb in enumerate(transformer.transformer_blocks):
            attn = getattr(tb, "attn2", None)
            if attn is not None:
                layers.append(DiffusersLayer(f"{prefix}.attentions.{j}.transformer_blocks.{t}.attn2", attn, group,
                                             first_number + j, attn.to_q.out_features, attn.heads))
    return first_number + resnets + (1 if group == "input" and getattr(block, "downsamplers", None) else 0)


def unet_layers(unet) -> list[DiffusersLayer]:
    layers: list[DiffusersLayer] = []
    number = 1                                    # ComfyUI's input_blocks[0] is conv_in
    for i, block in enumerate(unet.down_blocks):
        number = _cross_attentions(f"down_blocks.{i}", block, "input", number, layers)
    number = 0
    for i, block in enumerate(unet.up_blocks):
        number = _cross_attentions(f"up_blocks.{i}", block, "output", number, layers)
    if getattr(unet, "mid_block", None) is not None:
        _cross_attentions("mid_block", unet.mid_block, "middle", 0, layers)
    return layers


def flux_layers(model) -> list[DiffusersLayer]:
    out = []
    for kind, prefix, blocks in (("double", "transformer_blocks", model.transformer_blocks),
                                 ("single", "single_transformer_blocks", model.single_transformer_blocks)):
        for i, block in enumerate(blocks):
            out.append(DiffusersLayer(f"{prefix}.{i}.attn", block.attn, kind, i, block.attn.to_q.out_features,
                                      block.attn.heads, block))
    return out


def flux2_layers(model) -> list[DiffusersLayer]:
    from .dit_processors import Flux2JointProcessor, Flux2SingleProcessor
    out = []
    for kind, prefix, blocks, processor in (
            ("double", "transformer_blocks", model.transformer_blocks, Flux2JointProcessor),
            ("single", "single_transformer_blocks", model.single_transformer_blocks, Flux2SingleProcessor)):
        for i, block in enumerate(blocks):
            out.append(DiffusersLayer(f"{prefix}.{i}.attn", block.attn, kind, i, block.attn.inner_dim,
                                      block.attn.heads, block, processor))
    return out


def qwen_image_layers(model) -> list[DiffusersLayer]:
    """Qwen-Image: one list of MM-DiT blocks, named double blocks as ComfyUI's block patches name them."""
    from .dit_processors import QwenJointProcessor
    return [DiffusersLayer(f"transformer_blocks.{i}.attn", block.attn, "double", i, block.attn.inner_dim,
                           block.attn.heads, block, QwenJointProcessor)
            for i, block in enumerate(model.transformer_blocks)]


def z_image_layers(model) -> list[DiffusersLayer]:
    """Z-Image: its main layers (not the caption and noise refiners), named double blocks as ComfyUI's
    transformer_options name them while they run."""
    from .dit_processors import ZImageProcessor
    return [DiffusersLayer(f"layers.{i}.attention", layer.attention, "double", i, layer.attention.to_q.out_features,
                           layer.attention.heads, layer, ZImageProcessor)
            for i, layer in enumerate(model.layers)]


LAYERS = {"flux": flux_layers, "flux2": flux2_layers, "chroma": flux_layers, "qwen_image": qwen_image_layers,
          "z_image": z_image_layers}


def host_layers(model) -> list[DiffusersLayer]:
    return LAYERS.get(model_family(model), unet_layers)(model)


def adapter_layers(model, adapter) -> list[DiffusersLayer]:
    """The layers the adapter's layers map to (XLabs' FLUX adapters: the double blocks only)."""
    layers = host_layers(model)
    if is_flux(model) and adapter.config.flux_blocks == "double":
        layers = [layer for layer in layers if layer.group == "double"]
    return layers


def check_fit(adapter, model, layers: list[DiffusersLayer]) -> None:
    from ..guidance.adapter import AdapterFitError
    family = model_family(model)
    dims = tuple(layer.inner_dim for layer in layers)
    if adapter.config.family != family or dims != adapter.config.layer_dims:
        raise AdapterFitError(f"adapter '{adapter.name}' ({adapter.config.describe()}, layer widths "
                              f"{list(adapter.config.layer_dims)[:8]}) does not fit this {type(model).__name__}, "
                              f"which has {len(dims)} {family} attention layers of widths {list(dims)[:8]}")
