"""RB-Guidance on Qwen-Image and Qwen-Image-Edit, in process with ComfyUI's model classes
(rb_qwen_zimage_inprocess.py --family qwen_image), on both hosts: strength 0 is ComfyUI's CFGGuider bit for bit,
the push equals a hand computation, the subject mask is the block of image tokens that attend to the subject word,
an edit's reference tokens stay out of the features and maps, and the subject word is found with Qwen-Image's own
Qwen2.5-VL tokenizer at the conditioning's positions."""
from pathlib import Path

import pytest

from support.testing import facts_in_comfyui

SCRIPT = Path(__file__).with_name("rb_qwen_zimage_inprocess.py")


@pytest.fixture(scope="module")
def facts(comfyui):
    return facts_in_comfyui(SCRIPT, comfyui, "--family", "qwen_image")


def test_strength_zero_samples_what_comfyuis_cfg_guider_samples(facts):
    assert facts["p0_equal"] and facts["p0_equal_edit"]


def test_the_push_is_the_hand_computed_gradient_through_the_flow_sampling(facts):
    hand = facts["hand"]
    assert hand["before_window_equal"]
    assert hand["expected_max"] > 1e-3                                 # a real push, not a vanishing one
    assert hand["difference"] < 1e-5 * max(1.0, hand["expected_max"])
    assert hand["outside_mask"] == 0.0                                 # background gradient masking


@pytest.mark.parametrize("case", ["mask", "edit"])
def test_the_subject_mask_is_the_image_tokens_that_attend_to_the_subject_word(facts, case):
    seen = facts[case]
    assert seen["mask"] == seen["face"] and sum(seen["face"]) == 6
    assert seen["finite"] and seen["reference_passes"] == 1 and seen["guided_steps"] == 2
    assert seen["family"] == "Qwen-Image" and seen["feature_block"] == 2      # the default: 0.75 of 2 blocks
    assert seen["features"] == [1, 64, 4, 4] and seen["grid"] == [4, 4]
    cross, self_maps, row_sum_error = seen["maps"]
    assert cross == [1, 16] and self_maps == [1, 16, 16] and row_sum_error < 1e-5
    assert seen["reference_maps"]                                      # not recorded where nothing reads them


def test_an_edits_reference_tokens_stay_out_of_features_and_maps(facts):
    # negative: 16 generated tokens; positive: + 16 of the edit's reference latent, after them
    assert facts["edit"]["image_stream_tokens"] == [16, 32]


def test_the_subject_word_is_found_with_the_models_own_tokenizer(facts):
    words = facts["subject_words"]
    # the conditioning starts at the prompt: 'a', ' photo', ' of', ' a', ' woman'
    assert words["qwen_image"] == [4, "'woman' at token 4 of the prompt"]
    # the edit encoder's conditioning puts <|vision_start|>, 64 image tokens and <|vision_end|> first
    assert words["qwen_image_edit"] == [70, "'woman' at token 70 of the prompt"]


def test_the_nodes_setup_reads_the_subject_from_the_prompt_and_names_the_block(facts):
    node = facts["node"]
    assert node["subject_token"] == 4
    mask_line = "generated-face mask: attention of 'woman' at token 4 of the prompt, refined by self-attention"
    assert mask_line in node["lines"]
    assert "features: Qwen-Image block 2 of 2 (double block 1), the generated image's tokens" in node["lines"]
