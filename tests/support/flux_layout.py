"""Small FLUX.1 models for tests, built through ComfyUI's own front door.

``flux_state_dict`` writes random weights in the published FLUX.1 layout (Black Forest Labs'
single-file keys, the layout ComfyUI's detection reads), at any width and depth. ``comfy_flux``
turns such a state dict into a ComfyUI model the way ComfyUI loads a file: its detection gives the
config (and with it whatever arguments the running release's FLUX class needs), and only the sizes
that some releases fix rather than read from the weights (widths, heads, rotary axes, MLP ratio) are
set from the weights' own shapes. No test calls a model constructor with one release's arguments.
"""
from __future__ import annotations

import torch

from .comfy_build import detected_patcher


def flux_shapes(hidden: int, heads: int, depth: int, single: int, in_channels: int = 16, context: int = 4096,
                vec: int = 768, guidance: bool = True, mlp_ratio: float = 4.0) -> dict[str, tuple]:
    """Key -> shape of a FLUX.1 (dev when ``guidance``, schnell otherwise) transformer."""
    head_dim, mlp = hidden // heads, int(hidden * mlp_ratio)
    shapes: dict[str, tuple] = {"img_in.weight": (hidden, in_channels * 4), "img_in.bias": (hidden,),
                                "txt_in.weight": (hidden, context), "txt_in.bias": (hidden,)}

    def mlp_embedder(name, width):
        shapes.update({f"{name}.in_layer.weight": (hidden, width), f"{name}.in_layer.bias": (hidden,),
                       f"{name}.out_layer.weight": (hidden, hidden), f"{name}.out_layer.bias": (hidden,)})

    def linear(name, out, inp):
        shapes.update({f"{name}.weight": (out, inp), f"{name}.bias": (out,)})

    mlp_embedder("time_in", 256)
    mlp_embedder("vector_in", vec)
    if guidance:
        mlp_embedder("guidance_in", 256)
    for i in range(depth):
        for stream in ("img", "txt"):
            prefix = f"double_blocks.{i}.{stream}"
            linear(f"{prefix}_mod.lin", 6 * hidden, hidden)
            linear(f"{prefix}_attn.qkv", 3 * hidden, hidden)
            shapes[f"{prefix}_attn.norm.query_norm.scale"] = (head_dim,)
            shapes[f"{prefix}_attn.norm.key_norm.scale"] = (head_dim,)
            linear(f"{prefix}_attn.proj", hidden, hidden)
            linear(f"{prefix}_mlp.0", mlp, hidden)
            linear(f"{prefix}_mlp.2", hidden, mlp)
    for i in range(single):
        prefix = f"single_blocks.{i}"
        linear(f"{prefix}.linear1", 3 * hidden + mlp, hidden)
        linear(f"{prefix}.linear2", hidden, hidden + mlp)
        shapes[f"{prefix}.norm.query_norm.scale"] = (head_dim,)
        shapes[f"{prefix}.norm.key_norm.scale"] = (head_dim,)
        linear(f"{prefix}.modulation.lin", 3 * hidden, hidden)
    linear("final_layer.linear", 4 * in_channels, hidden)
    linear("final_layer.adaLN_modulation.1", 2 * hidden, hidden)
    return shapes


def flux_state_dict(hidden: int, heads: int, depth: int, single: int, seed: int = 0, dtype=torch.float16,
                    **layout) -> dict[str, torch.Tensor]:
    """Seeded random weights in the FLUX.1 layout: matrices ~ N(0, 1/fan_in), norm scales 1, biases 0."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in flux_shapes(hidden, heads, depth, single, **layout).items():
        if len(shape) >= 2:
            value = torch.randn(shape, generator=generator) * shape[1] ** -0.5
        elif key.endswith(".scale"):
            value = torch.ones(shape)
        else:
            value = torch.zeros(shape)
        state[key] = value.to(dtype).contiguous()
    return state


def layout_sizes(state: dict, heads: int, axes) -> dict:
    """The sizes the weights fix (widths, MLP ratio, guidance input) with the head count and rotary split
    they leave open."""
    hidden = state["img_in.weight"].shape[0]
    if sum(axes) * heads != hidden:
        raise ValueError(f"rotary axes {axes} x {heads} heads do not make the width {hidden}")
    return {"hidden_size": hidden, "num_heads": heads, "axes_dim": list(axes),
            "mlp_ratio": state["double_blocks.0.img_mlp.0.weight"].shape[0] / hidden,
            "in_channels": state["img_in.weight"].shape[1] // 4, "out_channels": state["final_layer.linear.weight"].shape[0] // 4,
            "context_in_dim": state["txt_in.weight"].shape[1], "vec_in_dim": state["vector_in.in_layer.weight"].shape[1],
            "guidance_embed": "guidance_in.in_layer.weight" in state}


def comfy_flux(state: dict, heads: int, axes=(16, 56, 56), dtype=torch.float32):
    """A ComfyUI ModelPatcher holding ``state`` (FLUX.1 layout), configured by ComfyUI's detection;
    ``heads`` and ``axes`` (the rotary split of a head, FLUX.1's own by default) as the weights cannot say."""
    import comfy.model_detection

    config = comfy.model_detection.detect_unet_config(state, "")
    if config is None or config.get("image_model") != "flux":
        raise ValueError(f"ComfyUI does not detect these weights as FLUX.1: {config}")
    config.update(layout_sizes(state, heads, axes))
    return detected_patcher(config, state, dtype, "FLUX")
