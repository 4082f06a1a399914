"""Gradients through ComfyUI's models: weights loaded in inference mode, and the dynamic-VRAM contract
(played by a stand-in, since dynamic VRAM needs a GPU): see gradients_inprocess.py."""
from pathlib import Path

from support.testing import facts_in_comfyui

SCRIPT = Path(__file__).with_name("gradients_inprocess.py")


def test_gradients_flow_through_loaded_weights_and_dynamic_models_use_their_delegate(comfyui):
    facts = facts_in_comfyui(SCRIPT, comfyui)
    assert facts["loaded_as_inference_tensors"]
    # without the weight functions autograd meets the loaded inference tensors; with them it does not
    assert "Inference tensors cannot be saved for backward" in facts["plain_clone"]
    assert facts["gradient_ready"] == "ok"
    # a dynamic model is exchanged for its non-dynamic delegate once, and gradients flow through that
    assert facts["delegations"] == 1 and not facts["ready_is_dynamic"]
    assert facts["delegate_backward"] == "ok"
    assert "dynamic VRAM" in facts["no_delegate_error"] and "--disable-dynamic-vram" in facts["no_delegate_error"]
    assert "ComfyUI" in facts["no_delegate_error"]
    # handed the stored inference tensor itself, the weight function gives an ordinary, equal copy
    assert facts["fresh_copy"] == {"inference": False, "equal": True, "grad": True}
    assert "Inference tensors cannot be saved for backward" in facts["stored_backward"]
    # the copies do not wait for the backward (the stored weight is copied again there), and the gradient is the same
    assert facts["copy_released_before_backward"] and facts["released_copy_gradient_equal"]
    # loaded: stored weights (a manual-cast layer's too) as ordinary tensors on their own storage (no copy, bit
    # for bit in a pass without gradients), private copies only where another weight function runs first; all
    # as it was once unloaded
    assert facts["resident_ordinary_same_storage"] and facts["resident_without_weight_functions"]
    assert facts["cast_layer_functions"] == [True, True]
    assert facts["untracked_bit_equal"] and facts["gradient_equal_to_copies"] and facts["restored_after_unload"]
    flag = facts["training_flag"]
    if flag["has"]:
        assert flag == {"has": True, "inside": True, "after": False}
    else:
        assert flag["inside"] is None
