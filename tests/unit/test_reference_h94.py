"""h94's IP-Adapters, read by the pack, equal diffusers' implementation on identical random weights.

For each format on a small UNet of the SD1.5 layout and of the SDXL layout: the checkpoint is
written in h94's published layout and dtype, read by the pack and by diffusers' own h94 reader
(``_load_ip_adapter_weights``); the image projections (conditional and unconditional), every
layer's identity keys and values, and every cross-attention layer's output with the identity
(CFG batch of conditional and unconditional rows, a weight, with and without a mask) agree to
float32 round-off. The whole-model check through ComfyUI is tests/comfy/test_reference_models.py.
"""
import pytest
import torch
from safetensors.torch import save_file

from omniid.encoders.embeds import IdentityEmbeds
from omniid.guidance.adapter_files import load_adapter
from omniid.guidance.decoupled import COND, UNCOND, DecoupledAttention, LayerInjection, sdpa_attention
from support.ip_layouts import (CLIP_TOKENS, CLIP_WIDTH, H94_KINDS, ID_WIDTH, LAYOUT_CONTEXT, LAYOUTS, POOLED_WIDTH,
                                diffusers_unet, flat, h94_checkpoint, load_h94_into_diffusers,
                                unet_cross_attention_dims)

TOLERANCE = 2e-5          # largest |ours - diffusers| over largest |diffusers|, per tensor
PROJECTION = {"plus": "plus", "plus_face": "plus", "full_face": "full_face", "faceid": "faceid",
              "faceid_plusv2": "faceid_plusv2", "base": "pooled"}


def relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference.double()).abs().max() / reference.double().abs().max())


def random_embeds(images: int, seed: int) -> IdentityEmbeds:
    g = torch.Generator().manual_seed(seed)
    return IdentityEmbeds("arcface_clip", {
        "clip": torch.randn(images, CLIP_TOKENS, CLIP_WIDTH, generator=g),
        "clip_uncond": torch.randn(1, CLIP_TOKENS, CLIP_WIDTH, generator=g),
        "arcface": torch.randn(images, ID_WIDTH, generator=g),
        "pooled": torch.randn(images, POOLED_WIDTH, generator=g),
        "pooled_uncond": torch.randn(1, POOLED_WIDTH, generator=g)}, {"num_images": images})


def diffusers_tokens(projection, kind: str, embeds: IdentityEmbeds, uncond: bool, shortcut: float) -> torch.Tensor:
    """(images, T, D) identity tokens from diffusers' projection module."""
    t = embeds.tensors
    n = t["clip"].shape[0]
    with torch.no_grad():
        if kind in ("plus", "plus_face", "full_face"):
            return projection(t["clip_uncond"] if uncond else t["clip"])
        if kind == "faceid":
            return projection(torch.zeros(1, ID_WIDTH) if uncond else t["arcface"])
        if kind == "base":
            return projection(t["pooled_uncond"] if uncond else t["pooled"])
        projection.clip_embeds = (t["clip_uncond"] if uncond else t["clip"])[None]
        projection.shortcut, projection.shortcut_scale = True, shortcut
        return projection(torch.zeros(1, ID_WIDTH) if uncond else t["arcface"]).reshape(1 if uncond else n, 4, -1)


def cross_attention_layers(unet):
    from diffusers.models.attention_processor import IPAdapterAttnProcessor2_0
    modules = dict(unet.named_modules())
    return [(modules[name[:-len(".processor")]], proc) for name, proc in unet.attn_processors.items()
            if isinstance(proc, IPAdapterAttnProcessor2_0)]


def write(tmp_path, kind: str, nested: dict) -> str:
    if kind in ("faceid", "faceid_plusv2"):          # h94 ships these as .bin (pickled plain tensors)
        path = tmp_path / f"ip-adapter-{kind}.bin"
        torch.save(nested, str(path))
    else:
        path = tmp_path / f"ip-adapter-{kind}.safetensors"
        save_file(flat(nested), str(path))
    return str(path)


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("kind", H94_KINDS)
def test_h94_format_equals_diffusers(tmp_path, layout, kind):
    unet = diffusers_unet(layout)
    dims = unet_cross_attention_dims(unet)
    nested = h94_checkpoint(kind, LAYOUT_CONTEXT[layout], dims, seed=H94_KINDS.index(kind))
    ours = load_adapter(write(tmp_path, kind, nested), kind)
    assert ours.config.projection == PROJECTION[kind] and ours.config.layer_dims == tuple(dims)
    assert {p.dtype for p in ours.parameters()} == {torch.float16}
    load_h94_into_diffusers(unet, nested)
    projection = unet.encoder_hid_proj.image_projection_layers[0]

    embeds, scale = random_embeds(2, seed=7), 0.7
    tokens = ours.identity_tokens(embeds, faceid_v2_scale=scale)
    cond = diffusers_tokens(projection, kind, embeds, False, scale)
    uncond = diffusers_tokens(projection, kind, embeds, True, scale)
    assert relative(tokens[COND], cond.reshape(-1, cond.shape[-1])) < TOLERANCE
    assert relative(tokens[UNCOND], uncond.reshape(-1, uncond.shape[-1])) < TOLERANCE

    single = random_embeds(1, seed=8)
    single_tokens = ours.identity_tokens(single, faceid_v2_scale=scale)
    single_cond = diffusers_tokens(projection, kind, single, False, scale)
    single_uncond = diffusers_tokens(projection, kind, single, True, scale)
    g = torch.Generator().manual_seed(9)
    mask = torch.rand(1, 4, 4, generator=g)
    for index, (attn, proc) in enumerate(cross_attention_layers(unet)):
        keys, values = ours.layer_kv(index, tokens)
        with torch.no_grad():
            assert relative(keys[COND], proc.to_k_ip[0](cond.reshape(-1, cond.shape[-1]))) < TOLERANCE
            assert relative(values[UNCOND], proc.to_v_ip[0](uncond.reshape(-1, uncond.shape[-1]))) < TOLERANCE
        width = attn.to_q.in_features
        hidden = torch.randn(2, 16, width, generator=g)            # a 4 x 4 token grid, rows [cond, uncond]
        text = torch.randn(2, 3, LAYOUT_CONTEXT[layout], generator=g)
        cases = (  # (identity tokens, diffusers' per-row tokens, weight, mask)
            (tokens, torch.stack([cond, uncond.expand_as(cond)]), 0.6, None),
            (single_tokens, torch.stack([single_cond, single_uncond]), 1.3, mask))
        for case_tokens, rows, weight, case_mask in cases:
            proc.scale = [weight]
            with torch.no_grad():
                reference = proc(attn, hidden, encoder_hidden_states=(text, [rows]),
                                 ip_adapter_masks=None if case_mask is None else [case_mask[None]])
                k, v = ours.layer_kv(index, case_tokens)
                patch = DecoupledAttention(sdpa_attention, [LayerInjection(k, v, weight, mask=case_mask)])
                out = patch(attn.to_q(hidden), attn.to_k(text), attn.to_v(text),
                            {"n_heads": attn.heads, "cond_or_uncond": [COND, UNCOND],
                             "original_shape": (2, width, 4, 4)})
                out = attn.to_out[1](attn.to_out[0](out))
            assert relative(out, reference) < TOLERANCE, (kind, layout, index, case_mask is not None)
