"""Identity adapters: per-layer K/V projections of identity tokens (plus an optional image
projection). Files are read by ``adapter_files`` (this pack's format, h94's IP-Adapters,
XLabs' and InstantX's FLUX IP-Adapters).

Layers are listed in the canonical order of the host's cross-attention layers: for
UNets the order of diffusers' attention processors (down blocks, up blocks, middle),
for FLUX the double blocks then the single blocks (``flux_blocks="double"``: the double
blocks only, as XLabs' adapters). The host checks that count and widths match the model.

``attention`` says how a FLUX host uses the K/V (UNet hosts always use ``decoupled``):
- ``decoupled``: the identity term is added to the joint attention's output of the image
  tokens, queried with the attention's own (rotary-embedded) queries (this pack's adapters);
- ``xlabs``: queried with the image tokens' queries before the rotary embedding, added to
  the image stream at the end of the double block (XLabs' IPDoubleStreamBlockProcessor);
- ``instantx``: keys and values RMS-normalised per head, queried before the rotary
  embedding, added to the attention output before its projection, on the image tokens in
  double blocks and on every token (text and image) in single blocks (InstantX's
  IPAFluxAttnProcessor2_0).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
import torch.nn as nn

from ..encoders.checkpoint import METADATA_KEY, CheckpointError, atomic_save, float32_copies
from ..encoders.embeds import IdentityEmbeds
from ..encoders.finite import require_finite
from .decoupled import COND, UNCOND
from .image_proj import PROJECTIONS, build_projection, f32_linear

class AdapterFitError(ValueError):
    """An adapter that does not fit the embeds or the model it is applied with."""


ADAPTER_FORMAT = "omni_identity.adapter"
ADAPTER_VERSION = 1
FAMILIES = ("unet", "flux", "flux2", "chroma", "qwen_image", "z_image")
ATTENTION_STYLES = ("decoupled", "xlabs", "instantx")
FLUX_BLOCK_SETS = ("all", "double")
KV_NORM_EPS = 1e-5                       # InstantX's RMSNorm on the identity keys and values


@dataclass(frozen=True)
class AdapterConfig:
    family: str                          # "unet" (SD1.5, SDXL), "flux" (FLUX.1), "flux2" (FLUX.2), "qwen_image"
    token_dim: int                       # width of the tokens the K/V projections read
    layer_dims: tuple[int, ...]          # attention width (heads * head dim) of each layer
    projection: str = "none"
    projection_args: dict = field(default_factory=dict)
    embeds_kind: str = "omni_id"         # for projection "none": the kind of embeds read
    source: str = "omni_identity"        # or "h94", "xlabs", "instantx"
    attention: str = "decoupled"         # how a FLUX host uses the K/V (see the module docstring)
    flux_blocks: str = "all"             # FLUX: the layers are all blocks, or the double blocks only
    kv_bias: bool = False                # the K/V projections have biases (XLabs)

    def __post_init__(self):
        if self.family not in FAMILIES:
            raise ValueError(f"adapter family must be one of {FAMILIES}, not {self.family!r}")
        if self.projection not in PROJECTIONS:
            raise ValueError(f"adapter projection must be one of {PROJECTIONS}, not {self.projection!r}")
        if self.attention not in ATTENTION_STYLES:
            raise ValueError(f"adapter attention must be one of {ATTENTION_STYLES}, not {self.attention!r}")
        if self.flux_blocks not in FLUX_BLOCK_SETS:
            raise ValueError(f"adapter flux_blocks must be one of {FLUX_BLOCK_SETS}, not {self.flux_blocks!r}")
        if self.attention != "decoupled" and self.family != "flux":
            raise ValueError(f"the {self.attention} attention is for FLUX adapters only")
        object.__setattr__(self, "layer_dims", tuple(int(d) for d in self.layer_dims))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["layer_dims"] = list(self.layer_dims)
        return out

    def needs(self) -> tuple[str, ...]:
        """The embeds parts this adapter reads."""
        if self.projection == "none" and self.embeds_kind == "clip":
            return ("clip",)                 # the CLIP baseline: the photos' tokens, concatenated (IP-Adapter Full)
        return {"none": ("tokens",), "plus": ("clip",), "full_face": ("clip",), "faceid": ("arcface",),
                "faceid_plusv2": ("arcface", "clip"), "pooled": ("pooled",), "pooled_mlp": ("pooled",)}[self.projection]

    def describe(self) -> str:
        pooled = self.projection_args.get("pooled_dim")
        what = {"none": f"{self.embeds_kind} tokens of width {self.token_dim}"
                        + (" (the photos' CLIP tokens, concatenated)" if self.embeds_kind == "clip" else ""), "plus": "CLIP tokens (IP-Adapter Plus)",
                "full_face": "CLIP tokens (IP-Adapter Full Face)", "faceid": "ArcFace embeddings (IP-Adapter FaceID)",
                "faceid_plusv2": "ArcFace embeddings + CLIP tokens (IP-Adapter FaceID Plus "
                                 f"{'v2' if self.projection_args.get('shortcut', True) else 'v1'})",
                "pooled": f"pooled image embeddings of width {pooled} ({POOLED_ENCODERS.get(self.source, 'CLIP')})",
                "pooled_mlp": f"pooled image embeddings of width {pooled} "
                              f"({POOLED_ENCODERS.get(self.source, 'SigLIP')})"}[self.projection]
        blocks = " (double blocks)" if self.family == "flux" and self.flux_blocks == "double" else ""
        return f"{self.source} {self.family} adapter with {len(self.layer_dims)} layers{blocks} reading {what}"


POOLED_ENCODERS = {"h94": "CLIP-H or bigG projected embedding", "xlabs": "CLIP-L projected embedding",
                   "instantx": "SigLIP so400m pooled output"}


class LayerKV(nn.Module):
    def __init__(self, token_dim: int, inner_dim: int, bias: bool = False):
        super().__init__()
        self.to_k = nn.Linear(token_dim, inner_dim, bias=bias)
        self.to_v = nn.Linear(token_dim, inner_dim, bias=bias)


def rms_per_head(x: torch.Tensor, heads: int, eps: float = KV_NORM_EPS) -> torch.Tensor:
    """(L, heads * d) -> each head's d values divided by their root mean square (RMSNorm, no weight)."""
    split = x.float().view(*x.shape[:-1], heads, -1)
    return (split * torch.rsqrt(split.pow(2).mean(-1, keepdim=True) + eps)).view(x.shape)


class IdentityAdapter(nn.Module):
    def __init__(self, config: AdapterConfig, name: str = ""):
        super().__init__()
        self.config = config
        self.name = name or "adapter"
        self.layers = nn.ModuleList(LayerKV(config.token_dim, d, config.kv_bias) for d in config.layer_dims)
        proj = build_projection(config.projection, config.projection_args)
        if proj is not None:
            self.image_proj = proj

    # -- from embeds to tokens ---------------------------------------------------------
    def check_embeds(self, embeds: IdentityEmbeds) -> None:
        missing = [p for p in self.config.needs() if p not in embeds.tensors]
        problem = None
        if missing:
            problem = f"it needs {' and '.join(self.config.needs())}"
            if "pooled" in missing:
                problem += (" (the pooled embedding Encode Baseline stores when a vision model is connected; "
                            "for SigLIP, only with its pooling head chosen in siglip_head)")
        elif self.config.projection == "none" and embeds.kind != self.config.embeds_kind:
            problem = f"it was trained on {self.config.embeds_kind} embeds"
        elif (self.config.projection == "none"
              and embeds.tensors[self.config.needs()[0]].shape[-1] != self.config.token_dim):
            problem = f"it reads tokens of width {self.config.token_dim}"
        else:
            expected = {"clip": self._clip_dim(), "arcface": self._arcface_dim(),
                        "pooled": self.config.projection_args.get("pooled_dim")}
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

        The unconditional identity is what IP-Adapter uses: the projection of the embeds'
        unconditional inputs (zero ArcFace embeddings; ``clip_uncond`` and ``pooled_uncond``,
        which the encode node makes from the unconditional image it was set to; zeros when
        the embeds carry none); for unprojected tokens, zero tokens.
        """
        self.check_embeds(embeds)
        t = {k: require_finite(v.float(), f"identity embeds part '{k}'") for k, v in embeds.tensors.items()}
        kind = self.config.projection
        if kind == "none":
            tokens = t[self.config.needs()[0]].reshape(-1, self.config.token_dim)   # clip: (N, T, C) -> (N * T, C)
            return {COND: tokens, UNCOND: torch.zeros_like(tokens[:1])}
        # small projections run in float32 in place; the MLP ones compute in float32 from any dtype
        proj = self.image_proj if kind in ("faceid", "pooled", "pooled_mlp") else self.image_proj.float()
        clip_uncond = t.get("clip_uncond", torch.zeros_like(t["clip"][:1])) if "clip" in t else None
        if kind in ("plus", "full_face"):
            cond, uncond = proj(t["clip"]), proj(clip_uncond[:1])
        elif kind == "faceid":
            cond, uncond = proj(t["arcface"]), proj(torch.zeros_like(t["arcface"][:1]))
        elif kind in ("pooled", "pooled_mlp"):
            pooled_uncond = t.get("pooled_uncond", torch.zeros_like(t["pooled"][:1]))
            cond, uncond = proj(t["pooled"]), proj(pooled_uncond[:1])
        else:
            if t["arcface"].shape[0] != t["clip"].shape[0]:
                raise ValueError("FaceID Plus v2 needs one ArcFace embedding per CLIP image in the embeds")
            cond = proj(t["arcface"], t["clip"], faceid_v2_scale)
            uncond = proj(torch.zeros_like(t["arcface"][:1]), clip_uncond[:1], faceid_v2_scale)
        where = f"adapter '{self.name}' ({kind} projection)"
        return {COND: require_finite(cond.reshape(-1, cond.shape[-1]), where),
                UNCOND: require_finite(uncond.reshape(-1, uncond.shape[-1]), where)}

    @torch.no_grad()
    def layer_kv(self, index: int, tokens: dict[int, torch.Tensor], heads: Optional[int] = None):
        """The identity keys and values of layer ``index`` as its attention uses them:
        {COND, UNCOND} -> (L, inner) each (RMS-normalised per head for InstantX's adapters,
        which need the layer's number of ``heads``)."""
        layer = self.layers[index]
        keys = {b: f32_linear(tokens[b], layer.to_k) for b in (COND, UNCOND)}
        values = {b: f32_linear(tokens[b], layer.to_v) for b in (COND, UNCOND)}
        if self.config.attention == "instantx":
            if not heads:
                raise ValueError("InstantX adapters normalise keys and values per head: the layer's heads are needed")
            keys = {b: rms_per_head(k, heads) for b, k in keys.items()}
            values = {b: rms_per_head(v, heads) for b, v in values.items()}
        return keys, values


# -- files ------------------------------------------------------------------------------
ADAPTER_KIND = {"plus": "clip", "full_face": "clip", "faceid": "arcface", "faceid_plusv2": "arcface_clip",
                "pooled": "clip", "pooled_mlp": "clip"}


def save_adapter(adapter: IdentityAdapter, path: str, extra: Optional[dict] = None) -> None:
    """Float32 copies of the adapter's tensors are written; the adapter itself is left as it is."""
    info = {"format": ADAPTER_FORMAT, "version": ADAPTER_VERSION, "config": adapter.config.to_dict(), **(extra or {})}
    atomic_save(float32_copies(adapter.state_dict()), path, {METADATA_KEY: json.dumps(info)})


def assemble(config: AdapterConfig, tensors: dict, path: str, name: str) -> IdentityAdapter:
    """An adapter of ``config`` holding ``tensors`` (our key names), every name and shape checked."""
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
