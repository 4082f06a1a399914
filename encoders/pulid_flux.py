"""PuLID-FLUX (Guo et al., 2024): the identity encoder (IDFormer) and the cross-attention modules that
add the identity to FLUX's image stream, in the published files' layout (``pulid_flux_v0.9.0`` and
``v0.9.1.safetensors``: ``pulid_encoder.*`` and ``pulid_ca.N.*``).

The identity condition is the antelopev2 ArcFace embedding (512) next to the EVA02-CLIP-L-14-336
embedding of the aligned, background-free face (768, L2-normalised) and five of its hidden states
(blocks 4, 8, ..., 20, 577 x 1024 each). The IDFormer turns them into 32 identity tokens (2048);
after every 2nd double block and every 4th single block of FLUX, module ``pulid_ca[i]`` attends from
the image tokens to those tokens and its output, times the weight, is added to the image tokens.

Pure torch: the host decides where the residual goes (``guidance.pulid_flux``).
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import torch
from torch import nn

from .perceiver import feed_forward

ENCODER_PREFIX = "pulid_encoder."
CA_PREFIX = "pulid_ca."
METADATA_KEY = "pulid_flux"
DOUBLE_INTERVAL = 2
SINGLE_INTERVAL = 4
COMBINE_MODES = ("average", "concat")   # several photos of one person
HIDDEN_LAYERS = 5          # the EVA hidden states the IDFormer reads, one per group of its layers


class PuLIDFileError(ValueError):
    """The file is not a PuLID-FLUX checkpoint (or a damaged one); the message says what is wrong."""


@dataclass(frozen=True)
class PuLIDFluxConfig:
    dim: int = 1024                 # IDFormer width
    depth: int = 10                 # IDFormer layers (a multiple of 5)
    heads: int = 16                 # IDFormer heads
    dim_head: int = 64
    num_id_token: int = 5           # tokens made from the ArcFace + CLIP embedding
    num_queries: int = 32           # identity tokens out
    output_dim: int = 2048          # identity token width
    ff_mult: int = 4
    id_width: int = 1280            # ArcFace (512) + EVA02 embedding (768)
    vit_width: int = 1024           # EVA02-L hidden width
    num_ca: int = 20                # cross-attention modules (FLUX.1: 10 double + 10 single)
    ca_dim: int = 3072              # FLUX width
    ca_heads: int = 16
    ca_dim_head: int = 128

    def describe(self) -> str:
        return (f"IDFormer {self.depth} layers x {self.dim}, {self.num_queries} tokens x {self.output_dim}; "
                f"{self.num_ca} cross-attention modules for FLUX width {self.ca_dim}")


# -- modules (parameter names are the published files') ----------------------------------------
def _heads_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Softmax(q k^T / sqrt(d)) v per head, the softmax in float32; (B, Lq, H*D) -> (B, Lq, H*D)."""
    b, lq, inner = q.shape
    d = inner // heads
    q, k, v = (t.reshape(t.shape[0], t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    weight = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(d))
    weight = torch.softmax(weight.float(), dim=-1).to(q.dtype)
    return (weight @ v).transpose(1, 2).reshape(b, lq, inner)


class LatentAttention(nn.Module):
    """An IDFormer layer's attention: the latents query [context; latents]."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, context: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        context, latents = self.norm1(context), self.norm2(latents)
        k, v = self.to_kv(torch.cat((context, latents), dim=1)).chunk(2, dim=-1)
        return self.to_out(_heads_attention(self.to_q(latents), k, v, self.heads))


def _mapping(width_in: int, width_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(width_in, 1024), nn.LayerNorm(1024), nn.LeakyReLU(),
                         nn.Linear(1024, 1024), nn.LayerNorm(1024), nn.LeakyReLU(), nn.Linear(1024, width_out))


class IdentityFormer(nn.Module):
    """PuLID's IDFormer: learned queries plus tokens from the ArcFace + CLIP embedding, refined by five
    groups of layers, group ``i`` reading the mapped EVA hidden state ``i``."""

    def __init__(self, config: PuLIDFluxConfig):
        super().__init__()
        c = config
        if c.depth % HIDDEN_LAYERS:
            raise ValueError(f"IDFormer depth must be a multiple of {HIDDEN_LAYERS}, not {c.depth}")
        self.config = c
        self.latents = nn.Parameter(torch.randn(1, c.num_queries, c.dim) * c.dim ** -0.5)
        self.proj_out = nn.Parameter(torch.randn(c.dim, c.output_dim) * c.dim ** -0.5)
        self.layers = nn.ModuleList(
            nn.ModuleList([LatentAttention(c.dim, c.heads, c.dim_head), feed_forward(c.dim, c.ff_mult)])
            for _ in range(c.depth))
        for i in range(HIDDEN_LAYERS):
            setattr(self, f"mapping_{i}", _mapping(c.vit_width, c.dim))
        self.id_embedding_mapping = _mapping(c.id_width, c.dim * c.num_id_token)

    def forward(self, id_cond: torch.Tensor, vit_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        """(B, id_width) or (B, N, id_width), 5 x (B, L, vit_width) -> (B, num_queries, output_dim)."""
        c = self.config
        photos = id_cond.shape[1] if id_cond.ndim == 3 else 1
        id_tokens = self.id_embedding_mapping(id_cond).reshape(-1, c.num_id_token * photos, c.dim)
        latents = torch.cat((self.latents.expand(id_tokens.shape[0], -1, -1), id_tokens), dim=1)
        per_group = c.depth // HIDDEN_LAYERS
        for i in range(HIDDEN_LAYERS):
            context = torch.cat((id_tokens, getattr(self, f"mapping_{i}")(vit_hidden[i])), dim=1)
            for attention, ff in self.layers[i * per_group:(i + 1) * per_group]:
                latents = attention(context, latents) + latents
                latents = ff(latents) + latents
        return latents[:, :c.num_queries] @ self.proj_out


class IdentityCrossAttention(nn.Module):
    """PuLID's PerceiverAttentionCA: the image tokens query the identity tokens; returns the residual."""

    def __init__(self, dim: int, heads: int, dim_head: int, kv_dim: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm1 = nn.LayerNorm(kv_dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(kv_dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, identity: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        """identity (B or 1, T, kv_dim), image tokens (B, L, dim) -> residual (B, L, dim)."""
        k, v = self.to_kv(self.norm1(identity)).chunk(2, dim=-1)
        if k.shape[0] != image.shape[0]:
            k, v = k.expand(image.shape[0], -1, -1), v.expand(image.shape[0], -1, -1)
        return self.to_out(_heads_attention(self.to_q(self.norm2(image)), k, v, self.heads))


class PuLIDFlux(nn.Module):
    """A PuLID-FLUX checkpoint: ``pulid_encoder`` (IDFormer) and ``pulid_ca`` (one module per injection)."""

    def __init__(self, config: PuLIDFluxConfig = PuLIDFluxConfig(), name: str = "pulid_flux"):
        super().__init__()
        self.config = config
        self.name = name
        self.pulid_encoder = IdentityFormer(config)
        self.pulid_ca = nn.ModuleList(
            IdentityCrossAttention(config.ca_dim, config.ca_heads, config.ca_dim_head, config.output_dim)
            for _ in range(config.num_ca))

    def describe(self) -> str:
        return f"PuLID-FLUX '{self.name}': {self.config.describe()}"

    @torch.no_grad()
    def identity_tokens(self, id_cond: torch.Tensor, vit_hidden: Sequence[torch.Tensor]) -> torch.Tensor:
        p = next(self.parameters())
        return self.pulid_encoder(id_cond.to(p.device, p.dtype), [h.to(p.device, p.dtype) for h in vit_hidden])

    def models(self) -> list:
        return [self]


# -- the identity condition ------------------------------------------------------------------
def identity_condition(arcface: torch.Tensor, clip_embeds: torch.Tensor) -> torch.Tensor:
    """[ArcFace embedding (as insightface returns it), EVA02 embedding / its L2 norm]: (N, 512 + 768)."""
    clip_embeds = clip_embeds / torch.norm(clip_embeds, 2, 1, True)
    return torch.cat([arcface.to(clip_embeds.dtype), clip_embeds], dim=-1)


def identity_tokens(model: PuLIDFlux, id_cond: torch.Tensor, vit_hidden: Sequence[torch.Tensor],
                    combine: str = "average") -> tuple[torch.Tensor, torch.Tensor]:
    """(conditional, unconditional) identity tokens of N photos of one person, (1, 32, 2048) each.

    ``average``: the tokens of each photo averaged (what the authors' forks for several photos do);
    ``concat``: the IDFormer reads every photo's embedding tokens at once (its ``num_duotu`` path) and
    the photos' hidden states concatenated. The unconditional tokens are the IDFormer's output for
    zero inputs, as the authors compute them for true CFG."""
    if combine == "average":
        cond_in, hidden_in = id_cond[:1], [h[:1] for h in vit_hidden]
        cond = model.identity_tokens(id_cond, vit_hidden).mean(dim=0, keepdim=True)
    elif combine == "concat":
        cond_in, hidden_in = id_cond[None], [h.reshape(1, -1, h.shape[-1]) for h in vit_hidden]
        cond = model.identity_tokens(cond_in, hidden_in)
    else:
        raise ValueError(f"combine must be 'average' or 'concat', not {combine!r}")
    uncond = model.identity_tokens(torch.zeros_like(cond_in), [torch.zeros_like(h) for h in hidden_in])
    return cond, uncond


# -- files -----------------------------------------------------------------------------------
def injection_points(depth: int, single: int) -> list[tuple[str, int]]:
    """The FLUX blocks after which a residual is added, in ``pulid_ca`` order."""
    return ([("double_block", i) for i in range(depth) if i % DOUBLE_INTERVAL == 0]
            + [("single_block", i) for i in range(single) if i % SINGLE_INTERVAL == 0])


def config_from_state(state: dict, metadata: Optional[dict] = None) -> PuLIDFluxConfig:
    """The sizes the weights fix; heads from the file's metadata when it has them, else the published
    files' 64 channels per IDFormer head and 128 per cross-attention head."""
    extra = {}
    if metadata and metadata.get(METADATA_KEY):
        extra = json.loads(metadata[METADATA_KEY])
    try:
        latents = state[ENCODER_PREFIX + "latents"]
        proj_out = state[ENCODER_PREFIX + "proj_out"]
        dim = latents.shape[-1]
        depth = len({k.split(".")[2] for k in state if k.startswith(ENCODER_PREFIX + "layers.")})
        inner = state[ENCODER_PREFIX + "layers.0.0.to_q.weight"].shape[0]
        num_ca = len({k.split(".")[1] for k in state if k.startswith(CA_PREFIX)})
        ca_q = state[CA_PREFIX + "0.to_q.weight"]
        heads, ca_heads = int(extra.get("heads", max(1, inner // 64))), int(extra.get("ca_heads", max(1, ca_q.shape[0] // 128)))
        if inner % heads or ca_q.shape[0] % ca_heads:
            raise PuLIDFileError(f"PuLID-FLUX widths {inner} / {ca_q.shape[0]} do not split into {heads} / "
                                 f"{ca_heads} heads")
        config = PuLIDFluxConfig(
            dim=dim, depth=depth, heads=heads, dim_head=inner // heads, num_id_token=
            state[ENCODER_PREFIX + "id_embedding_mapping.6.weight"].shape[0] // dim,
            num_queries=latents.shape[1], output_dim=proj_out.shape[1],
            ff_mult=state[ENCODER_PREFIX + "layers.0.1.1.weight"].shape[0] // dim,
            id_width=state[ENCODER_PREFIX + "id_embedding_mapping.0.weight"].shape[1],
            vit_width=state[ENCODER_PREFIX + "mapping_0.0.weight"].shape[1],
            num_ca=num_ca, ca_dim=ca_q.shape[1], ca_heads=ca_heads, ca_dim_head=ca_q.shape[0] // ca_heads)
    except (KeyError, IndexError, ValueError) as exc:
        if isinstance(exc, PuLIDFileError):
            raise
        raise PuLIDFileError(f"not a PuLID-FLUX checkpoint: missing {exc}") from exc
    return config


def load_state(state: dict, name: str = "pulid_flux", metadata: Optional[dict] = None) -> PuLIDFlux:
    """A PuLIDFlux holding ``state`` (the published layout); every key must fit, nothing may be left over."""
    others = sorted(k for k in state if not k.startswith((ENCODER_PREFIX, CA_PREFIX)))
    if not any(k.startswith(ENCODER_PREFIX) for k in state) or not any(k.startswith(CA_PREFIX) for k in state):
        sample = ", ".join(sorted(state)[:4]) or "no tensors"
        raise PuLIDFileError(f"'{name}' is not a PuLID-FLUX checkpoint (pulid_flux_v0.9.0/v0.9.1.safetensors): it "
                             f"has no pulid_encoder.* and pulid_ca.* weights (keys: {sample}, ...)")
    if others:
        raise PuLIDFileError(f"'{name}' has keys a PuLID-FLUX checkpoint does not: {others[:4]}")
    config = config_from_state(state, metadata)
    with torch.device("meta"):
        model = PuLIDFlux(config, name)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise PuLIDFileError(f"'{name}' does not have the PuLID-FLUX layout: missing {missing[:4]}, unexpected "
                             f"{unexpected[:4]}, wrong shapes {wrong[:4]}")
    dtype = next(iter(state.values())).dtype
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_file(path: str, name: Optional[str] = None) -> PuLIDFlux:
    """Read a PuLID-FLUX safetensors file (pickled files are refused)."""
    from safetensors import safe_open
    name = name or path.replace("\\", "/").rsplit("/", 1)[-1]
    if not path.endswith(".safetensors"):
        raise PuLIDFileError(f"'{name}': PuLID-FLUX files are read from .safetensors only (pickle is refused)")
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:     # a damaged or non-safetensors file
        raise PuLIDFileError(f"'{name}' cannot be read as safetensors: {exc}") from exc
    return load_state(state, name, metadata)


def save_file(model: PuLIDFlux, path: str) -> None:
    """Write ``model`` in the published layout, its head counts in the metadata."""
    from safetensors.torch import save_file as save
    c = model.config
    meta = {METADATA_KEY: json.dumps({"heads": c.heads, "ca_heads": c.ca_heads, "config": asdict(c)})}
    save({k: v.contiguous() for k, v in model.state_dict().items()}, path, metadata=meta)
