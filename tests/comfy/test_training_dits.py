"""Train Flow Matching on the DiTs in a real ComfyUI, in process (train_dit_inprocess.py, one process for all
families): FLUX.1, FLUX.2 (klein's layout) and Qwen-Image (its latent has a frame axis) through block patches,
Z-Image through the attention override alone. A few steps of the node train the adapter, its loss at step 0 is the flow-matching loss computed
by hand through Apply Identity Adapter's patches, and the trained adapter changes what the model samples while
weight 0 leaves it bit-identical. ComfyUI 0.3.64 detects no FLUX.2 and no Z-Image: there they are recorded as
such."""
from pathlib import Path

import pytest

from support.testing import facts_in_comfyui, family_facts

SCRIPT = Path(__file__).with_name("train_dit_inprocess.py")
FAMILIES = ("flux", "flux2", "qwen_image", "z_image")
LATENT = {"flux": [1, 16, 8, 8], "flux2": [1, 32, 8, 8], "qwen_image": [1, 16, 1, 8, 8], "z_image": [1, 16, 8, 8]}
LAYERS = {"flux": 4, "flux2": 3, "qwen_image": 2, "z_image": 2}
TOLERANCE = 1e-6        # relative: float32 round-off of two orders of the same sums (measured: 1.1e-7 at most)


@pytest.fixture(scope="module")
def facts(comfyui, tmp_path_factory):
    work = tmp_path_factory.mktemp("train_dits")
    return facts_in_comfyui(SCRIPT, comfyui, "--work", str(work), "--families", ",".join(FAMILIES))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_node_trains_the_adapter_of_the_models_family(facts, family):
    if (f := family_facts(facts, family)) is None:
        return
    assert f["family"] == f["adapter_family"] == family and f["latent_shape"] == LATENT[family]
    assert len(f["losses"]) == 3 and all(0.0 < loss < 1e3 for loss in f["losses"])      # finite, not blown up
    assert f["tensors_changed"] == [True] * 2 * LAYERS[family]          # every layer's to_k and to_v trained
    assert f["plot_shape"] == [1, 360, 640, 3]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_loss_at_step_0_is_the_flow_matching_loss_written_by_hand(facts, family):
    if (f := family_facts(facts, family)) is None:
        return
    assert sorted(f["step0_inputs"]) == [1, 2]              # two token lengths: two groups of targets
    assert abs(f["losses"][0] - f["hand_loss"]) < TOLERANCE * f["hand_loss"]
    # the identity is in that loss: without it the same batch's loss differs by far more than the tolerance
    assert abs(f["hand_loss"] - f["hand_plain_loss"]) > 100 * TOLERANCE * f["hand_loss"]


@pytest.mark.parametrize("family", FAMILIES)
def test_the_trained_adapter_applies_and_weight_0_leaves_the_model_bit_identical(facts, family):
    if (f := family_facts(facts, family)) is None:
        return
    assert f["identity_effect"] > 1e-2 * f["scale"]
    assert f["weight0_equal"] is True
    assert f["plain_unchanged_by_training"] is True and f["model_left_unpatched"] is True
