"""RB-Guidance's maps on a DiT's joint attention, and the subject word among T5 / Qwen tokens."""
import math

import torch

from omniid.guidance.joint_attention import JointAttentionMaps, pooled_grid
from omniid.guidance.rb_guidance import RBSettings, find_subject_token, generation_mask, word_spans

TXT, GRID, REF, HEADS, D = 5, (4, 6), 7, 3, 8


def joint_qk(seed=0):
    """(B, heads, L, d) queries and keys over [5 text | 4 x 6 generated | 7 reference] tokens."""
    g = torch.Generator().manual_seed(seed)
    length = TXT + GRID[0] * GRID[1] + REF
    return (torch.randn(2, HEADS, length, D, generator=g, dtype=torch.float64),
            torch.randn(2, HEADS, length, D, generator=g, dtype=torch.float64))


def test_maps_are_the_generated_tokens_rows_of_the_joint_softmax():
    q, k = joint_qk()
    maps = JointAttentionMaps(token=2, keep_self=True, max_tokens=None)
    maps.record(q, k, TXT, GRID)
    maps.record(q * 0.5, k, TXT, GRID)
    grid, cross, self_map = maps.maps()
    n = GRID[0] * GRID[1]
    expected_cross, expected_self = 0, 0
    for scale in (1.0, 0.5):
        for h in range(HEADS):
            rows = (q[:, h, TXT:TXT + n] * scale) @ k[:, h].transpose(-1, -2) / math.sqrt(D)   # (B, N, L)
            expected_cross = expected_cross + torch.softmax(rows, -1)[..., 2] / (2 * HEADS)
            expected_self = expected_self + torch.softmax(rows[..., TXT:TXT + n], -1) / (2 * HEADS)
    assert grid == GRID
    torch.testing.assert_close(cross, expected_cross.float(), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(self_map, expected_self.float(), rtol=1e-5, atol=1e-7)


def test_fine_grids_are_pooled_into_row_stochastic_maps():
    q, k = joint_qk(1)
    full = JointAttentionMaps(token=1, max_tokens=None)
    pooled = JointAttentionMaps(token=1, max_tokens=6)
    full.record(q, k, TXT, GRID)
    pooled.record(q, k, TXT, GRID)
    assert pooled_grid(GRID, 6) == ((2, 3), 2)
    _, cross, self_map = full.maps()
    grid, p_cross, p_self = pooled.maps()
    assert grid == (2, 3)
    cells = torch.arange(24).reshape(4, 6)
    cells = (cells // 6 // 2) * 3 + (cells % 6) // 2                       # fine token -> coarse cell
    one_hot = torch.nn.functional.one_hot(cells.reshape(-1), 6).float()    # (24, 6)
    torch.testing.assert_close(p_cross, cross @ one_hot / 4)
    torch.testing.assert_close(p_self, one_hot.T @ self_map @ one_hot / 4)
    torch.testing.assert_close(p_self.sum(-1), torch.ones(2, 6))


def test_subject_mask_concentrates_on_the_tokens_that_attend_to_the_subject():
    """Constructed case: the generated tokens of a 2 x 3 block query along the subject word's key; the
    paper's refined mask is that block."""
    g = torch.Generator().manual_seed(3)
    length = TXT + GRID[0] * GRID[1] + REF
    q = torch.randn(1, HEADS, length, D, generator=g) * 0.3
    k = torch.randn(1, HEADS, length, D, generator=g) * 0.3
    subject = 3
    face = torch.zeros(GRID, dtype=torch.bool)
    face[1:3, 2:5] = True
    rows = TXT + torch.nonzero(face.reshape(-1))[:, 0]
    q[:, :, rows] = 4.0 * k[:, :, subject:subject + 1]                     # these queries find the subject's key
    k[:, :, TXT:TXT + 24][:, :, face.reshape(-1)] += 0.5 * q[:, :, rows]   # and each other (self-attention)
    maps = JointAttentionMaps(token=subject, max_tokens=None)
    maps.record(q, k, TXT, GRID)
    grid, cross, self_map = maps.maps()
    assert set(cross[0].topk(6).indices.tolist()) == set(torch.nonzero(face.reshape(-1))[:, 0].tolist())
    features = torch.randn(1, 4, *GRID, generator=g)
    mask = generation_mask(features, grid, cross, self_map, torch.randn(3, 4), torch.ones(3, dtype=torch.bool),
                           RBSettings())
    assert torch.equal(mask[0], face.reshape(-1))


def test_reference_tokens_are_keys_never_queries():
    q, k = joint_qk(2)
    maps = JointAttentionMaps(token=0, max_tokens=None)
    maps.record(q, k, TXT, GRID)
    changed = q.clone()
    changed[:, :, TXT + 24:] = torch.randn_like(changed[:, :, TXT + 24:])  # other queries: Kontext's reference
    again = JointAttentionMaps(token=0, max_tokens=None)
    again.record(changed, k, TXT, GRID)
    assert torch.equal(maps.maps()[1], again.maps()[1]) and torch.equal(maps.maps()[2], again.maps()[2])


def test_subject_words_among_t5_and_byte_level_tokens():
    t5 = ["\u2581", "a", "\u2581photo", "\u2581of", "\u2581", "a", "\u2581woman", ",", "\u2581smiling", "</s>", "<pad>"]
    assert find_subject_token(t5) == (6, "woman")
    assert find_subject_token(t5, "smiling") == (8, "smiling")
    qwen = ["<|im_start|>", "user", "\u0120photo", "\u0120of", "\u0120a", "\u0120wo", "man", ".", "<|im_end|>"]
    assert word_spans(qwen)[-1] == (5, 6, "woman") and find_subject_token(qwen) == (6, "woman")
    clip = ["<|startoftext|>", "a</w>", "photo</w>", "of</w>", "a</w>", "man</w>", "<|endoftext|>"]
    assert find_subject_token(clip) == (5, "man")
