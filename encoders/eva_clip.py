"""EVA02-CLIP vision tower for PuLID: the published EVA-CLIP checkpoint read into timm's EVA (the model
open_clip_torch's ``EVA02-L-14-336`` config builds: ``timm_model_name: eva02_large_patch14_clip_336``),
with the checkpoint's key names mapped; no copied eva_clip package.

PuLID reads the class-token embedding after the projection head (768) and the tokens entering blocks
4, 8, 12, 16 and 20 (counted from 0; the outputs of blocks 4, 8, ..., 20 counted from 1), each
(B, 577, 1024) for a 336 px face.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from typing import Optional

import torch

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)     # EVA02-CLIP's image normalisation
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
HIDDEN_BLOCKS = (4, 8, 12, 16, 20)
METADATA_KEY = "eva_clip"
TIMM_NAME = "eva02_large_patch14_clip_336"


class EvaFileError(ValueError):
    """Not an EVA02-CLIP vision checkpoint; the message says what the file has."""


@dataclass(frozen=True)
class EvaConfig:
    image_size: int = 336
    patch_size: int = 14
    width: int = 1024
    depth: int = 24
    heads: int = 16
    mlp_hidden: int = 2730
    embed_dim: int = 768
    rope_grid: int = 16               # EVA-CLIP's pt_hw_seq_len: the rotary grid it was pre-trained at

    def describe(self) -> str:
        return (f"EVA02-CLIP vision {self.depth} blocks x {self.width}, {self.image_size} px, patch {self.patch_size}, "
                f"embedding {self.embed_dim}")


_RENAMES = (
    (re.compile(r"\.attn\.q_bias$"), ".attn.q_proj.bias"),
    (re.compile(r"\.attn\.k_bias$"), ".attn.k_proj.bias"),
    (re.compile(r"\.attn\.v_bias$"), ".attn.v_proj.bias"),
    (re.compile(r"\.attn\.inner_attn_ln\."), ".attn.norm."),
    (re.compile(r"\.mlp\.ffn_ln\."), ".mlp.norm."),
    (re.compile(r"\.mlp\.w1\."), ".mlp.fc1_g."),
    (re.compile(r"\.mlp\.w2\."), ".mlp.fc1_x."),
    (re.compile(r"\.mlp\.w3\."), ".mlp.fc2."),
)


def visual_state(state: dict) -> dict:
    """The vision tower's tensors of an EVA-CLIP checkpoint (a whole CLIP with ``visual.*`` keys, or the
    tower alone), under timm's names; rotary tables (recomputed by timm) dropped."""
    if any(k.startswith("visual.") for k in state):
        state = {k[len("visual."):]: v for k, v in state.items() if k.startswith("visual.")}
    if "cls_token" not in state or "patch_embed.proj.weight" not in state:
        sample = ", ".join(sorted(state)[:4]) or "no tensors"
        raise EvaFileError(f"not an EVA02-CLIP vision checkpoint (EVA02_CLIP_L_336_psz14_s6B): no cls_token and "
                           f"patch_embed weights (keys: {sample}, ...)")
    out = {}
    for key, value in state.items():
        if "rope." in key and key.endswith(("freqs_cos", "freqs_sin")):
            continue
        for pattern, new in _RENAMES:
            key = pattern.sub(new, key)
        out[key] = value
    return out


def config_from_state(state: dict, metadata: Optional[dict] = None) -> EvaConfig:
    extra = json.loads(metadata[METADATA_KEY]) if metadata and metadata.get(METADATA_KEY) else {}
    width = state["cls_token"].shape[-1]
    patch = state["patch_embed.proj.weight"].shape[-1]
    grid = int(round((state["pos_embed"].shape[1] - 1) ** 0.5))
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    return EvaConfig(image_size=grid * patch, patch_size=patch, width=width, depth=depth,
                     heads=int(extra.get("heads", max(1, width // 64))),
                     mlp_hidden=state["blocks.0.mlp.fc1_g.weight"].shape[0], embed_dim=state["head.weight"].shape[0],
                     rope_grid=int(extra.get("rope_grid", 16)))


def build(config: EvaConfig):
    """timm's EVA02-CLIP vision transformer at ``config``'s sizes (FLUX.1's PuLID: EVA02-L-14-336)."""
    try:
        import timm
    except ImportError as exc:      # timm comes with open_clip_torch, a requirement of the pack
        raise EvaFileError("EVA02-CLIP needs timm (installed with open_clip_torch): pip install open_clip_torch") from exc
    return timm.create_model(TIMM_NAME, pretrained=False, img_size=config.image_size, patch_size=config.patch_size,
                             embed_dim=config.width, depth=config.depth, num_heads=config.heads,
                             mlp_ratio=config.mlp_hidden / config.width, num_classes=config.embed_dim,
                             ref_feat_shape=(config.rope_grid, config.rope_grid))


class EvaVision(torch.nn.Module):
    """The EVA02-CLIP vision tower and what PuLID reads from it."""

    def __init__(self, trunk, config: EvaConfig, name: str = "eva_clip"):
        super().__init__()
        self.trunk = trunk
        self.config = config
        self.name = name

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Normalised pixels (B, 3, S, S) -> (embedding (B, embed_dim), hidden states 5 x (B, 1 + grid^2, width))."""
        t = self.trunk
        x = t.patch_embed(pixels)
        x, rope = t._pos_embed(x)
        x = t.norm_pre(x)
        hidden = []
        for index, block in enumerate(t.blocks):
            if index in HIDDEN_BLOCKS:
                hidden.append(x)
            x = block(x, rope=rope)
        x = t.norm(x)
        return t.head(t.fc_norm(x[:, 0])), hidden

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """RGB images (B, 3, H, W) in [0, 1] -> resized (bicubic) to the tower's size, normalised, encoded."""
        import torch.nn.functional as F
        p = next(self.parameters())
        size = self.config.image_size
        x = images.to(p.device, torch.float32)
        if tuple(x.shape[-2:]) != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False, antialias=True)
        mean = torch.tensor(OPENAI_MEAN, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(OPENAI_STD, device=x.device).view(1, 3, 1, 1)
        return self(((x - mean) / std).to(p.dtype))

    def models(self) -> list:
        return [self]


def load_state(state: dict, name: str = "eva_clip", metadata: Optional[dict] = None) -> EvaVision:
    mapped = visual_state(state)
    try:
        config = config_from_state(mapped, metadata)
    except (KeyError, IndexError) as exc:
        raise EvaFileError(f"'{name}' is not an EVA02-CLIP vision checkpoint: missing {exc}") from exc
    if config.depth <= max(HIDDEN_BLOCKS):
        raise EvaFileError(f"'{name}' has {config.depth} blocks; PuLID reads the states entering blocks "
                           f"{HIDDEN_BLOCKS}, so it needs at least {max(HIDDEN_BLOCKS) + 1}")
    with torch.device("meta"):
        trunk = build(config)
    expected = {k: v for k, v in trunk.state_dict().items() if "rope" not in k}
    missing = sorted(set(expected) - set(mapped))
    unexpected = sorted(set(mapped) - set(expected))
    wrong = sorted(k for k in expected if k in mapped and tuple(mapped[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise EvaFileError(f"'{name}' does not have EVA02-CLIP's layout: missing {missing[:4]}, unexpected "
                           f"{unexpected[:4]}, wrong shapes {wrong[:4]}")
    trunk = build(config)      # real tensors for the rotary tables, then the checkpoint's weights
    dtype = mapped["cls_token"].dtype
    trunk.load_state_dict({k: v.to(dtype) for k, v in mapped.items()}, strict=False)
    return EvaVision(trunk.to(dtype).eval().requires_grad_(False), config, name)


def load_file(path: str, name: Optional[str] = None) -> EvaVision:
    """An EVA02-CLIP checkpoint: safetensors, or the published ``.pt`` read with ``weights_only=True``."""
    name = name or path.replace("\\", "/").rsplit("/", 1)[-1]
    metadata = {}
    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open
            with safe_open(path, framework="pt") as f:
                metadata = f.metadata() or {}
                state = {k: f.get_tensor(k) for k in f.keys()}
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
            for wrapper in ("module", "state_dict", "model"):
                if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                    state = state[wrapper]
    except Exception as exc:
        raise EvaFileError(f"'{name}' cannot be read as an EVA02-CLIP checkpoint (tensors only; pickled objects "
                           f"are refused): {exc}") from exc
    return load_state(state, name, metadata)


def save_file(model: EvaVision, path: str) -> None:
    """``model`` as a safetensors file (timm's names under ``visual.``, the head count in the metadata)."""
    from safetensors.torch import save_file as save
    state = {f"visual.{k}": v.contiguous() for k, v in model.trunk.state_dict().items() if "rope" not in k}
    save(state, path, metadata={METADATA_KEY: json.dumps({"heads": model.config.heads,
                                                          "rope_grid": model.config.rope_grid,
                                                          "config": asdict(model.config)})})
