"""RB-Guidance on Qwen-Image (and its edit variant) and Z-Image, in process with ComfyUI's model classes
(rb_qwen_zimage_inprocess.py): strength 0 is ComfyUI's CFGGuider bit for bit, the push equals a hand computation,
the subject mask is the block of image tokens that attend to the subject word, an edit's reference tokens stay
out of the features and maps, and the subject word is found with each model's own tokenizer. ComfyUI 0.3.64 has
neither family: this file runs on the releases that have them (not listed in tests/oldest_host.txt)."""
from pathlib import Path

import pytest

from support.testing import facts_in_comfyui

SCRIPT = Path(__file__).with_name("rb_qwen_zimage_inprocess.py")
FAMILIES = ("qwen_image", "z_image")


@pytest.fixture(scope="module")
def facts(comfyui):
    return facts_in_comfyui(SCRIPT, comfyui)


def test_strength_zero_samples_what_comfyuis_cfg_guider_samples(facts):
    assert facts["qwen_image"]["p0_equal"] and facts["qwen_image"]["p0_equal_edit"]
    assert facts["z_image"]["p0_equal"]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_push_is_the_hand_computed_gradient_through_the_flow_sampling(facts, family):
    hand = facts[family]["hand"]
    assert hand["before_window_equal"]
    assert hand["expected_max"] > 1e-3                                 # a real push, not a vanishing one
    assert hand["difference"] < 1e-5 * max(1.0, hand["expected_max"])
    assert hand["outside_mask"] == 0.0                                 # background gradient masking


@pytest.mark.parametrize("case", [("qwen_image", "mask"), ("qwen_image", "edit"), ("z_image", "mask")])
def test_the_subject_mask_is_the_image_tokens_that_attend_to_the_subject_word(facts, case):
    family, name = case
    seen = facts[family][name]
    assert seen["mask"] == seen["face"] and sum(seen["face"]) == 6
    assert seen["finite"] and seen["reference_passes"] == 1 and seen["guided_steps"] == 2
    assert seen["family"] == {"qwen_image": "Qwen-Image", "z_image": "Z-Image"}[family]
    # the default: Qwen-Image's at 0.75 of the depth (block 2 of 2), Z-Image's at 0.375 (main layer 1 of 2)
    assert seen["feature_block"] == {"qwen_image": 2, "z_image": 1}[family]
    width = {"qwen_image": 64, "z_image": 1056}[family]
    assert seen["features"] == [1, width, 4, 4] and seen["grid"] == [4, 4]
    cross, self_maps, row_sum_error = seen["maps"]
    assert cross == [1, 16] and self_maps == [1, 16, 16] and row_sum_error < 1e-5
    assert seen["reference_maps"]                                      # not recorded where nothing reads them


def test_an_edits_reference_tokens_stay_out_of_features_and_maps(facts):
    # negative: 16 generated tokens; positive: + 16 of the edit's reference latent, after them
    assert facts["qwen_image"]["edit"]["image_stream_tokens"] == [16, 32]


def test_the_subject_word_is_found_with_the_models_own_tokenizer(facts):
    words = facts["subject_words"]
    # Qwen-Image's conditioning starts at the prompt: 'a', ' photo', ' of', ' a', ' woman'
    assert words["qwen_image"] == [4, "'woman' at token 4 of the prompt"]
    # the edit encoder's conditioning puts <|vision_start|>, 64 image tokens and <|vision_end|> first
    assert words["qwen_image_edit"] == [70, "'woman' at token 70 of the prompt"]
    # Z-Image keeps its chat template: '<|im_start|>', 'user', newline, then the prompt
    assert words["z_image"] == [7, "'woman' at token 7 of the prompt"]
