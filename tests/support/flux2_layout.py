"""Small FLUX.2 models for tests: a diffusers ``Flux2Transformer2DModel``'s weights in Black Forest Labs'
published single-file layout, and that state dict as a ComfyUI model configured by ComfyUI's detection.

ComfyUI 0.33 reads FLUX.2 files in BFL's layout only, so the tests move the diffusers model's weights
key by key: the separate q/k/v projections fused into ``qkv``, the feed-forwards and modulations
renamed, and the final layer's (scale, shift) halves swapped into BFL's (shift, scale).
"""
from __future__ import annotations

import torch

from .comfy_build import detected_patcher


def _block_keys(i: int) -> dict[str, str]:
    d, b = f"transformer_blocks.{i}.", f"double_blocks.{i}."
    return {f"{d}attn.norm_q.weight": f"{b}img_attn.norm.query_norm.scale",
            f"{d}attn.norm_k.weight": f"{b}img_attn.norm.key_norm.scale",
            f"{d}attn.to_out.0.weight": f"{b}img_attn.proj.weight",
            f"{d}attn.norm_added_q.weight": f"{b}txt_attn.norm.query_norm.scale",
            f"{d}attn.norm_added_k.weight": f"{b}txt_attn.norm.key_norm.scale",
            f"{d}attn.to_add_out.weight": f"{b}txt_attn.proj.weight",
            f"{d}ff.linear_in.weight": f"{b}img_mlp.0.weight", f"{d}ff.linear_out.weight": f"{b}img_mlp.2.weight",
            f"{d}ff_context.linear_in.weight": f"{b}txt_mlp.0.weight",
            f"{d}ff_context.linear_out.weight": f"{b}txt_mlp.2.weight"}


def _single_keys(i: int) -> dict[str, str]:
    d, b = f"single_transformer_blocks.{i}.attn.", f"single_blocks.{i}."
    return {f"{d}to_qkv_mlp_proj.weight": f"{b}linear1.weight", f"{d}to_out.weight": f"{b}linear2.weight",
            f"{d}norm_q.weight": f"{b}norm.query_norm.scale", f"{d}norm_k.weight": f"{b}norm.key_norm.scale"}


TOP = {"x_embedder.weight": "img_in.weight", "context_embedder.weight": "txt_in.weight",
       "time_guidance_embed.timestep_embedder.linear_1.weight": "time_in.in_layer.weight",
       "time_guidance_embed.timestep_embedder.linear_2.weight": "time_in.out_layer.weight",
       "time_guidance_embed.guidance_embedder.linear_1.weight": "guidance_in.in_layer.weight",
       "time_guidance_embed.guidance_embedder.linear_2.weight": "guidance_in.out_layer.weight",
       "double_stream_modulation_img.linear.weight": "double_stream_modulation_img.lin.weight",
       "double_stream_modulation_txt.linear.weight": "double_stream_modulation_txt.lin.weight",
       "single_stream_modulation.linear.weight": "single_stream_modulation.lin.weight",
       "proj_out.weight": "final_layer.linear.weight"}


def bfl_state_dict(diffusers_state: dict) -> dict[str, torch.Tensor]:
    """A ``Flux2Transformer2DModel`` state dict in BFL's FLUX.2 layout; every key used exactly once."""
    left = dict(diffusers_state)
    out = {}
    doubles = sorted({int(k.split(".")[1]) for k in left if k.startswith("transformer_blocks.")})
    singles = sorted({int(k.split(".")[1]) for k in left if k.startswith("single_transformer_blocks.")})
    names = dict(TOP)
    for i in doubles:
        names.update(_block_keys(i))
        d, b = f"transformer_blocks.{i}.attn.", f"double_blocks.{i}."
        out[f"{b}img_attn.qkv.weight"] = torch.cat([left.pop(f"{d}to_{x}.weight") for x in "qkv"])
        out[f"{b}txt_attn.qkv.weight"] = torch.cat([left.pop(f"{d}add_{x}_proj.weight") for x in "qkv"])
    for i in singles:
        names.update(_single_keys(i))
    for source, target in names.items():
        if source in left:
            out[target] = left.pop(source)
    scale, shift = left.pop("norm_out.linear.weight").chunk(2)
    out["final_layer.adaLN_modulation.1.weight"] = torch.cat([shift, scale])
    if left:
        raise ValueError(f"FLUX.2 keys this layout does not place: {sorted(left)[:6]}")
    return {k: v.contiguous() for k, v in out.items()}


def comfy_flux2(state: dict, heads: int, axes, dtype=torch.float32):
    """A ComfyUI ModelPatcher holding ``state`` (BFL's FLUX.2 layout), configured by ComfyUI's detection;
    ``heads``, ``axes`` (the rotary split of a head), the MLP ratio and the output channels, which ComfyUI
    fixes for the published sizes, set from the small model's."""
    import comfy.model_detection

    config = comfy.model_detection.detect_unet_config(state, "")
    if config is None or config.get("image_model") != "flux2":
        raise ValueError(f"ComfyUI does not detect these weights as FLUX.2: {config}")
    hidden = state["img_in.weight"].shape[0]
    if sum(axes) * heads != hidden:
        raise ValueError(f"rotary axes {axes} x {heads} heads do not make the width {hidden}")
    config.update({"num_heads": heads, "axes_dim": list(axes), "out_channels": state["final_layer.linear.weight"].shape[0],
                   "mlp_ratio": state["double_blocks.0.img_mlp.2.weight"].shape[1] / hidden})
    return detected_patcher(config, state, dtype, "FLUX.2")
