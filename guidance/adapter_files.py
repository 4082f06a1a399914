"""Reading adapter files: this pack's format and the IP-Adapter checkpoints users already have,
each recognised by its keys (never by its file name).

- this pack: safetensors with the config in the ``omni_identity`` metadata;
- h94 (SD1.5, SDXL): ``image_proj.*`` and ``ip_adapter.N.to_k_ip/to_v_ip.weight`` with
  N = 1, 3, 5, ... (diffusers' attention-processor order); the projection is told by its
  keys (Plus / Plus-Face, Full-Face, FaceID, FaceID Plus v2, base);
- XLabs' FLUX IP-Adapters (v1: 4 tokens, v2: 16 tokens of CLIP-L):
  ``double_blocks.N.processor.ip_adapter_double_stream_{k,v}_proj.{weight,bias}`` and
  ``ip_adapter_proj_model.{proj,norm}.*``;
- InstantX's FLUX.1-dev-IP-Adapter: ``image_proj.proj.{0,2}.*``, ``image_proj.norm.*`` (an MLP
  from SigLIP's 1152-d pooled output to 128 tokens) and ``ip_adapter.N.to_k_ip/to_v_ip.weight``
  with N = 0 ... 56 (19 double, then 38 single blocks).
``.bin`` files are read with ``torch.load(weights_only=True)``: plain tensors only.
"""
from __future__ import annotations

import os
import re

import torch

from ..encoders.checkpoint import METADATA_KEY, CheckpointError, read_info, read_safetensors
from .adapter import (ADAPTER_FORMAT, ADAPTER_KIND, ADAPTER_VERSION, AdapterConfig, IdentityAdapter, assemble)
from .image_proj import infer_h94_projection, pooled_args, pooled_mlp_args

XLABS_LAYER = re.compile(r"double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_([kv])_proj\.(weight|bias)")


def load_adapter(path: str, name: str = "") -> IdentityAdapter:
    """An adapter file in any of the layouts above (.safetensors or .bin)."""
    name = name or path
    if path.endswith(".bin"):
        metadata, tensors = {}, read_bin(path)
    else:
        metadata, tensors = read_safetensors(path, "adapter")
    if METADATA_KEY not in metadata:
        reader = recognise(tensors)
        if reader is not None:
            return reader(tensors, path, name)
        if path.endswith(".bin"):
            raise CheckpointError(f"{path} is not an IP-Adapter file this pack reads (keys {sorted(tensors)[:4]} ...)")
    info = read_info(path, metadata, list(tensors), "adapter", ADAPTER_FORMAT)
    if info.get("version", 0) > ADAPTER_VERSION:
        raise CheckpointError(f"{path} is adapter format version {info['version']}; update ComfyUI-OmniIdentity")
    try:
        config = AdapterConfig(**info.get("config", {}))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid adapter config: {exc}") from exc
    return assemble(config, tensors, path, name)


def read_bin(path: str) -> dict[str, torch.Tensor]:
    """A ``.bin`` checkpoint as flat keys: {"image_proj": {...}, "ip_adapter": {...}} becomes
    ``image_proj.*`` / ``ip_adapter.*``; a flat dict of tensors stays as it is."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} could not be read as a plain tensor checkpoint (weights_only=True): {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"{path} holds a {type(data).__name__}, not a dict of tensors")
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items() if torch.is_tensor(v)})
        elif torch.is_tensor(value):
            flat[key] = value
    if not flat:
        raise CheckpointError(f"{path} is not an IP-Adapter .bin (no image_proj / ip_adapter sections)")
    return flat


def recognise(tensors: dict):
    """The reader for a key layout, or None."""
    keys = set(tensors)
    if any(XLABS_LAYER.fullmatch(k) for k in keys) and "ip_adapter_proj_model.proj.weight" in keys:
        return from_xlabs
    if "ip_adapter.0.to_k_ip.weight" in keys and "image_proj.proj.0.weight" in keys:
        return from_instantx
    if any(k.startswith("ip_adapter.") for k in keys) and any(k.startswith("image_proj.") for k in keys):
        return from_h94
    if any(k.startswith("ip_adapter.") for k in keys):
        return no_projection
    return None


def no_projection(tensors: dict, path: str, name: str) -> IdentityAdapter:
    raise CheckpointError(f"{path}: an IP-Adapter file without its image projection (image_proj.*)")


def _section(tensors: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _kv_layers(tensors: dict, path: str, numbers: list[int], key: str, bias: bool) -> dict:
    """Our ``layers.i.to_k/to_v`` from a file's per-layer keys (``key`` formats number, k/v, part)."""
    layers = {}
    for i, number in enumerate(numbers):
        for kv in ("k", "v"):
            for part in ("weight", "bias") if bias else ("weight",):
                source = key.format(number=number, kv=kv, part=part)
                if source not in tensors:
                    raise CheckpointError(f"{path}: {source} is missing")
                layers[f"layers.{i}.to_{kv}.{part}"] = tensors[source]
    return layers


def from_h94(tensors: dict, path: str, name: str) -> IdentityAdapter:
    proj_state = _section(tensors, "image_proj.")
    try:
        kind, args = infer_h94_projection(proj_state)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    # FaceID files also hold LoRA weights under ip_adapter.N.to_*_lora: they are a separate LoRA
    if kind == "faceid_plusv2" and not faceid_plus_is_v2(path, proj_state):
        args = {**args, "shortcut": False}          # FaceID Plus v1: no shortcut (v2, the default, says nothing)
    numbers = sorted({int(k.split(".")[1]) for k in tensors if re.fullmatch(r"ip_adapter\.\d+\.to_[kv]_ip\.weight", k)})
    layers = _kv_layers(tensors, path, numbers, "ip_adapter.{number}.to_{kv}_ip.{part}", bias=False)
    dims = [layers[f"layers.{i}.to_k.weight"].shape[0] for i in range(len(numbers))]
    config = AdapterConfig(family="unet", token_dim=layers["layers.0.to_k.weight"].shape[1], layer_dims=tuple(dims),
                           projection=kind, projection_args=args, embeds_kind=ADAPTER_KIND[kind], source="h94")
    return assemble(config, {**layers, **{f"image_proj.{k}": v for k, v in proj_state.items()}}, path, name)


def faceid_plus_is_v2(path: str, proj_state: dict) -> bool:
    """FaceID Plus v1 and v2 files have the same keys and shapes: v2 adds the FaceID tokens back to the
    CLIP refinement (the "shortcut"), v1 does not. The file's name tells them apart, as in IPAdapter_plus:
    a name with ``plus`` but not ``plusv2`` (h94's ip-adapter-faceid-plus_sd15) is v1; ``plusv2`` (h94's
    ip-adapter-faceid-plusv2_sd15/sdxl), Kolors' FaceID Plus (a 4096-wide resampler, trained with the
    shortcut) and a name that says neither are v2. (IPAdapter_plus reads a name without ``plusv2`` as
    v1: rename such a v1 file to keep ``faceid-plus`` in it.)"""
    out = proj_state.get("perceiver_resampler.layers.0.0.to_out.weight")
    if out is not None and out.shape[0] == 4096:
        return True
    name = os.path.basename(path).lower()
    return "plusv2" in name or "plus" not in name


def from_xlabs(tensors: dict, path: str, name: str) -> IdentityAdapter:
    proj_state = _section(tensors, "ip_adapter_proj_model.")
    if set(proj_state) != {"proj.weight", "proj.bias", "norm.weight", "norm.bias"}:
        raise CheckpointError(f"{path}: XLabs projection keys {sorted(proj_state)} are not proj.* and norm.*")
    numbers = sorted({int(m.group(1)) for m in map(XLABS_LAYER.fullmatch, tensors) if m})
    key = "double_blocks.{number}.processor.ip_adapter_double_stream_{kv}_proj.{part}"
    layers = _kv_layers(tensors, path, numbers, key, bias=True)
    if numbers != list(range(len(numbers))):
        raise CheckpointError(f"{path}: XLabs layers {numbers} are not double blocks 0 ... {len(numbers) - 1}")
    args = pooled_args(proj_state)
    config = AdapterConfig(family="flux", token_dim=args["output_dim"],
                           layer_dims=tuple(layers[f"layers.{i}.to_k.weight"].shape[0] for i in range(len(numbers))),
                           projection="pooled", projection_args=args, embeds_kind="clip", source="xlabs",
                           attention="xlabs", flux_blocks="double", kv_bias=True)
    return assemble(config, {**layers, **{f"image_proj.{k}": v for k, v in proj_state.items()}}, path, name)


def from_instantx(tensors: dict, path: str, name: str) -> IdentityAdapter:
    proj_state = _section(tensors, "image_proj.")
    if set(proj_state) != {"proj.0.weight", "proj.0.bias", "proj.2.weight", "proj.2.bias", "norm.weight", "norm.bias"}:
        raise CheckpointError(f"{path}: InstantX projection keys {sorted(proj_state)} are not proj.0/2.* and norm.*")
    numbers = sorted({int(k.split(".")[1]) for k in tensors if re.fullmatch(r"ip_adapter\.\d+\.to_[kv]_ip\.weight", k)})
    if numbers != list(range(len(numbers))):
        raise CheckpointError(f"{path}: InstantX layers {numbers} are not 0 ... {len(numbers) - 1}")
    layers = _kv_layers(tensors, path, numbers, "ip_adapter.{number}.to_{kv}_ip.{part}", bias=False)
    args = pooled_mlp_args(proj_state)
    config = AdapterConfig(family="flux", token_dim=args["output_dim"],
                           layer_dims=tuple(layers[f"layers.{i}.to_k.weight"].shape[0] for i in range(len(numbers))),
                           projection="pooled_mlp", projection_args=args, embeds_kind="clip", source="instantx",
                           attention="instantx", flux_blocks="all")
    return assemble(config, {**layers, **{f"image_proj.{k}": v for k, v in proj_state.items()}}, path, name)
