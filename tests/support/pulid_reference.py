"""The authors' PuLID-FLUX code (ToTheBeginning/PuLID, vendored archive), unpacked into the test cache and
imported as the reference; nothing of it is copied into the product. Random weights in the published
key layout are made with the authors' own modules, so the pack reads exactly what their loader reads.

- ``reference_modules()``: (pulid.encoders_transformer, flux.model, flux.modules.layers) of the archive;
- ``reference_pulid(...)``: their IDFormer and PerceiverAttentionCA list with random weights (every
  parameter, norms included) and the state dict as ``pulid_flux_v0.9.x.safetensors`` holds it.
"""
from __future__ import annotations

import importlib
import sys
from pathlib import Path

import torch

from .assets import unpacked_vendor_archive

ARCHIVE = Path(__file__).resolve().parents[2].parent / "shared" / "vendor" / "PuLID-1aa2fc7d.tar.gz"
COMMIT = "1aa2fc7d"

# a tiny PuLID-FLUX: 64 channels per IDFormer head and 128 per cross-attention head, as published
TINY = dict(dim=128, depth=5, dim_head=64, heads=2, num_id_token=5, num_queries=8, output_dim=48)
TINY_CA_HEADS = 1


def source_root() -> Path:
    """The unpacked archive's PuLID/ folder (unpacked once into the cache)."""
    return unpacked_vendor_archive(ARCHIVE, f"PuLID-{COMMIT}", "PuLID/pulid/encoders_transformer.py") / "PuLID"


def reference_module(name: str):
    """A module of the archive (``pulid.encoders_transformer``, ``flux.model``), imported from it."""
    root = str(source_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    return importlib.import_module(name)


def randomise(module: torch.nn.Module, generator: torch.Generator, scale: float = 1.0) -> None:
    """Every parameter random: matrices ~ N(0, 1/fan_in), vectors (norms, biases) ~ 1 +- 0.1 or +- 0.1."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p.shape[-1] if not name.endswith("proj_out") else p.shape[0]
                p.copy_(torch.randn(p.shape, generator=generator) * scale * fan_in ** -0.5)
            elif name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))


def reference_pulid(num_ca: int, flux_hidden: int, seed: int = 0, ca_scale: float = 1.0):
    """(their IDFormer, their nn.ModuleList of PerceiverAttentionCA, state dict in the published layout)."""
    et = reference_module("pulid.encoders_transformer")
    generator = torch.Generator().manual_seed(seed)
    encoder = et.IDFormer(**TINY)
    cas = torch.nn.ModuleList(et.PerceiverAttentionCA(dim=flux_hidden, dim_head=128, heads=TINY_CA_HEADS,
                                                      kv_dim=TINY["output_dim"]) for _ in range(num_ca))
    randomise(encoder, generator)
    randomise(cas, generator, ca_scale)
    state = {**{f"pulid_encoder.{k}": v.clone() for k, v in encoder.state_dict().items()},
             **{f"pulid_ca.{k}": v.clone() for k, v in cas.state_dict().items()}}
    return encoder.eval(), cas.eval(), state


def condition(photos: int, seed: int = 1, tokens: int = 17):
    """A random identity condition: (photos, 1280) and five (photos, tokens, 1024) hidden states."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(photos, 1280, generator=g), [torch.randn(photos, tokens, 1024, generator=g) for _ in range(5)]


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def reference_eva_module():
    """The archive's ``eva_clip.eva_vit_model`` (EVAVisionTransformer), imported without running the package's
    ``__init__`` (which pulls in its text towers and tokenizer)."""
    import types
    if "eva_clip" not in sys.modules:
        package = types.ModuleType("eva_clip")
        package.__path__ = [str(source_root() / "eva_clip")]
        sys.modules["eva_clip"] = package
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return importlib.import_module("eva_clip.eva_vit_model")


def reference_eva(seed: int = 0, image_size: int = 56, width: int = 64, depth: int = 21, embed_dim: int = 24):
    """Their EVAVisionTransformer built as their factory builds EVA02-CLIP-L-14-336 (rotary embedding
    pre-trained at a 16 x 16 grid and interpolated, SwiGLU, sub-LN), at a tiny width, every weight random;
    returns (module, state dict as the published checkpoint names it: ``visual.*``)."""
    from functools import partial
    ev = reference_eva_module()
    model = ev.EVAVisionTransformer(
        img_size=image_size, patch_size=14, num_classes=embed_dim, use_mean_pooling=False, init_values=None,
        patch_dropout=0.0, embed_dim=width, depth=depth, num_heads=width // 64, mlp_ratio=2.6667, qkv_bias=True,
        drop_path_rate=0.0, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), xattn=True, rope=True, postnorm=False,
        pt_hw_seq_len=16, intp_freq=True, naiveswiglu=True, subln=True)
    randomise(model, torch.Generator().manual_seed(seed))
    return model.eval(), {f"visual.{k}": v.clone() for k, v in model.state_dict().items()}
