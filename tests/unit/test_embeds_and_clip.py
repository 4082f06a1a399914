"""IDENTITY_EMBEDS files and merging, CLIP penultimate tokens through open_clip, the token cache."""
import pytest
import torch

from omniid.encoders.checkpoint import CheckpointError
from omniid.encoders.clip_features import OpenCLIPTokens, TokenCache, clip_preprocess
from omniid.encoders.embeds import IdentityEmbeds, combine_embeds, load_embeds, save_embeds
from omniid.encoders.identity import baseline_embeds, omni_id_embeds
from omniid.encoders.omni_id import EncoderConfig, create_encoder


def omni(seed, n=3):
    g = torch.Generator().manual_seed(seed)
    return IdentityEmbeds("omni_id", {"tokens": torch.randn(8, 4, generator=g)}, {"num_images": n})


def test_save_and_load_are_bit_exact(tmp_path):
    g = torch.Generator().manual_seed(0)
    embeds = IdentityEmbeds("arcface_clip", {"clip": torch.randn(3, 5, 6, generator=g),
                                              "arcface": torch.randn(3, 16, generator=g),
                                              "tokens": torch.randn(8, 4, generator=g).half()},
                            {"num_images": 3, "skipped_images": [1], "encoder": "x.safetensors"})
    path = tmp_path / "me.safetensors"
    save_embeds(embeds, str(path))
    loaded = load_embeds(str(path))
    assert loaded.kind == embeds.kind and loaded.info == embeds.info
    for name, tensor in embeds.tensors.items():
        assert loaded.tensors[name].dtype == tensor.dtype and torch.equal(loaded.tensors[name], tensor)


def test_loading_something_else_is_a_clear_error(tmp_path):
    from omniid.encoders.checkpoint import save_encoder
    path = tmp_path / "enc.safetensors"
    save_encoder(create_encoder(EncoderConfig(clip_dim=8, dim=8, num_queries=2, num_heads=2, cross_depth=1,
                                              self_depth=0, id_hidden=4)), str(path))
    with pytest.raises(CheckpointError, match="omni_identity.encoder.*not an OmniIdentity embeds file"):
        load_embeds(str(path))


def test_concat_and_weighted_average():
    a, b = omni(1, n=2), omni(2, n=5)
    cat = combine_embeds([a, b], "concat")
    assert cat.tensors["tokens"].shape == (16, 4) and cat.num_images == 7
    avg = combine_embeds([a, b], "average", weights=[3.0, 1.0])
    torch.testing.assert_close(avg.tensors["tokens"], (3 * a.tensors["tokens"] + b.tensors["tokens"]) / 4)


def test_average_of_per_photo_parts_weights_every_photo():
    a = IdentityEmbeds("arcface", {"arcface": torch.tensor([[1.0, 0.0], [3.0, 0.0]])}, {"num_images": 2})
    b = IdentityEmbeds("arcface", {"arcface": torch.tensor([[0.0, 6.0]])}, {"num_images": 1})
    avg = combine_embeds([a, b], "average")
    torch.testing.assert_close(avg.tensors["arcface"], torch.tensor([[4.0 / 3, 2.0]]))


def test_combine_refuses_mismatches():
    with pytest.raises(ValueError, match="different kinds"):
        combine_embeds([omni(1), IdentityEmbeds("clip", {"clip": torch.zeros(1, 2, 3)})])
    with pytest.raises(ValueError, match="equal token shapes"):
        combine_embeds([omni(1), IdentityEmbeds("omni_id", {"tokens": torch.zeros(3, 4)})], "average")
    with pytest.raises(ValueError, match="weights"):
        combine_embeds([omni(1), omni(2)], "average", weights=[0.0, 0.0])


def test_baselines_raw_and_projected():
    clip = torch.randn(3, 5, 48)
    arc = torch.randn(3, 16)
    raw = baseline_embeds("clip", clip_tokens=clip)
    assert set(raw.tensors) == {"clip"} and torch.equal(raw.tensors["clip"], clip)
    cfg = dict(clip_dim=48, tokens_per_image=5, dim=32, num_queries=8, num_heads=4, cross_depth=1,
               self_depth=1, id_dim=16, id_hidden=24)
    proj = create_encoder(EncoderConfig(architecture="arcface", **cfg), seed=0).eval()
    concat = baseline_embeds("arcface", arcface=arc, encoder=proj, arcface_merge="concat")
    assert concat.tensors["tokens"].shape == (24, 32) and concat.tensors["arcface"].shape == (3, 16)
    both = create_encoder(EncoderConfig(architecture="arcface_clip", **cfg), seed=0).eval()
    fused = baseline_embeds("arcface_clip", clip_tokens=clip, arcface=arc, encoder=both)
    assert fused.tensors["tokens"].shape == (8, 32)
    with pytest.raises(ValueError, match="is an 'arcface' encoder; the arcface_clip baseline needs an 'arcface_clip'"):
        baseline_embeds("arcface_clip", clip_tokens=clip, arcface=arc, encoder=proj)
    with pytest.raises(ValueError, match="connect a CLIP vision"):
        baseline_embeds("clip")
    with pytest.raises(ValueError, match="Encode Baseline"):
        omni_id_embeds(proj, clip, {})


def tiny_open_clip():
    import open_clip
    from open_clip.model import CLIPTextCfg, CLIPVisionCfg
    torch.manual_seed(0)
    vision = CLIPVisionCfg(layers=3, width=48, head_width=16, patch_size=16, image_size=64)
    text = CLIPTextCfg(context_length=8, vocab_size=100, width=32, heads=2, layers=1)
    return open_clip.model.CLIP(embed_dim=24, vision_cfg=vision, text_cfg=text).eval()


def test_open_clip_penultimate_tokens_lead_to_the_model_output():
    model = tiny_open_clip()
    tokens = OpenCLIPTokens(model)
    images = torch.rand(2, 80, 100, 3)
    penultimate = tokens(images)
    assert penultimate.shape == (2, 1 + 16, 48)
    visual = model.visual
    with torch.no_grad():
        x = visual.transformer.resblocks[-1](penultimate)
        pooled = visual.ln_post(x)[:, 0] @ visual.proj
        expected = visual(clip_preprocess(images, 64, tokens.mean, tokens.std))
    torch.testing.assert_close(pooled, expected, atol=1e-5, rtol=1e-5)


def test_clip_preprocess_resizes_the_short_side_and_centre_crops():
    image = torch.zeros(1, 100, 300, 3)
    image[:, :, 100:200] = 1.0                         # a white centre third
    out = clip_preprocess(image, 50, mean=(0, 0, 0), std=(1, 1, 1))
    assert out.shape == (1, 3, 50, 50)
    assert out[0, :, :, 5:45].min() > 0.99             # the crop is the centre


def test_token_cache_encodes_only_new_photos():
    calls = []

    def encode(images):
        calls.append(len(images))
        return images.mean((1, 2))[:, None, :].repeat(1, 2, 1)

    cache = TokenCache(capacity=3)
    photos = torch.rand(4, 8, 8, 3)
    first, new = cache.encode(photos[:3], encode, "clip-a")
    again, new_again = cache.encode(photos[[2, 0, 1, 3]], encode, "clip-a")
    assert (new, new_again) == (3, 1) and calls == [3, 1]
    torch.testing.assert_close(again[:3], first[[2, 0, 1]])
    _, other_model = cache.encode(photos[:1], encode, "clip-b")
    assert other_model == 1 and len(cache) == 3              # LRU capacity holds
    cache.forget("clip-a")
    assert len(cache) == 1 and cache.encode(photos[:1], encode, "clip-b")[1] == 0
