"""Infinite-ID: mixed attention, cross-attention merging and AdaIN-mean against references."""
import pytest
import torch

from omniid.guidance.decoupled import COND, UNCOND, LayerInjection, sdpa_attention
from omniid.guidance.infinite_id import (STREAMS_KEY, STYLE_KEY, AdaINSettings, MixedSelfAttention,
                                         StreamCrossAttention, StreamLayout, adain, adain_mean,
                                         mixed_attention)
from support.testing import reference_attention as ref_attention

HEADS, DIM = 2, 16


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_mixed_attention_equals_the_reference():
    q_id, k_id, v_id = rand(2, 10, DIM, seed=1), rand(2, 10, DIM, seed=2), rand(2, 10, DIM, seed=3)
    k_t, v_t = rand(2, 10, DIM, seed=4), rand(2, 10, DIM, seed=5)
    out = mixed_attention(q_id, k_id, v_id, k_t, v_t, HEADS, sdpa_attention)
    expected = ref_attention(q_id, torch.cat([k_id, k_t], 1), torch.cat([v_id, v_t], 1), HEADS)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_without_the_text_stream_it_is_plain_self_attention_exactly():
    q, k, v = rand(2, 10, DIM, seed=6), rand(2, 10, DIM, seed=7), rand(2, 10, DIM, seed=8)
    assert torch.equal(mixed_attention(q, k, v, None, None, HEADS, sdpa_attention), sdpa_attention(q, k, v, HEADS))


def test_adain_mean_takes_the_target_mean_and_keeps_the_variance():
    x = rand(3, 50, DIM, seed=9) * 2.0 + 1.0
    target = rand(3, 40, DIM, seed=10) * 0.5 - 3.0
    styled = adain_mean(x, target)
    torch.testing.assert_close(styled.mean(1), target.mean(1), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(styled.var(1), x.var(1), atol=1e-5, rtol=1e-5)
    half = adain_mean(x, target, 0.5)
    torch.testing.assert_close(half.mean(1), (x.mean(1) + target.mean(1)) / 2, atol=1e-5, rtol=1e-5)


def test_plain_adain_also_takes_the_variance():
    x = rand(3, 50, DIM, seed=11) * 2.0 + 1.0
    target = rand(3, 40, DIM, seed=12) * 0.5 - 3.0
    styled = adain(x, target)
    torch.testing.assert_close(styled.mean(1), target.mean(1), atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(styled.var(1, unbiased=False), target.var(1, unbiased=False), atol=1e-3, rtol=1e-3)
    assert (styled.var(1) - x.var(1)).abs().max() > 1.0           # the spread of x is gone


def extra(rows=None, settings=None, cond_or_uncond=(1, 0), text_rows=None):
    """Options of a two-stream call: ``rows`` identity rows, each with a text row unless
    ``text_rows`` names which have one."""
    options = {"n_heads": HEADS, "cond_or_uncond": list(cond_or_uncond), "sigmas": torch.tensor([3.0])}
    if rows:
        options[STREAMS_KEY] = StreamLayout(rows, tuple(range(rows)) if text_rows is None else tuple(text_rows))
    if settings:
        options[STYLE_KEY] = settings
    return options


def test_self_attention_patch_mixes_only_the_identity_half():
    q, k, v = rand(4, 10, DIM, seed=13), rand(4, 10, DIM, seed=14), rand(4, 10, DIM, seed=15)
    patch = MixedSelfAttention(sdpa_attention)
    out = patch(q, k, v, extra(rows=2))
    assert torch.equal(out[2:], sdpa_attention(q[2:], k[2:], v[2:], HEADS))
    expected = ref_attention(q[:2], torch.cat([k[:2], k[2:]], 1), torch.cat([v[:2], v[2:]], 1), HEADS)
    torch.testing.assert_close(out[:2].double(), expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(patch(q, k, v, extra()), sdpa_attention(q, k, v, HEADS))      # no streams: plain


def test_adain_mean_inside_mixed_attention():
    q, k, v = rand(4, 10, DIM, seed=16), rand(4, 10, DIM, seed=17), rand(4, 10, DIM, seed=18)
    settings = AdaINSettings(strength=1.0)
    out = MixedSelfAttention(sdpa_attention)(q, k, v, extra(rows=2, settings=settings))
    q_id, k_id = adain_mean(q[:2], q[2:]), adain_mean(k[:2], k[2:])
    expected = ref_attention(q_id, torch.cat([k_id, k[2:]], 1), torch.cat([v[:2], v[2:]], 1), HEADS)
    torch.testing.assert_close(out[:2].double(), expected, atol=1e-5, rtol=1e-5)


def test_cross_attention_merging_adds_the_identity_to_the_identity_half_only():
    q = rand(4, 10, DIM, seed=19)
    k, v = rand(4, 7, DIM, seed=20), rand(4, 7, DIM, seed=21)
    keys = {COND: rand(5, DIM, seed=22), UNCOND: torch.zeros(1, DIM)}
    values = {COND: rand(5, DIM, seed=23), UNCOND: torch.zeros(1, DIM)}
    patch = StreamCrossAttention(sdpa_attention, [LayerInjection(keys, values, 0.6)])
    out = patch(q, k, v, extra(rows=2, cond_or_uncond=(0, 0)))
    assert torch.equal(out[2:], sdpa_attention(q[2:], k[2:], v[2:], HEADS))
    expected = ref_attention(q[:2], k[:2], v[:2], HEADS) + 0.6 * ref_attention(
        q[:2], keys[COND].expand(2, -1, -1), values[COND].expand(2, -1, -1), HEADS)
    torch.testing.assert_close(out[:2].double(), expected, atol=1e-5, rtol=1e-5)


def test_settings_are_checked():
    with pytest.raises(ValueError, match="AdaIN mode"):
        AdaINSettings(1.0, "whitening")
    assert not AdaINSettings(0.0).active


def test_identity_rows_without_a_text_partner_use_their_own_self_attention():
    """Layout [id_uncond, id_cond, text_cond]: the unconditional identity row is plain."""
    q, k, v = rand(3, 10, DIM, seed=24), rand(3, 10, DIM, seed=25), rand(3, 10, DIM, seed=26)
    out = MixedSelfAttention(sdpa_attention)(q, k, v, extra(rows=2, text_rows=[1]))
    assert torch.equal(out[0:1], sdpa_attention(q[0:1], k[0:1], v[0:1], HEADS))
    assert torch.equal(out[2:], sdpa_attention(q[2:], k[2:], v[2:], HEADS))
    expected = ref_attention(q[1:2], torch.cat([k[1:2], k[2:]], 1), torch.cat([v[1:2], v[2:]], 1), HEADS)
    torch.testing.assert_close(out[1:2].double(), expected, atol=1e-5, rtol=1e-5)


def test_dropping_a_text_row_identical_to_its_identity_row_changes_nothing():
    """Mixing attention with an identical copy of itself is plain attention: the reason the text
    stream can skip the unconditional branch when the identity's unconditional tokens are zero."""
    q, k, v = rand(2, 10, DIM, seed=27), rand(2, 10, DIM, seed=28), rand(2, 10, DIM, seed=29)
    both = MixedSelfAttention(sdpa_attention)(torch.cat([q, q]), torch.cat([k, k]), torch.cat([v, v]),
                                              extra(rows=2))
    reduced = MixedSelfAttention(sdpa_attention)(torch.cat([q, q[1:]]), torch.cat([k, k[1:]]),
                                                 torch.cat([v, v[1:]]), extra(rows=2, text_rows=[1]))
    torch.testing.assert_close(reduced[:2], both[:2], atol=1e-5, rtol=1e-5)
