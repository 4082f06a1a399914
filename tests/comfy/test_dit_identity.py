"""The identity adapter on the 2026 DiTs: `omniid train --stage flow` trains it on a tiny diffusers model of
each family, and the file loads in ComfyUI's Apply Identity Adapter, on ComfyUI's own model of that family
(configured by ComfyUI's detection) holding the same weights, with bit-equal identity K/V and the same
output as the diffusers host's processors (tests/comfy/dit_parity.py, one process for all families).
FLUX.2, Chroma and Qwen-Image take the identity through block patches, Z-Image through the attention override
alone (its forward offers no block patches). On Qwen-Image also with -Edit's reference images
(tests/comfy/qwen_edit_parity.py): the references' tokens take no identity in either host."""
from pathlib import Path

import pytest

from support.testing import facts_in_comfyui, family_facts

SCRIPT = Path(__file__).with_name("dit_parity.py")
FAMILIES = ("flux2", "chroma", "qwen_image", "z_image")
LAYERS = {"flux2": [["double", 0], ["single", 0], ["single", 1]], "qwen_image": [["double", 0], ["double", 1]],
          "z_image": [["double", 0], ["double", 1]],           # Z-Image: its main layers, not its refiners
          "chroma": [["double", i] for i in range(19)] + [["single", i] for i in range(38)]}
TOLERANCE = 3e-5        # of the output's scale: float32 round-off of two implementations (measured: 6e-6 at most)


@pytest.fixture(scope="module")
def facts(comfyui, tmp_path_factory):
    work = tmp_path_factory.mktemp("dit_identity")
    return facts_in_comfyui(SCRIPT, comfyui, "--work", str(work), "--families", ",".join(FAMILIES))


@pytest.mark.parametrize("family", FAMILIES)
def test_the_trained_file_records_its_family_and_loads_with_bit_equal_kv(facts, family):
    if (f := family_facts(facts, family)) is None:
        return
    assert f["comfy_family"] == f["diffusers_family"] == f["adapter_family"] == family
    assert f["layers"] == f["diffusers_layers"] == LAYERS[family]
    assert f["kv_equal"] == [True] * len(LAYERS[family])
    assert all(c == d for c, d in f["weights"])
    assert [c for c, _ in f["weights"]] == pytest.approx([0.4 if layer == ["single", 1] else 0.8   # single.1=0.5
                                                          for layer in LAYERS[family]])


@pytest.mark.parametrize("family", FAMILIES)
def test_comfyui_patches_equal_the_diffusers_processors(facts, family):
    if (f := family_facts(facts, family)) is None:
        return
    assert f["plain_diff"] < TOLERANCE * f["scale"]             # the same model in both hosts...
    assert f["identity_effect"] > 1e-3 * f["scale"]             # ...the identity changes its output...
    assert f["identity_diff"] < TOLERANCE * f["scale"]          # ...and both hosts add the same identity
    assert f["uncond_effect"] == 0.0                            # Omni-ID's unconditional identity: zero tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_weight_0_and_outside_the_window_leave_the_model_bit_identical(facts, family):
    if (f := family_facts(facts, family)) is None:
        return
    assert f["weight0_equal"] is True
    assert f["window_patched"] == len(LAYERS[family]) and f["outside_window_equal"] is True


def edit_facts(facts) -> dict:
    """Qwen-Image-Edit's facts (tests/comfy/qwen_edit_parity.py): every host that builds Qwen-Image passes -Edit's
    reference latents to its forward (``ref_latents``: ReferenceLatent, TextEncodeQwenImageEdit(Plus))."""
    edit = family_facts(facts, "qwen_image")["edit"]
    assert edit["takes_ref_latents"] is True
    return edit


@pytest.mark.parametrize("case", ["edit", "edit_plus"])         # one reference image; two (-Edit Plus)
def test_qwen_image_edit_references_take_no_identity_and_both_hosts_agree(facts, case):
    f = edit_facts(facts)[case]
    assert f["plain_diff"] < TOLERANCE * f["scale"]             # ComfyUI's ref_latents = diffusers' appended tokens
    assert f["identity_effect"] > 1e-3 * f["scale"]
    assert f["identity_diff"] < TOLERANCE * f["scale"]
    assert f["uncond_effect"] == 0.0
    for host in ("comfy", "diffusers"):                         # the term each layer's attention adds, per row
        rows = f[host]
        assert rows["calls"] == len(LAYERS["qwen_image"])
        assert rows["reference_rows"] == [f["expected_reference_rows"]]
        assert rows["reference_term"] == 0.0 and rows["text_term"] == 0.0
        assert rows["generated_term_min"] > 0.0
    assert f["weight0_equal"] is True


def test_qwen_image_edit_rotary_settings_where_the_hosts_are_one_model(facts):
    """ComfyUI's default reference method ("index": reference i at frame i) is diffusers' layout, and on hosts
    that know Qwen-Image-Edit-2511's "index_timestep_zero" it equals diffusers' zero_cond_t. "offset" with
    several references, and a reference larger than the generated image (diffusers starts the text's
    positions after the largest image, ComfyUI after the generated one), are other models."""
    edit = edit_facts(facts)
    scale = edit["edit"]["scale"]
    assert edit["offset_plain_diff"] > 1e-3 * scale and edit["larger_reference_plain_diff"] > 1e-3 * scale
    if edit["timestep_zero_host"]:
        assert edit["timestep_zero_effect"] > 1e-4 * scale      # another model than "index" (1e-3 of the scale)...
        assert edit["timestep_zero_plain_diff"] < TOLERANCE * scale
        assert edit["timestep_zero_identity_diff"] < TOLERANCE * scale
    else:
        assert "timestep_zero_plain_diff" not in edit
