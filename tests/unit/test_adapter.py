"""Identity adapters: this pack's format, h94 IP-Adapter layouts, projections, and fit checks."""
import math

import pytest
import torch
from safetensors.torch import save_file

from omniid.encoders.checkpoint import CheckpointError
from omniid.encoders.embeds import IdentityEmbeds
from omniid.guidance.adapter import AdapterConfig, create_adapter, h94_state_dict, save_adapter
from omniid.guidance.adapter_files import load_adapter
from omniid.guidance.decoupled import COND, UNCOND
from omniid.guidance.image_proj import PerceiverAttention, build_projection

DIMS = (32, 32, 64, 32)


def omni_embeds(tokens=8, width=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return IdentityEmbeds("omni_id", {"tokens": torch.randn(tokens, width, generator=g)}, {"num_images": 2})


def clip_embeds(n=2, t=5, c=24, seed=1, arcface=False):
    g = torch.Generator().manual_seed(seed)
    tensors = {"clip": torch.randn(n, t, c, generator=g), "clip_uncond": torch.randn(1, t, c, generator=g)}
    if arcface:
        tensors["arcface"] = torch.randn(n, 20, generator=g)
    return IdentityEmbeds("arcface_clip" if arcface else "clip", tensors, {"num_images": n})


PROJECTION_ARGS = {
    "plus": dict(dim=24, depth=2, heads=2, embedding_dim=24, output_dim=16, ff_mult=2, num_queries=3),
    "full_face": dict(clip_dim=24, output_dim=16),
    "faceid": dict(id_dim=20, hidden=40, output_dim=16, num_tokens=4),
    "faceid_plusv2": dict(id_dim=20, hidden=40, output_dim=16, num_tokens=4, dim=16, depth=1, heads=2,
                          embedding_dim=24, ff_mult=2),
}


def test_own_format_round_trip_and_tokens(tmp_path):
    adapter = create_adapter(AdapterConfig(family="unet", token_dim=16, layer_dims=DIMS), seed=0, name="mine")
    path = tmp_path / "omni.safetensors"
    save_adapter(adapter, str(path))
    loaded = load_adapter(str(path))
    assert loaded.config == adapter.config
    for key, value in adapter.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value)
    embeds = omni_embeds()
    tokens = loaded.identity_tokens(embeds)
    assert torch.equal(tokens[COND], embeds.tensors["tokens"]) and torch.equal(tokens[UNCOND], torch.zeros(1, 16))
    keys, values = loaded.layer_kv(2, tokens)
    torch.testing.assert_close(keys[COND], embeds.tensors["tokens"] @ adapter.layers[2].to_k.weight.T)
    assert values[UNCOND].abs().max() == 0 and keys[COND].shape == (8, 64)


def h94_state(adapter):
    """The h94 layout spelled out independently of the library's exporter."""
    state = {f"image_proj.{k}": v for k, v in adapter.image_proj.state_dict().items()}
    for i, layer in enumerate(adapter.layers):
        state[f"ip_adapter.{2 * i + 1}.to_k_ip.weight"] = layer.to_k.weight.detach().clone()
        state[f"ip_adapter.{2 * i + 1}.to_v_ip.weight"] = layer.to_v.weight.detach().clone()
    return state


@pytest.mark.parametrize("kind", list(PROJECTION_ARGS))
def test_h94_layouts_are_recognised_and_reproduce_the_projection(tmp_path, kind):
    config = AdapterConfig(family="unet", token_dim=16, layer_dims=DIMS, projection=kind,
                           projection_args=PROJECTION_ARGS[kind], source="h94")
    reference = create_adapter(config, seed=3)
    path = tmp_path / f"ip-adapter-{kind}.safetensors"
    spelled_out = h94_state(reference)
    exported = h94_state_dict(reference)
    assert exported.keys() == spelled_out.keys() and all(torch.equal(exported[k], spelled_out[k]) for k in exported)
    save_file({k: v.contiguous() for k, v in spelled_out.items()}, str(path))
    loaded = load_adapter(str(path), "h94")
    assert loaded.config.projection == kind and loaded.config.source == "h94"
    assert loaded.config.projection_args == PROJECTION_ARGS[kind] and loaded.config.layer_dims == DIMS
    embeds = clip_embeds(arcface=kind.startswith("faceid"))
    if kind == "faceid":
        embeds = IdentityEmbeds("arcface", {"arcface": embeds.tensors["arcface"]}, {"num_images": 2})
    ours, theirs = reference.identity_tokens(embeds, 0.7), loaded.identity_tokens(embeds, 0.7)
    for branch in (COND, UNCOND):
        torch.testing.assert_close(ours[branch], theirs[branch])
    per_image = {"plus": 3, "full_face": 5, "faceid": 4, "faceid_plusv2": 4}[kind]
    assert theirs[COND].shape == (2 * per_image, 16) and theirs[UNCOND].shape == (per_image, 16)


def test_h94_bin_files_are_read_as_plain_tensors(tmp_path):
    config = AdapterConfig(family="unet", token_dim=16, layer_dims=DIMS, projection="faceid",
                           projection_args=PROJECTION_ARGS["faceid"], source="h94")
    reference = create_adapter(config, seed=4)
    state = h94_state(reference)
    nested = {"image_proj": {k[11:]: v for k, v in state.items() if k.startswith("image_proj.")},
              "ip_adapter": {k[11:]: v for k, v in state.items() if k.startswith("ip_adapter.")}}
    torch.save(nested, str(tmp_path / "faceid.bin"))
    assert load_adapter(str(tmp_path / "faceid.bin")).config.projection == "faceid"
    torch.save({"something": torch.zeros(1)}, str(tmp_path / "other.bin"))
    with pytest.raises(CheckpointError, match="not an IP-Adapter file"):
        load_adapter(str(tmp_path / "other.bin"))


def test_base_ip_adapter_reads_the_pooled_embedding(tmp_path):
    save_file({"image_proj.proj.weight": torch.zeros(3072, 1024), "image_proj.proj.bias": torch.zeros(3072),
               "image_proj.norm.weight": torch.zeros(768), "image_proj.norm.bias": torch.zeros(768),
               "ip_adapter.1.to_k_ip.weight": torch.zeros(320, 768),
               "ip_adapter.1.to_v_ip.weight": torch.zeros(320, 768)}, str(tmp_path / "base.safetensors"))
    adapter = load_adapter(str(tmp_path / "base.safetensors"))
    assert adapter.config.projection == "pooled" and adapter.config.needs() == ("pooled",)
    assert adapter.config.projection_args == dict(pooled_dim=1024, output_dim=768, num_tokens=4)
    with pytest.raises(ValueError, match="needs pooled"):
        adapter.identity_tokens(clip_embeds(c=1024))


def test_embeds_that_do_not_fit_are_named():
    adapter = create_adapter(AdapterConfig(family="unet", token_dim=16, layer_dims=DIMS), name="omni.safetensors")
    with pytest.raises(ValueError, match=r"adapter 'omni.safetensors' \(omni_identity unet adapter.*needs tokens.*clip identity"):
        adapter.identity_tokens(clip_embeds())
    with pytest.raises(ValueError, match="width 16.*tokens \\(8, 20\\)"):
        adapter.identity_tokens(omni_embeds(width=20))
    faceid = create_adapter(AdapterConfig(family="unet", token_dim=16, layer_dims=DIMS, projection="faceid",
                                          projection_args=PROJECTION_ARGS["faceid"]), name="faceid")
    wrong = IdentityEmbeds("arcface", {"arcface": torch.zeros(2, 512)}, {"num_images": 2})
    with pytest.raises(ValueError, match="arcface features of width 20"):
        faceid.identity_tokens(wrong)


def test_perceiver_attention_equals_the_reference():
    torch.manual_seed(0)
    attn = PerceiverAttention(dim=16, dim_head=8, heads=2).eval()
    x, latents = torch.randn(2, 5, 16), torch.randn(2, 3, 16)
    with torch.no_grad():
        out = attn(x, latents)
        xn, ln = attn.norm1(x), attn.norm2(latents)
        q = ln @ attn.to_q.weight.T
        kv = torch.cat([xn, ln], 1) @ attn.to_kv.weight.T
        k, v = kv[..., :16], kv[..., 16:]
        heads = []
        for h in range(2):
            sl = slice(8 * h, 8 * (h + 1))
            heads.append(torch.softmax(q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(8), -1) @ v[..., sl])
        expected = torch.cat(heads, -1) @ attn.to_out.weight.T
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_unknown_projection_and_family():
    with pytest.raises(ValueError, match="projection"):
        build_projection("base", {})
    with pytest.raises(ValueError, match="family"):
        AdapterConfig(family="sd3", token_dim=1, layer_dims=(1,))
