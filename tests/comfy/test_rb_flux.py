"""RB-Guidance on FLUX.1 dev and Kontext (and Chroma), in process with ComfyUI's model classes (rb_flux_inprocess.py):
strength 0 is ComfyUI's CFGGuider bit for bit, the push equals a hand computation, Kontext's reference
tokens stay out of the features and the attention maps."""
from pathlib import Path

import pytest

from support.testing import facts_in_comfyui

SCRIPT = Path(__file__).with_name("rb_flux_inprocess.py")


@pytest.fixture(scope="module")
def facts(comfyui):
    return facts_in_comfyui(SCRIPT, comfyui)


def test_strength_zero_samples_what_comfyuis_cfg_guider_samples(facts):
    assert facts["p0_equal_dev"] and facts["p0_equal_kontext"]


def test_the_push_is_the_hand_computed_gradient_through_the_flow_sampling(facts):
    hand = facts["hand"]
    assert facts["before_window_equal"]
    assert hand["expected_max"] > 1e-3                                 # a real push, not a vanishing one
    assert hand["difference"] < 1e-5 * max(1.0, hand["expected_max"]) * 10
    assert hand["outside_mask"] == 0.0                                 # background gradient masking


def test_kontext_features_and_maps_cover_the_generated_image_only(facts):
    kontext = facts["kontext"]
    assert kontext["finite"] and kontext["reference_passes"] == 1
    assert kontext["guided_steps"] == facts["expected_guided_steps"] > 0   # t = 1000 sigma <= 0.6 T
    assert kontext["image_stream_tokens"] == [16, 32]      # negative: 16 generated; positive: + 16 reference tokens
    assert kontext["feature_block"] == 2                               # the default: the last double block
    grid, cross, self_maps, row_sum_error = kontext["attention"]
    assert kontext["features"] == [1, 64, 4, 4] and grid == [4, 4]
    assert cross == [1, 16] and self_maps == [1, 16, 16] and row_sum_error < 1e-5
    assert kontext["reference_maps"]                                   # not recorded where nothing reads them


def test_chroma_is_its_own_table_entry_on_the_same_path(facts):
    chroma = facts["chroma"]
    if not chroma["built"]:
        # ComfyUI 0.3.64's Chroma takes the published width's heads whatever the weights say, so no small
        # Chroma loads there; RB-Guidance on Chroma is checked on the releases where one does
        assert "expected positional dim" in chroma["reason"], chroma["reason"]
        return
    assert chroma["family"] == "Chroma" and chroma["feature_block"] == 19      # the last of 19 double blocks
    assert chroma["p0_equal"] and chroma["finite"] and chroma["guided_steps"] == 2
    assert 1e-4 < chroma["moved"] < 1.0


def test_flux2_is_its_own_table_entry_on_the_same_path(facts):
    flux2 = facts["flux2"]
    if not flux2["built"]:                                             # ComfyUI 0.3.64 has no FLUX.2
        assert "does not detect these weights as FLUX.2" in flux2["reason"], flux2["reason"]
        return
    assert flux2["family"] == "FLUX.2" and flux2["feature_block"] == 1      # klein's layout here: 1 double block
    assert flux2["p0_equal"] and flux2["finite"] and flux2["guided_steps"] == 2
    assert 1e-4 < flux2["moved"] < 1.0


def test_the_subject_word_is_found_with_the_models_own_tokenizer(facts):
    words = facts["subject_words"]
    # T5 has no start token: 'a photo of a woman' -> '\u2581', 'a', '\u2581photo', '\u2581of', '\u2581', 'a', '\u2581woman'
    assert words["t5"] == [6, "'woman' at token 6 of the prompt"]
    if "qwen3" in words:            # klein's chat template comes first: '<|im_start|>', 'user', newline, then the prompt
        assert words["qwen3"] == [7, "'woman' at token 7 of the prompt"]
