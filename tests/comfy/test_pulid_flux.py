"""PuLID-FLUX in ComfyUI's FLUX, in process (tests/comfy/pulid_inprocess.py): one whole denoising step equal
to the authors' Flux model with PuLID (their code, from the vendored archive), weight/mask/window
behaviour, several photos, and an XLabs IP-Adapter alongside with both effects present."""
from pathlib import Path

import pytest

from support.testing import facts_in_comfyui

SCRIPT = Path(__file__).with_name("pulid_inprocess.py")


@pytest.fixture(scope="module")
def facts(comfyui):
    return facts_in_comfyui(SCRIPT, comfyui)


def test_one_denoising_step_equals_the_authors_flux_with_pulid(facts):
    step = facts["step"]
    # float32 round-off, with an identity effect large enough to make the comparison meaningful
    assert step["difference"] <= 1e-5, step["cases"]
    assert step["effect_min"] > 0.05, step["effect"]
    assert set(step["cases"]) == {"distilled_w1", "true_cfg2_w0.8"}


def test_the_residual_goes_after_every_2nd_double_and_every_4th_single_block(facts):
    assert facts["patched_keys"] == [["double_block", 0], ["double_block", 2], ["single_block", 0], ["single_block", 4]]


def test_weight_zero_a_zero_mask_and_a_closed_window_sample_bit_identically(facts):
    assert facts["effect"] > 0.05
    assert facts["zero_equal"] and facts["masked_out_equal"] and facts["window_closed_equal"]
    assert facts["half_mask_vs_full"] > 1e-3 and facts["late_window_vs_full"] > 1e-3
    assert facts["plain_after_equal"]             # the input model is untouched
    assert facts["dtype_kept"]                    # moved with a float8 model, the modules keep their dtype


def test_several_photos_change_the_identity(facts):
    assert facts["three_photos_vs_one"] > 1e-3


def test_beside_an_xlabs_adapter_both_effects_are_present_in_either_order(facts):
    assert facts["xlabs_effect"] > 0.05
    for key in ("both_vs_xlabs", "both_vs_pulid", "reversed_vs_xlabs", "reversed_vs_pulid"):
        assert facts[key] > 0.05, (key, facts[key])


def test_a_file_for_another_flux_is_refused_naming_both(facts):
    message = facts["wrong_fit"]
    assert "3 cross-attention modules" in message and "which take 4 modules" in message


def test_two_people_with_masks_each_get_their_own_residual_on_their_half_only(facts):
    # two chained Apply nodes share one block patch; each half of the image tokens gets exactly its person's
    # residual (hand-computed from the module), on the conditional and unconditional rows alike
    assert facts["two_people_injections"] == 2
    assert facts["two_people_block_difference"] <= 1e-6
    assert facts["two_people_txt_untouched"]
    assert facts["two_people_people_differ"] > 1e-2          # the two identities give different residuals
