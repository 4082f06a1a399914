"""RB-Guidance on Z-Image, in process with ComfyUI's model classes (rb_qwen_zimage_inprocess.py --family z_image):
strength 0 is ComfyUI's CFGGuider bit for bit, the push equals a hand computation, the subject mask is the block of
image tokens that attend to the subject word, and the subject word is found with Z-Image's own Qwen3 tokenizer.
ComfyUI 0.3.64 has no Z-Image: this file runs on the releases that have it (not listed in tests/oldest_host.txt)."""
from pathlib import Path

import pytest

from support.testing import facts_in_comfyui

SCRIPT = Path(__file__).with_name("rb_qwen_zimage_inprocess.py")


@pytest.fixture(scope="module")
def facts(comfyui):
    return facts_in_comfyui(SCRIPT, comfyui, "--family", "z_image")


def test_strength_zero_samples_what_comfyuis_cfg_guider_samples(facts):
    assert facts["p0_equal"]


def test_the_push_is_the_hand_computed_gradient_through_the_flow_sampling(facts):
    hand = facts["hand"]
    assert hand["before_window_equal"]
    assert hand["expected_max"] > 1e-3                                 # a real push, not a vanishing one
    assert hand["difference"] < 1e-5 * max(1.0, hand["expected_max"])
    assert hand["outside_mask"] == 0.0                                 # background gradient masking


def test_the_subject_mask_is_the_image_tokens_that_attend_to_the_subject_word(facts):
    seen = facts["mask"]
    assert seen["mask"] == seen["face"] and sum(seen["face"]) == 6
    assert seen["finite"] and seen["reference_passes"] == 1 and seen["guided_steps"] == 2
    assert seen["family"] == "Z-Image" and seen["feature_block"] == 1      # the default: 0.375 of 2 main layers
    assert seen["features"] == [1, 1056, 4, 4] and seen["grid"] == [4, 4]
    cross, self_maps, row_sum_error = seen["maps"]
    assert cross == [1, 16] and self_maps == [1, 16, 16] and row_sum_error < 1e-5
    assert seen["reference_maps"]                                      # not recorded where nothing reads them


def test_the_subject_word_is_found_with_the_models_own_tokenizer(facts):
    # Z-Image keeps its chat template: '<|im_start|>', 'user', newline, then 'a', ' photo', ' of', ' a', ' woman'
    assert facts["subject_words"]["z_image"] == [7, "'woman' at token 7 of the prompt"]


def test_the_nodes_setup_reads_the_subject_from_the_prompt_and_names_the_block(facts):
    node = facts["node"]
    assert node["subject_token"] == 7
    mask_line = "generated-face mask: attention of 'woman' at token 7 of the prompt, refined by self-attention"
    assert mask_line in node["lines"]
    assert "features: Z-Image block 1 of 2 (main layer 0), the generated image's tokens" in node["lines"]
