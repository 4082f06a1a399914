"""Decoupled identity attention: the patch math against an independent reference."""
import copy

import pytest
import torch

from omniid.guidance.decoupled import (COND, UNCOND, BlockWeights, DecoupledAttention, LayerInjection,
                                       add_identity_to_joint_attention, mask_for_layer, sdpa_attention,
                                       token_grid)
from support.testing import reference_attention as ref_attention

HEADS, DIM = 4, 32


def make(seed=0, tokens=6, batch=2, length=12, ctx=5):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, length, DIM, generator=g)
    k = torch.randn(batch, ctx, DIM, generator=g)
    v = torch.randn(batch, ctx, DIM, generator=g)
    keys = {COND: torch.randn(tokens, DIM, generator=g), UNCOND: torch.randn(1, DIM, generator=g)}
    values = {COND: torch.randn(tokens, DIM, generator=g), UNCOND: torch.randn(1, DIM, generator=g)}
    return q, k, v, keys, values


def extra(cond_or_uncond=(1, 0), sigma=5.0, shape=None):
    return {"n_heads": HEADS, "sigmas": torch.tensor([sigma] * 2), "cond_or_uncond": list(cond_or_uncond),
            "original_shape": shape}


def test_patched_attention_equals_the_reference():
    q, k, v, keys, values = make()
    patch = DecoupledAttention(sdpa_attention, [LayerInjection(keys, values, weight=0.7)])
    out = patch(q, k, v, extra(cond_or_uncond=(1, 0)))
    expected = ref_attention(q, k, v, HEADS)
    # batch row 0 is the uncond chunk, row 1 the cond chunk
    for row, branch in ((0, UNCOND), (1, COND)):
        ip = ref_attention(q[row:row + 1], keys[branch][None], values[branch][None], HEADS)
        expected[row] += 0.7 * ip[0]
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


def test_weight_zero_is_bit_identical_to_no_patch():
    q, k, v, keys, values = make(1)
    plain = sdpa_attention(q, k, v, HEADS)
    patched = DecoupledAttention(sdpa_attention, [LayerInjection(keys, values, weight=0.0)])(q, k, v, extra())
    assert torch.equal(plain, patched)


@pytest.mark.parametrize("sigma", [20.0, 0.5])
def test_outside_the_sigma_window_is_bit_identical(sigma):
    q, k, v, keys, values = make(2)
    injection = LayerInjection(keys, values, weight=1.0, sigma_start=10.0, sigma_end=1.0)
    patch = DecoupledAttention(sdpa_attention, [injection])
    assert torch.equal(patch(q, k, v, extra(sigma=sigma)), sdpa_attention(q, k, v, HEADS))
    assert not torch.equal(patch(q, k, v, extra(sigma=5.0)), sdpa_attention(q, k, v, HEADS))


def test_where_the_mask_is_zero_nothing_changes():
    q, k, v, keys, values = make(3, length=12)
    mask = torch.zeros(1, 24, 32)
    mask[:, :, 16:] = 1.0                       # right half of a 3 x 4 token grid (latent 6 x 8 -> factor 2)
    patch = DecoupledAttention(sdpa_attention, [LayerInjection(keys, values, weight=1.0, mask=mask)])
    out = patch(q, k, v, extra(shape=[2, 4, 6, 8]))
    plain = sdpa_attention(q, k, v, HEADS)
    grid = mask_for_layer(mask, 12, (6, 8))[0, :, 0]
    assert torch.equal(out[:, grid == 0], plain[:, grid == 0])
    assert (out[:, grid == 1] - plain[:, grid == 1]).abs().max() > 1e-3
    all_zero = DecoupledAttention(sdpa_attention, [LayerInjection(keys, values, 1.0, mask=torch.zeros(1, 6, 8))])
    assert torch.equal(all_zero(q, k, v, extra(shape=[2, 4, 6, 8])), plain)


def test_stacked_adapters_add_up_and_keep_a_foreign_base():
    q, k, v, keys, values = make(4)
    _, _, _, keys2, values2 = make(5)
    a = LayerInjection(keys, values, 0.5)
    b = LayerInjection(keys2, values2, 1.5)
    both = DecoupledAttention(sdpa_attention, [a]).with_injection(b)(q, k, v, extra())
    only_a = DecoupledAttention(sdpa_attention, [a])(q, k, v, extra())
    only_b = DecoupledAttention(sdpa_attention, [b])(q, k, v, extra())
    plain = sdpa_attention(q, k, v, HEADS)
    torch.testing.assert_close(both, only_a + only_b - plain, atol=1e-5, rtol=1e-5)

    calls = []

    def foreign(q_, k_, v_, extra_):
        calls.append(1)
        return torch.zeros_like(q_)

    kept = DecoupledAttention(sdpa_attention, [a], base=foreign)(q, k, v, extra())
    torch.testing.assert_close(kept, only_a - plain, atol=1e-5, rtol=1e-5)
    assert calls == [1]


def test_clone_shares_the_injection_tensors():
    q, k, v, keys, values = make(6)
    patch = DecoupledAttention(sdpa_attention, [LayerInjection(keys, values, 1.0)])
    copied = copy.deepcopy({"p": patch})["p"]
    assert copied is not patch and copied.injections[0] is patch.injections[0]


def test_batch_with_only_the_conditional_branch():
    q, k, v, keys, values = make(7)
    out = DecoupledAttention(sdpa_attention, [LayerInjection(keys, values, 1.0)])(q, k, v, extra(cond_or_uncond=(0,)))
    expected = ref_attention(q, k, v, HEADS) + ref_attention(q, keys[COND].expand(2, -1, -1),
                                                             values[COND].expand(2, -1, -1), HEADS)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("hw,tokens,grid", [((64, 64), 4096, (64, 64)), ((64, 64), 256, (16, 16)),
                                            ((75, 51), 988, (38, 26)), ((75, 51), 247, (19, 13))])
def test_token_grid_for_any_aspect_ratio(hw, tokens, grid):
    assert token_grid(tokens, *hw) == grid


def test_token_grid_rejects_impossible_counts():
    with pytest.raises(ValueError, match="cannot place"):
        token_grid(1000, 64, 64)


def test_block_weights():
    weights = BlockWeights.parse("all=0.5, input=0, output.4=2, middle=1")
    assert weights.weight("input", 1) == 0 and weights.weight("output", 4) == 2
    assert weights.weight("output", 3) == 0.5 and weights.weight("middle", 0) == 1
    assert BlockWeights.parse("").weight("double", 3) == 1.0
    assert BlockWeights.parse("single=0").weight("double", 0) == 1.0
    for bad in ("input", "all.3=1", "decoder=1", "input=x"):
        with pytest.raises(ValueError, match="block weight|'all'"):
            BlockWeights.parse(bad)


def test_joint_attention_adds_the_identity_to_image_tokens_only():
    g = torch.Generator().manual_seed(8)
    b, heads, d, txt, img, extra_tokens = 2, HEADS, DIM // HEADS, 3, 12, 2
    q = torch.randn(b, heads, txt + img + extra_tokens, d, generator=g)
    out = torch.randn(b, txt + img + extra_tokens, heads * d, generator=g)
    keys = {COND: torch.randn(5, DIM, generator=g), UNCOND: torch.zeros(1, DIM)}
    values = {COND: torch.randn(5, DIM, generator=g), UNCOND: torch.zeros(1, DIM)}
    injection = LayerInjection(keys, values, 0.8)
    result = add_identity_to_joint_attention(out, q, txt, injection, sdpa_attention, [0, 0], latent_hw=(6, 8))
    assert torch.equal(result[:, :txt], out[:, :txt]) and torch.equal(result[:, txt + img:], out[:, txt + img:])
    image_q = q[:, :, txt:txt + img].transpose(1, 2).reshape(b, img, DIM)
    expected = out[:, txt:txt + img].double() + 0.8 * ref_attention(image_q, keys[COND].expand(b, -1, -1),
                                                                     values[COND].expand(b, -1, -1), HEADS)
    torch.testing.assert_close(result[:, txt:txt + img].double(), expected, atol=1e-5, rtol=1e-5)
