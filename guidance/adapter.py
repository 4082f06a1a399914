"""Identity adapters: per-layer K/V projections of identity tokens (plus an optional image
projection), loaded from this pack's format or from h94 IP-Adapter checkpoints.

Layers are listed in the canonical order of the host's cross-attention layers: for
UNets the order of diffusers' attention processors (down blocks, up blocks, middle),
for FLUX the double blocks then the single blocks. The host checks that count and
widths match the model.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from ..encoders.checkpoint import (METADATA_KEY, CheckpointError, atomic_save, read_info, read_safetensors)
from ..encoders.embeds import IdentityEmbeds
from ..encoders.finite import require_finite
from .decoupled import COND, UNCOND
from .image_proj import PROJECTIONS, build_projection, infer_h94_projection

class AdapterFitError(ValueError):
    """An adapter that does not fit the embeds or the model it is applied with."""


ADAPTER_FORMAT = "omni_identity.adapter"
ADAPTER_VERSION = 1
FAMILIES = ("unet", "flux")


@dataclass(frozen=True)
class AdapterConfig:
    family: str                          # "unet" (SD1.5, SDXL) or "flux"
    token_dim: int                       # width of the tokens the K/V projections read
    layer_dims: tuple[int, ...]          # attention width (heads * head dim) of each layer
    projection: str = "none"
    projection_args: dict = field(default_factory=dict)
    embeds_kind: str = "omni_id"         # for projection "none": the kind of embeds read
    source: str = "omni_identity"        # or "h94"

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"adapter family must be one of {FAMILIES}, not {self.family!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"adapter projection must be one of {PROJECTIONS}, not {self.projection!r}")
        object.__setattr__(self, "layer_dims", tuple(int(d) for d in self.layer_dims))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["layer_dims"] = list(self.layer_dims)
        return out

    def needs(self) -> tuple[str, ...]:
        """The embeds parts this adapter reads."""
        return {"none": ("tokens",), "plus": ("clip",), "full_face": ("clip",), "faceid": ("arcface",),
                "faceid_plusv2": ("arcface", "clip")}[self.projection]

    def describe(self) -> str:
        what = {"none": f"{self.embeds_kind} tokens of width {self.token_dim}", "plus": "CLIP tokens (IP-Adapter Plus)",
                "full_face": "CLIP tokens (IP-Adapter Full Face)", "faceid": "ArcFace embeddings (IP-Adapter FaceID)",
                "faceid_plusv2": "ArcFace embeddings + CLIP tokens (IP-Adapter FaceID Plus v2)"}[self.projection]
        return f"{self.source} {self.family} adapter with {len(self.layer_dims)} layers reading {what}"


class LayerKV(nn.Module):
    def __init__(self, token_dim: int, inner_dim: int):
        super().__init__()
        self.to_k = nn.Linear(token_dim, inner_dim, bias=False)
        self.to_v = nn.Linear(token_dim, inner_dim, bias=False)


class IdentityAdapter(nn.Module):
    def __init__(self, config: AdapterConfig, name: str = ""):
        super().__init__()
        self.config = config
        self.name = name or "adapter"
        self.layers = nn.ModuleList(LayerKV(config.token_dim, d) for d in config.layer_dims)
        proj = build_projection(config.projection, config.projection_args)
        if proj is not None:
            self.image_proj = proj

    # -- from embeds to tokens ---------------------------------------------------------
    def check_embeds(self, embeds: IdentityEmbeds) -> None:
        missing = [p for p in self.config.needs() if p not in embeds.tensors]
        problem = None
        if missing:
            problem = f"it needs {' and '.join(self.config.needs())}"
        elif self.config.projection == "none" and embeds.kind != self.config.embeds_kind:
            problem = f"it was trained on {self.config.embeds_kind} embeds"
        elif self.config.projection == "none" and embeds.tensors["tokens"].shape[-1] != self.config.token_dim:
            problem = f"it reads tokens of width {self.config.token_dim}"
        else:
            expected = {"clip": self._clip_dim(), "arcface": self._arcface_dim()}
            for part, dim in expected.items():
                if part in self.config.needs() and dim and embeds.tensors[part].shape[-1] != dim:
                    problem = f"its projection reads {part} features of width {dim}"
        if problem:
            raise AdapterFitError(f"adapter '{self.name}' ({self.config.describe()}) does not fit these embeds: "
                                  f"{problem}, but the embeds are {embeds.describe()}")

    def _clip_dim(self) -> Optional[int]:
        args = self.config.projection_args
        return args.get("embedding_dim") or args.get("clip_dim")

    def _arcface_dim(self) -> Optional[int]:
        return self.config.projection_args.get("id_dim")

    @torch.no_grad()
    def identity_tokens(self, embeds: IdentityEmbeds, faceid_v2_scale: float = 1.0) -> dict[int, torch.Tensor]:
        """{COND: (L, token_dim), UNCOND: (L', token_dim)} for the decoupled attention.

        The unconditional identity is what IP-Adapter uses: the projection of zero inputs
        (zero ArcFace embeddings; CLIP tokens of a zero image, stored by the encode nodes
        as ``clip_uncond``); for unprojected tokens, zero tokens.
        """
        self.check_embeds(embeds)
        t = {k: require_finite(v.float(), f"identity embeds part '{k}'") for k, v in embeds.tensors.items()}
        kind = self.config.projection
        if kind == "none":
            return {COND: t["tokens"], UNCOND: torch.zeros_like(t["tokens"][:1])}
        proj = self.image_proj.float()
        clip_uncond = t.get("clip_uncond", torch.zeros_like(t["clip"][:1])) if "clip" in t else None
        if kind in ("plus", "full_face"):
            cond, uncond = proj(t["clip"]), proj(clip_uncond[:1])
        elif kind == "faceid":
            cond, uncond = proj(t["arcface"]), proj(torch.zeros_like(t["arcface"][:1]))
        else:
            if t["arcface"].shape[0] != t["clip"].shape[0]:
                raise ValueError("FaceID Plus v2 needs one ArcFace embedding per CLIP image in the embeds")
            cond = proj(t["arcface"], t["clip"], faceid_v2_scale)
            uncond = proj(torch.zeros_like(t["arcface"][:1]), clip_uncond[:1], faceid_v2_scale)
        where = f"adapter '{self.name}' ({kind} projection)"
        return {COND: require_finite(cond.reshape(-1, cond.shape[-1]), where),
                UNCOND: require_finite(uncond.reshape(-1, uncond.shape[-1]), where)}

    @torch.no_grad()
    def layer_kv(self, index: int, tokens: dict[int, torch.Tensor]):
        layer = self.layers[index].float()
        keys = {b: layer.to_k(tokens[b]) for b in (COND, UNCOND)}
        values = {b: layer.to_v(tokens[b]) for b in (COND, UNCOND)}
        return keys, values


# -- files ------------------------------------------------------------------------------
def save_adapter(adapter: IdentityAdapter, path: str, extra: Optional[dict] = None) -> None:
    info = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "config": adapter.config.to_dict(), **(extra or {})}
    atomic_save(adapter.state_dict(), path, {METADATA_KEY: json.dumps(info)})


def _read_h94_bin(path: str) -> dict[str, torch.Tensor]:
    """An h94 ``.bin`` ({"image_proj": {...}, "ip_adapter": {...}}), read with weights_only=True."""
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"{path} could not be read as a plain tensor checkpoint (weights_only=True): {exc}") from exc
    if not (isinstance(data, dict) and {"image_proj", "ip_adapter"} <= set(data)):
        raise CheckpointError(f"{path} is not an IP-Adapter .bin (no image_proj / ip_adapter sections)")
    return {f"{section}.{k}": v for section in ("image_proj", "ip_adapter") for k, v in data[section].items()}


def load_adapter(path: str, name: str = "") -> IdentityAdapter:
    """This pack's adapter format, or an h94 IP-Adapter checkpoint (.safetensors or .bin)."""
    name = name or path
    if path.endswith(".bin"):
        return _from_h94(_read_h94_bin(path), path, name)
    metadata, tensors = read_safetensors(path, "adapter")
    if METADATA_KEY not in metadata and any(k.startswith("ip_adapter.") for k in tensors):
        return _from_h94(tensors, path, name)
    info = read_info(path, metadata, list(tensors), "adapter", ADAPTER_FORMAT)
    if info.get("version", 0) > ADAPTER_VERSION:
        raise CheckpointError(f"{path} is adapter format version {info['version']}; update ComfyUI-OmniIdentity")
    try:
        config = AdapterConfig(**info.get("config", {}))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid adapter config: {exc}") from exc
    return _assemble(config, tensors, path, name)


def _from_h94(tensors: dict, path: str, name: str) -> IdentityAdapter:
    proj_state = {k[len("image_proj."):]: v for k, v in tensors.items() if k.startswith("image_proj.")}
    try:
        kind, args = infer_h94_projection(proj_state)
    except ValueError as exc:
        raise CheckpointError(f"{path}: {exc}") from exc
    numbers = sorted({int(k.split(".")[1]) for k in tensors if k.startswith("ip_adapter.")})
    layers = {}
    for i, number in enumerate(numbers):
        for ours, theirs in (("to_k", "to_k_ip"), ("to_v", "to_v_ip")):
            key = f"ip_adapter.{number}.{theirs}.weight"
            if key not in tensors:
                raise CheckpointError(f"{path}: {key} is missing")
            layers[f"layers.{i}.{ours}.weight"] = tensors[key]
    dims = [layers[f"layers.{i}.to_k.weight"].shape[0] for i in range(len(numbers))]
    token_dim = layers["layers.0.to_k.weight"].shape[1]
    config = AdapterConfig(family="unet", token_dim=token_dim, layer_dims=tuple(dims), projection=kind,
                           projection_args=args, embeds_kind={"plus": "clip", "full_face": "clip", "faceid": "arcface",
                                                               "faceid_plusv2": "arcface_clip"}[kind], source="h94")
    state = {**layers, **{f"image_proj.{k}": v for k, v in proj_state.items()}}
    return _assemble(config, state, path, name)


def _assemble(config: AdapterConfig, tensors: dict, path: str, name: str) -> IdentityAdapter:
    with torch.device("meta"):
        adapter = IdentityAdapter(config, name)
    expected = {k: tuple(v.shape) for k, v in adapter.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    if expected != found:
        missing = sorted(set(expected) - set(found))[:4]
        unexpected = sorted(set(found) - set(expected))[:4]
        wrong = [k for k in expected if k in found and expected[k] != found[k]][:4]
        raise CheckpointError(f"{path} does not match its adapter config: missing {missing}, unexpected "
                              f"{unexpected}, wrong shapes {wrong}")
    adapter.load_state_dict(tensors, strict=True, assign=True)
    return adapter.eval()


def create_adapter(config: AdapterConfig, seed: Optional[int] = None, name: str = "") -> IdentityAdapter:
    """A randomly initialised adapter (training starts here; tests use it)."""
    if seed is None:
        return IdentityAdapter(config, name).eval()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return IdentityAdapter(config, name).eval()


def h94_state_dict(adapter: IdentityAdapter) -> dict[str, torch.Tensor]:
    """The adapter in the h94 IP-Adapter key layout (``image_proj.*``, ``ip_adapter.N.to_k_ip``
    with N = 1, 3, 5, ...: the cross-attention processors' indices in diffusers' order)."""
    if adapter.config.projection == "none":
        raise ValueError("the h94 layout needs an image projection; this adapter reads tokens directly")
    state = {f"image_proj.{k}": v.detach().contiguous() for k, v in adapter.image_proj.state_dict().items()}
    for i, layer in enumerate(adapter.layers):
        state[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = layer.to_k.weight.detach().contiguous()
        state[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = layer.to_v.weight.detach().contiguous()
    return state
