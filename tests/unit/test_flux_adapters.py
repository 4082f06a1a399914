"""FLUX IP-Adapters (XLabs v1/v2, InstantX): recognised by their keys, read as plain tensors, their
projections and per-layer keys/values equal to the references, RoPE undone exactly, wrong pairings
named. The whole-model equality through ComfyUI's FLUX is tests/comfy/test_reference_models.py."""
import argparse

import pytest
import torch
from safetensors.torch import save_file

from omniid.encoders.checkpoint import CheckpointError
from omniid.encoders.embeds import IdentityEmbeds
from omniid.encoders.siglip_head import head_from_state
from omniid.guidance.adapter import AdapterFitError, rms_per_head
from omniid.guidance.adapter_files import load_adapter
from omniid.guidance.decoupled import COND, UNCOND, LayerInjection, sdpa_attention
from omniid.guidance.flux_identity import identity_terms, unrotate
from support.ip_layouts import (FLUX, FLUX_TOKEN_WIDTH, FLUX_TOKENS, POOLED_WIDTH, diffusers_flux,
                                instantx_checkpoint, load_xlabs_into_diffusers, xlabs_checkpoint)
from support.ip_reference import MLPProjModel, relative

TOLERANCE = 2e-6
HEAD_DIM = FLUX["hidden"] // FLUX["heads"]


def pooled_embeds(images=2, width=POOLED_WIDTH, seed=0):
    g = torch.Generator().manual_seed(seed)
    return IdentityEmbeds("clip", {"pooled": torch.randn(images, width, generator=g),
                                   "pooled_uncond": torch.randn(1, width, generator=g)},
                          {"num_images": images, "image_encoder": f"CLIP vision model, pooled {width}"})


@pytest.mark.parametrize("kind", ["xlabs_v1", "xlabs_v2"])
def test_xlabs_is_recognised_by_its_keys_and_equals_diffusers(tmp_path, kind):
    state = xlabs_checkpoint(kind, FLUX["hidden"], FLUX["depth"], seed=1)
    save_file(state, str(tmp_path / "any_name.safetensors"))
    adapter = load_adapter(str(tmp_path / "any_name.safetensors"))
    config = adapter.config
    assert (config.family, config.source, config.attention, config.flux_blocks, config.kv_bias) == \
        ("flux", "xlabs", "xlabs", "double", True)
    assert config.projection_args["num_tokens"] == FLUX_TOKENS[kind] and config.layer_dims == (FLUX["hidden"],) * 2
    assert {p.dtype for p in adapter.parameters()} == {torch.bfloat16}
    transformer = load_xlabs_into_diffusers(diffusers_flux(FLUX_TOKEN_WIDTH[kind]), tmp_path, "any_name.safetensors")
    embeds = pooled_embeds()
    tokens = adapter.identity_tokens(embeds)
    with torch.no_grad():
        cond = transformer.encoder_hid_proj([embeds.tensors["pooled"][None]])[0].reshape(-1, FLUX_TOKEN_WIDTH[kind])
        uncond = transformer.encoder_hid_proj([embeds.tensors["pooled_uncond"][None]])[0].reshape(-1, cond.shape[-1])
        assert relative(tokens[COND], cond) < TOLERANCE and relative(tokens[UNCOND], uncond) < TOLERANCE
        procs = [p for p in transformer.attn_processors.values() if hasattr(p, "to_k_ip")]
        assert len(procs) == FLUX["depth"]
        for index, proc in enumerate(procs):
            keys, values = adapter.layer_kv(index, tokens)
            assert relative(keys[COND], proc.to_k_ip[0](cond)) < TOLERANCE
            assert relative(values[UNCOND], proc.to_v_ip[0](uncond)) < TOLERANCE


def test_instantx_bin_is_recognised_and_equals_its_published_processor(tmp_path):
    nested = instantx_checkpoint(FLUX["hidden"], 4, seed=2)
    torch.save(nested, str(tmp_path / "ip-adapter.bin"))
    adapter = load_adapter(str(tmp_path / "ip-adapter.bin"))
    config = adapter.config
    assert (config.source, config.attention, config.flux_blocks, config.kv_bias, config.projection) == \
        ("instantx", "instantx", "all", False, "pooled_mlp")
    assert config.projection_args["num_tokens"] == FLUX_TOKENS["instantx"] == 128
    embeds = pooled_embeds()
    tokens = adapter.identity_tokens(embeds)
    reference = MLPProjModel(nested["image_proj"])
    from diffusers.models.normalization import RMSNorm
    norm = RMSNorm(HEAD_DIM, eps=1e-5, elementwise_affine=False)
    with torch.no_grad():
        cond = reference(embeds.tensors["pooled"]).reshape(-1, reference.width)
        assert relative(tokens[COND], cond) < TOLERANCE
        for index in range(4):
            keys, values = adapter.layer_kv(index, tokens, heads=FLUX["heads"])
            for ours, name in ((keys, "to_k_ip"), (values, "to_v_ip")):
                plain = cond @ nested["ip_adapter"][f"{index}.{name}.weight"].float().T
                expected = norm(plain.view(-1, FLUX["heads"], HEAD_DIM)).reshape(plain.shape)
                assert relative(ours[COND], expected) < TOLERANCE
    with pytest.raises(ValueError, match="heads"):
        adapter.layer_kv(0, tokens)


def test_bin_files_are_plain_tensors_only(tmp_path):
    torch.save({"image_proj": {}, "ip_adapter": {}, "code": argparse.Namespace(run="anything")},
               str(tmp_path / "evil.bin"))
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_adapter(str(tmp_path / "evil.bin"))


def test_rotary_embedding_is_undone_exactly():
    from diffusers.models.embeddings import apply_rotary_emb
    from diffusers.models.transformers.transformer_flux import FluxPosEmbed
    ids = torch.cat([torch.zeros(3, 3), torch.stack(torch.meshgrid(torch.zeros(1), torch.arange(4.0), torch.arange(5.0),
                                                                   indexing="ij"), -1).reshape(-1, 3)])
    cos, sin = FluxPosEmbed(10000, list(FLUX["axes"]))(ids)
    pairs_cos, pairs_sin = cos[:, ::2], sin[:, ::2]            # one angle per channel pair
    pe = torch.stack([pairs_cos, -pairs_sin, pairs_sin, pairs_cos], -1).view(1, 1, -1, HEAD_DIM // 2, 2, 2)
    q = torch.randn(2, FLUX["heads"], ids.shape[0], HEAD_DIM, generator=torch.Generator().manual_seed(3))
    rotated = apply_rotary_emb(q, (cos, sin))
    assert relative(unrotate(rotated, pe), q) < 1e-6


def test_identity_terms_by_attention_style():
    """xlabs: a residual of the image tokens; instantx: added to the image tokens (double) or every token
    (single); a mask zeroes the text tokens' term in single blocks."""
    g = torch.Generator().manual_seed(4)
    heads, d, txt, image = 2, 8, 3, 4
    q = torch.randn(2, heads, txt + image, d, generator=g)
    out = torch.randn(2, txt + image, heads * d, generator=g)
    keys = {b: torch.randn(5, heads * d, generator=g) for b in (COND, UNCOND)}
    values = {b: torch.randn(5, heads * d, generator=g) for b in (COND, UNCOND)}

    def term(rows):
        return torch.cat([sdpa_attention(q[i:i + 1, :, rows].transpose(1, 2).reshape(1, -1, heads * d),
                                         keys[b][None], values[b][None], heads) for i, b in enumerate((COND, UNCOND))])

    xlabs = LayerInjection(keys, values, 0.5, style="xlabs")
    same, residual = identity_terms(out, q, None, txt, "double", [xlabs], sdpa_attention, [COND, UNCOND], (4, 4))
    assert torch.equal(same, out) and relative(residual, 0.5 * term(slice(txt, None))) < 1e-6
    instantx = LayerInjection(keys, values, 0.5, style="instantx")
    double, none = identity_terms(out, q, None, txt, "double", [instantx], sdpa_attention, [COND, UNCOND], (4, 4))
    assert none is None and torch.equal(double[:, :txt], out[:, :txt])
    assert relative(double[:, txt:] - out[:, txt:], 0.5 * term(slice(txt, None))) < 1e-6
    single, _ = identity_terms(out, q, None, txt, "single", [instantx], sdpa_attention, [COND, UNCOND], (4, 4))
    assert relative(single - out, 0.5 * term(slice(None))) < 1e-6
    masked = LayerInjection(keys, values, 0.5, mask=torch.ones(1, 4, 4), style="instantx")
    single_masked, _ = identity_terms(out, q, None, txt, "single", [masked], sdpa_attention, [COND, UNCOND], (4, 4))
    assert torch.equal(single_masked[:, :txt], out[:, :txt])
    assert relative(single_masked[:, txt:] - out[:, txt:], 0.5 * term(slice(None))[:, txt:]) < 1e-6


def test_weight_mode_kv_scales_keys_and_values():
    """IPAdapter_plus's "K+V": Attn(q, w K, w V), against the formula written out."""
    g = torch.Generator().manual_seed(5)
    q, keys, values = torch.randn(1, 6, 16, generator=g), torch.randn(3, 16, generator=g), torch.randn(3, 16, generator=g)
    injection = LayerInjection({COND: keys, UNCOND: keys}, {COND: values, UNCOND: values}, 1.7, weight_mode="kv")
    ours = injection.contribution(q, 2, sdpa_attention, [COND], None)
    expected = sdpa_attention(q, 1.7 * keys[None], 1.7 * values[None], 2)
    assert relative(ours, expected) < 1e-6
    output = LayerInjection({COND: keys, UNCOND: keys}, {COND: values, UNCOND: values}, 1.7)
    assert relative(output.contribution(q, 2, sdpa_attention, [COND], None), 1.7 * sdpa_attention(q, keys[None],
                                                                                                     values[None], 2)) < 1e-6
    with pytest.raises(ValueError, match="weight_mode"):
        LayerInjection({}, {}, 1.0, weight_mode="k")


def test_wrong_encoder_for_an_adapter_is_named(tmp_path):
    state = xlabs_checkpoint("xlabs_v1", FLUX["hidden"], FLUX["depth"], seed=1)
    save_file(state, str(tmp_path / "xlabs.safetensors"))
    adapter = load_adapter(str(tmp_path / "xlabs.safetensors"), "xlabs.safetensors")
    with pytest.raises(AdapterFitError, match=r"xlabs.safetensors.*pooled features of width 40.*pooled \(2, 64\).*"
                                              r"image encoder: CLIP vision model, pooled 64"):
        adapter.identity_tokens(pooled_embeds(width=64))
    clip_only = IdentityEmbeds("clip", {"clip": torch.zeros(1, 5, 8)}, {"num_images": 1})
    with pytest.raises(AdapterFitError, match="needs pooled.*siglip_head"):
        adapter.identity_tokens(clip_only)


def test_siglip_pooling_head_equals_transformers():
    from transformers import SiglipVisionConfig
    from transformers.models.siglip.modeling_siglip import SiglipMultiheadAttentionPoolingHead
    config = SiglipVisionConfig(hidden_size=32, intermediate_size=48, num_attention_heads=4)
    torch.manual_seed(6)
    reference = SiglipMultiheadAttentionPoolingHead(config).eval()
    state = {f"vision_model.head.{k}": v.to(torch.float16) for k, v in reference.state_dict().items()}
    state["vision_model.post_layernorm.weight"] = torch.ones(32)
    ours = head_from_state(state, heads=4)
    reference.load_state_dict({k[len("vision_model.head."):]: v.float() for k, v in state.items() if ".head." in k})
    hidden = torch.randn(2, 9, 32)
    with torch.no_grad():
        assert relative(ours(hidden), reference(hidden)) < 1e-6
    with pytest.raises(KeyError, match="no SigLIP pooling head"):
        head_from_state({"vision_model.post_layernorm.weight": torch.ones(32)})


def test_rms_per_head_normalises_each_head():
    x = torch.randn(3, 8) * 5
    y = rms_per_head(x, 2)
    assert torch.allclose(y.view(3, 2, 4).pow(2).mean(-1), torch.ones(3, 2), atol=1e-4)
