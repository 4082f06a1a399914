"""The Omni-ID encoder and the baseline encoders, on small random modules of the real architecture."""
import math

import pytest
import torch
import torch.nn.functional as F

from omniid.encoders.checkpoint import CheckpointError, load_encoder, save_encoder
from omniid.encoders.omni_id import EncoderConfig, create_encoder, image_key_mask

SMALL = dict(clip_dim=48, tokens_per_image=5, dim=32, num_queries=8, num_heads=4, cross_depth=2,
             self_depth=2, mlp_ratio=2.0, id_dim=16, id_hidden=24)


def small(architecture="omni_id", **overrides):
    return create_encoder(EncoderConfig(architecture=architecture, **{**SMALL, **overrides}), seed=0).eval()


def tokens(n, seed=1, cfg=SMALL):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, cfg["tokens_per_image"], cfg["clip_dim"], generator=g)


# ----------------------------------------------------------------- independent reference
def ref_layer_norm(x, sd, prefix):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + 1e-5) * sd[prefix + ".weight"] + sd[prefix + ".bias"]


def ref_linear(x, sd, prefix):
    return x @ sd[prefix + ".weight"].T + sd[prefix + ".bias"]


def ref_attention(x, ctx, sd, prefix, heads, valid=None):
    """Multi-head attention written out: per head, softmax(q k^T / sqrt(d)) v, masked keys excluded."""
    q, k, v = (ref_linear(t, sd, f"{prefix}.to_{n}") for t, n in ((x, "q"), (ctx, "k"), (ctx, "v")))
    d = q.shape[-1] // heads
    outs = []
    for h in range(heads):
        sl = slice(h * d, (h + 1) * d)
        scores = q[..., sl] @ k[..., sl].transpose(-1, -2) / math.sqrt(d)
        if valid is not None:
            scores = scores.masked_fill(~valid[:, None, :], float("-inf"))
        outs.append(torch.softmax(scores, -1) @ v[..., sl])
    return ref_linear(torch.cat(outs, -1), sd, f"{prefix}.to_out")


def ref_mlp(x, sd, prefix):
    return ref_linear(F.gelu(ref_linear(x, sd, prefix + ".0")), sd, prefix + ".2")


def ref_omni_id(encoder, clip_tokens, valid=None):
    sd = {k: v.double() for k, v in encoder.state_dict().items()}
    cfg = encoder.config
    ctx = ref_linear(clip_tokens.double(), sd, "transformer.proj_in")
    x = sd["queries"].expand(clip_tokens.shape[0], -1, -1)
    for i in range(cfg.cross_depth):
        p = f"transformer.cross_blocks.{i}"
        x = x + ref_attention(ref_layer_norm(x, sd, p + ".norm_q"), ref_layer_norm(ctx, sd, p + ".norm_kv"),
                              sd, p + ".attn", cfg.num_heads, valid)
        x = x + ref_mlp(ref_layer_norm(x, sd, p + ".norm_mlp"), sd, p + ".mlp")
    for i in range(cfg.self_depth):
        p = f"transformer.self_blocks.{i}"
        h = ref_layer_norm(x, sd, p + ".norm")
        x = x + ref_attention(h, h, sd, p + ".attn", cfg.num_heads)
        x = x + ref_mlp(ref_layer_norm(x, sd, p + ".norm_mlp"), sd, p + ".mlp")
    return ref_layer_norm(x, sd, "transformer.norm_out")


# ----------------------------------------------------------------- tests
@pytest.mark.parametrize("n", [1, 3, 7])
def test_output_is_256_by_1280_for_any_number_of_photos(n):
    cfg = EncoderConfig(cross_depth=1, self_depth=1, mlp_ratio=1.0)        # real widths, shallow
    encoder = create_encoder(cfg, seed=0).eval()
    with torch.no_grad():
        out = encoder(clip_tokens=torch.randn(1, n, 257, 1280))
    assert out.shape == (1, 256, 1280) and torch.isfinite(out).all()


def test_defaults_and_their_parameter_count():
    cfg = EncoderConfig()
    assert (cfg.clip_dim, cfg.tokens_per_image, cfg.num_queries, cfg.dim) == (1280, 257, 256, 1280)
    assert (cfg.cross_depth, cfg.self_depth, cfg.num_heads) == (4, 2, 20)
    with torch.device("meta"):
        count = sum(p.numel() for p in create_encoder(cfg).parameters())
    assert 110e6 < count < 125e6


def test_forward_equals_the_independent_reference():
    encoder = small()
    x = tokens(3)[None]
    with torch.no_grad():
        out = encoder(clip_tokens=x)
    torch.testing.assert_close(out.double(), ref_omni_id(encoder, x.reshape(1, -1, SMALL["clip_dim"])),
                               atol=1e-5, rtol=1e-5)


def test_masked_attention_equals_the_reference():
    encoder = small()
    x = torch.stack([tokens(3, seed=2), tokens(3, seed=3)])
    counts = [3, 1]
    valid = image_key_mask(counts, SMALL["tokens_per_image"])
    with torch.no_grad():
        out = encoder(clip_tokens=x, counts=counts)
    expected = ref_omni_id(encoder, x.reshape(2, -1, SMALL["clip_dim"]), valid)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_order_of_the_photos_does_not_matter():
    encoder = small()
    x = tokens(6, seed=4)
    with torch.no_grad():
        base = encoder(clip_tokens=x[None])
        for perm in (torch.randperm(6, generator=torch.Generator().manual_seed(s)) for s in range(3)):
            assert (encoder(clip_tokens=x[perm][None]) - base).abs().max() < 1e-5


def test_padded_batch_equals_separate_runs():
    encoder = small()
    people = [tokens(n, seed=10 + n) for n in (1, 4, 2)]
    longest = max(p.shape[0] for p in people)
    padded = torch.stack([F.pad(p, (0, 0, 0, 0, 0, longest - p.shape[0]), value=7.0) for p in people])
    with torch.no_grad():
        batched = encoder(clip_tokens=padded, counts=[p.shape[0] for p in people])
        for i, person in enumerate(people):
            torch.testing.assert_close(batched[i], encoder(clip_tokens=person[None])[0], atol=1e-5, rtol=1e-5)


def test_more_photos_change_the_representation():
    encoder = small()
    x = tokens(3, seed=5)
    with torch.no_grad():
        assert (encoder(clip_tokens=x[None, :1]) - encoder(clip_tokens=x[None])).abs().max() > 1e-3


def test_arcface_baseline_concat_and_average():
    encoder = small("arcface")
    emb = torch.randn(1, 3, SMALL["id_dim"])
    with torch.no_grad():
        concat = encoder(arcface=emb, arcface_merge="concat")
        average = encoder(arcface=emb, arcface_merge="average")
        single = [encoder(arcface=emb[:, i:i + 1], arcface_merge="concat") for i in range(3)]
        mean_alone = encoder(arcface=emb.mean(1, keepdim=True))
    assert concat.shape == (1, 3 * SMALL["num_queries"], SMALL["dim"])
    assert average.shape == (1, SMALL["num_queries"], SMALL["dim"])
    torch.testing.assert_close(concat, torch.cat(single, 1))
    torch.testing.assert_close(average, mean_alone)


def test_arcface_clip_baseline_uses_both_and_ignores_order():
    encoder = small("arcface_clip")
    x, emb = tokens(4, seed=6)[None], torch.randn(1, 4, SMALL["id_dim"])
    perm = torch.tensor([2, 0, 3, 1])
    with torch.no_grad():
        out = encoder(clip_tokens=x, arcface=emb)
        assert out.shape == (1, SMALL["num_queries"], SMALL["dim"])
        assert (encoder(clip_tokens=x[:, perm], arcface=emb[:, perm]) - out).abs().max() < 1e-5
        assert (encoder(clip_tokens=x, arcface=emb * 2) - out).abs().max() > 1e-3
    with pytest.raises(ValueError, match="ArcFace"):
        encoder(clip_tokens=x)


def test_wrong_inputs_are_named():
    encoder = small()
    with pytest.raises(ValueError, match="48"):
        encoder(clip_tokens=torch.randn(1, 2, 5, 40))
    with pytest.raises(ValueError, match="counts"):
        encoder(clip_tokens=tokens(2)[None], counts=[3])
    with pytest.raises(ValueError, match="CLIP tokens"):
        encoder(arcface=torch.randn(1, 2, 16))
    with pytest.raises(ValueError, match="architecture"):
        EncoderConfig(architecture="vit")
    with pytest.raises(ValueError, match="divisible"):
        EncoderConfig(dim=30, num_heads=4)
    with pytest.raises(ValueError, match="cross_depth"):
        EncoderConfig(cross_depth=0)


# ----------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("architecture", ["omni_id", "arcface", "arcface_clip"])
def test_save_then_load_is_bit_exact(tmp_path, architecture):
    encoder = small(architecture)
    path = tmp_path / "enc.safetensors"
    save_encoder(encoder, str(path), extra={"trained_steps": 0})
    loaded = load_encoder(str(path))
    assert loaded.config == encoder.config
    original, restored = encoder.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    assert not any(p.is_meta for p in loaded.parameters())


def test_truncated_checkpoint_names_the_file_and_the_problem(tmp_path):
    path = tmp_path / "cut.safetensors"
    save_encoder(small(), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut\.safetensors.*not a readable safetensors file.*truncated"):
        load_encoder(str(path))
    path.write_bytes(data[:5])
    with pytest.raises(CheckpointError, match="cut.safetensors"):
        load_encoder(str(path))


def test_foreign_checkpoints_are_recognised(tmp_path):
    from safetensors.torch import save_file
    sd_path = tmp_path / "sd.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(2)}, str(sd_path))
    with pytest.raises(CheckpointError, match=r"sd\.safetensors is not an OmniIdentity encoder.*Stable Diffusion"):
        load_encoder(str(sd_path))
    ip_path = tmp_path / "ip.safetensors"
    save_file({"image_proj.proj.weight": torch.zeros(2)}, str(ip_path))
    with pytest.raises(CheckpointError, match="IP-Adapter"):
        load_encoder(str(ip_path))
    pickled = tmp_path / "old.ckpt"
    torch.save({"queries": torch.zeros(2)}, str(pickled))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_encoder(str(pickled))
    with pytest.raises(CheckpointError, match="not found"):
        load_encoder(str(tmp_path / "absent.safetensors"))


def test_checkpoint_not_matching_its_config(tmp_path):
    import json

    from safetensors.torch import save_file
    encoder = small()
    state = dict(encoder.state_dict())
    state["queries"] = torch.zeros(3, 3)
    del state["transformer.norm_out.bias"]
    header = {"format": "omni_identity.encoder", "version": 1, "config": encoder.config.to_dict()}
    path = tmp_path / "bad.safetensors"
    save_file(state, str(path), metadata={"omni_identity": json.dumps(header)})
    with pytest.raises(CheckpointError, match=r"does not match.*missing tensors.*norm_out.bias.*queries"):
        load_encoder(str(path))
    header["version"] = 99
    save_file(dict(encoder.state_dict()), str(path), metadata={"omni_identity": json.dumps(header)})
    with pytest.raises(CheckpointError, match="version 99.*update"):
        load_encoder(str(path))


def test_infinite_id_extractor_concatenates_the_two_mapped_features():
    """c_id = Concat(M_clip(E_clip(FA(x))), M_face(E_face(FA(x)))), written out here with the module's weights."""
    import torch.nn.functional as F
    config = EncoderConfig(architecture="infinite_id", clip_dim=48, dim=32, num_heads=4, id_hidden=24, face_tokens=3)
    encoder = create_encoder(config, seed=0).eval()
    g = torch.Generator().manual_seed(1)
    clip, arcface = torch.randn(2, 2, 9, 48, generator=g), torch.randn(2, 2, 512, generator=g)
    with torch.no_grad():
        out = encoder(clip_tokens=clip, arcface=arcface, counts=[2, 1])
    for b, count in enumerate((2, 1)):
        e_clip, e_face = clip[b, :count].mean(0), arcface[b, :count].mean(0)
        norm, fc1, _, fc2 = encoder.clip_mapper
        mapped_clip = fc2(F.gelu(fc1(F.layer_norm(e_clip, (48,), norm.weight, norm.bias))))
        mlp, face_norm = encoder.face_mapper.mlp, encoder.face_mapper.norm
        face = mlp[2](F.gelu(mlp[0](e_face))).view(3, 32)
        mapped_face = F.layer_norm(face, (32,), face_norm.weight, face_norm.bias)
        expected = torch.cat([mapped_clip, mapped_face])
        assert out[b].shape == (9 + 3, 32)
        torch.testing.assert_close(out[b], expected.detach(), atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="needs ArcFace embeddings"):
        encoder(clip_tokens=clip)
