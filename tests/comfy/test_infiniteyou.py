"""InfiniteYou in ComfyUI's FLUX, in process (tests/comfy/infiniteyou_inprocess.py): the identity tokens and
every block's InfuseNet residual equal to the authors' Resampler and InfuseNet call, whole denoising runs
equal to the authors' FluxInfuseNetPipeline (their code, from the vendored archive) for three scale / window
cases, the window, several photos, chaining after another ControlNet and a model patch alongside."""
from pathlib import Path

import pytest

from support.testing import facts_in_comfyui

SCRIPT = Path(__file__).with_name("infiniteyou_inprocess.py")


@pytest.fixture(scope="module")
def facts(comfyui):
    return facts_in_comfyui(SCRIPT, comfyui)


def test_tokens_and_every_blocks_residual_equal_the_authors(facts):
    block = facts["block"]
    assert block["tokens"] <= 1e-5
    assert block["difference"] <= 1e-5, block
    assert block["residual_scale"] > 0.1          # a residual large enough for the comparison to mean something


def test_two_denoising_steps_equal_the_authors_pipeline(facts):
    step = facts["step"]
    assert set(step["cases"]) == {"scale1_steps0-1", "scale0.8_start0.5", "scale1.2_end0.5"}
    assert step["difference"] <= 1e-5, step["cases"]
    assert step["effect_min"] > 0.05, step["effect"]


def test_the_conditioning_carries_infusenet_and_the_input_is_untouched(facts):
    assert facts["effect"] > 0.05
    assert facts["input_untouched"] and facts["plain_after_equal"]
    assert facts["zero_equal"]                    # strength 0 samples bit-identically to plain FLUX
    assert facts["closed_window_equal"]           # a window holding no step samples bit-identically to plain FLUX
    assert facts["three_photos_vs_one"] > 1e-3


def test_after_another_controlnet_and_beside_a_model_patch_both_effects_are_present(facts):
    assert facts["pulid_effect"] > 0.05
    for key in ("chain_vs_first", "chain_vs_second", "beside_pulid_vs_pulid", "beside_pulid_vs_infusenet"):
        assert facts[key] > 1e-2, (key, facts[key])
