"""In process with ComfyUI's model classes: FLUX injection through dit patches (small FLUX config),
the cross-attention layouts of the real SD1.5 and SDXL UNets, Infinite-ID's reduced batch, and
RB-Guidance's guider against ComfyUI's CFGGuider."""
from pathlib import Path

import pytest

from support.testing import facts_in_comfyui

SCRIPT = Path(__file__).with_name("inprocess.py")


@pytest.fixture(scope="module")
def facts(comfyui):
    return facts_in_comfyui(SCRIPT, comfyui)


def test_every_double_and_single_block_is_a_layer(facts):
    assert facts["layers"] == [["double_block", 0], ["double_block", 1], ["single_block", 0], ["single_block", 1]]


def test_identity_changes_sampling_and_weight_zero_does_not(facts):
    assert facts["finite"] and facts["both_vs_plain"] > 1e-3
    assert facts["zero_equal"] and facts["masked_out_equal"] and facts["no_blocks_equal"]


def test_a_release_that_skips_an_injection_point_is_an_error_naming_it(facts):
    no_blocks, no_override = facts["missing_points"]
    assert "did not call the pack's FLUX block patches" in no_blocks and "ComfyUI " in no_blocks
    assert "without the attention override" in no_override and "ComfyUI " in no_override


def test_identity_injects_into_double_blocks_single_blocks_or_both(facts):
    assert facts["double_vs_plain"] > 1e-3 and facts["single_vs_plain"] > 1e-3 and facts["double_vs_single"] > 1e-3


def test_chained_adapters_add_their_terms_and_the_model_stays_clean(facts):
    # each adapter adds its own term to the blocks' attention: the order of the chain does not matter and
    # one identity applied twice at 0.5 is weight 1, to float32 round-off (had a patch replaced the one
    # before, the two orders would sample the second adapter alone and the first alone)
    assert facts["chained_vs_reversed"] <= 1e-4 * max(1.0, facts["scale"]), facts["chained_vs_reversed"]
    assert facts["halves_vs_both"] <= 1e-4 * max(1.0, facts["scale"]), facts["halves_vs_both"]
    assert facts["chained_vs_first"] > 1e-3 and facts["chained_vs_second"] > 1e-3
    assert facts["plain_after_equal"]


def test_real_unet_layouts_match_the_h94_numbering(facts):
    """h94 SD1.5 checkpoints have ip_adapter.1 ... .31 (16 layers), SDXL ones .1 ... .139 (70), in
    diffusers' order: down blocks, up blocks, middle."""
    sd15, sdxl = facts["unet_layers"]["sd15"], facts["unet_layers"]["sdxl"]
    assert sd15 == [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280]
    assert len(sdxl) == 70
    assert sdxl == [640] * 4 + [1280] * 20 + [1280] * 30 + [640] * 6 + [1280] * 10


def test_the_text_stream_is_its_own_denoising_trajectory(facts):
    """Infinite-ID's K_t, V_t come from the base model denoising the prompt alone: the text rows the
    sampler advances beside the identity rows, from the same noise, end where plain sampling ends."""
    two = facts["two_streams"]
    assert two["own_batch"] == [2, 4] and two["own_identity_rows_returned"]
    assert two["own_text_vs_plain"] < 1e-4 * max(1.0, two["scale"])
    assert two["own_vs_shared"] > 1e-3                                # not today's shared-latent form


def test_two_streams_reduced_batch_samples_like_the_full_one(facts):
    two = facts["two_streams"]
    assert two["mixed_vs_plain"] > 1e-3                       # mixed attention does something
    assert two["reduced_vs_full"] <= 1e-4 * max(1.0, two["scale"])


def test_rb_guidance_off_is_cfg_exactly(facts):
    assert facts["rb_guidance"]["p0_equal"]


def test_rb_guidance_scales_come_from_the_models_own_sampling(facts):
    """grad_{z_t} E, z_t the model's input: 1 / sqrt(1 + sigma^2) of x for SD's epsilon models, x itself
    for flow models, and the noise prediction moves x0 by sigma (epsilon) or sigma / (1 - sigma) (flow)."""
    scales = facts["rb_guidance"]["scales"]
    assert scales["eps_input"] == pytest.approx(scales["eps_expected_input"], rel=1e-6)
    assert scales["eps_x0_per_eps"] == pytest.approx(scales["eps_expected_x0"], rel=1e-6)
    assert scales["flow_input"] == pytest.approx([1.0]) and scales["flow_x0_per_eps"] == pytest.approx([0.3 / 0.7])


def test_rb_guidance_guides_only_late_steps_with_one_reference_pass_per_run(facts):
    rb = facts["rb_guidance"]
    assert rb["finite"]
    assert 0 < rb["guided_steps"] == rb["expected_steps"] < rb["steps"]
    # the x0 predictions are CFG's bit for bit until the window t <= 0.6 T opens, and differ at every
    # guided step from the first on (the push is added where the energy's gradient is not zero)
    unguided = rb["steps"] - rb["expected_steps"]
    assert rb["same_prediction"] == [True] * unguided + [False] * rb["expected_steps"], rb["same_prediction"]
    # the first guided step's push on x0 is the energy gradient's, linear in p (doubling p doubles it to
    # float32 round-off), and far above the round-off a tracked forward pass alone would leave
    assert rb["push"] > 1e-4 * rb["x0_scale"], rb
    assert rb["push_doubled_vs_twice"] <= 1e-3 * rb["push"], rb
    assert rb["reference_passes"] == [1, 2]


def test_a_reloaded_clip_vision_frees_the_tokens_of_the_one_before(facts):
    # ComfyUI loads CLIP vision again after an unload as a new object: without this the old
    # object's tokens stayed until the LRU bound (the soak's RSS drift)
    assert facts["token_cache"] == {"encoded": [3, 0], "held": 4, "after_first_dies": 1}
