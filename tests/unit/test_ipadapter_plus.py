"""IPAdapter_plus's conventions as the pack writes them down (guidance.ipadapter_plus, FaceID file reading),
against values worked out by hand from IPAdapter_plus 9d076a3d's IPAdapterPlus.py and CrossAttentionPatch.py.
(The whole apply is compared with IPAdapter_plus itself in tests/comfy/test_ipadapter_plus_compat.py.)"""
import pytest
import torch
from safetensors.torch import save_file

from omniid.guidance.adapter_files import load_adapter
from omniid.guidance.image_proj import FaceIDProjection
from omniid.guidance.ipadapter_plus import (combine, layer_plan, paired_lora_name, parse_layer_weights, scaled_kv,
                                            simple_weight_type, weight_table)
from support.ip_layouts import flat, h94_checkpoint


def test_sd15_ease_in_follows_the_transformer_index():
    # weight * (0.05 + 0.95 * (1 - t / 16)) at t = 0, 8, 15
    assert [layer_plan("ease in", 2.0, "input", t, False).weight for t in (0, 8, 15)] == pytest.approx(
        [2.0, 2.0 * (0.05 + 0.95 * 0.5), 2.0 * (0.05 + 0.95 / 16)])


def test_weak_and_strong_blocks():
    assert layer_plan("weak input", 1.0, "input", 0, False).weight == pytest.approx(0.2)
    assert layer_plan("weak input", 1.0, "output", 9, False).weight == 1.0
    assert layer_plan("strong middle", 1.0, "output", 9, False).weight == pytest.approx(0.2)


def test_sdxl_style_transfer_is_output_block_1_only():
    # SDXL's transformer 6 is output block 1 (input 4, 5, 7, 8 -> 0-3, middle -> 4, output 0 -> 5)
    plans = [layer_plan("style transfer", 0.8, "output", t, True) for t in range(11)]
    assert [p.weight for p in plans] == [None] * 6 + [0.8] + [None] * 4


def test_precise_types_move_the_image_to_the_unconditional_branch():
    plan = layer_plan("style transfer precise", 1.0, "input", 4, False, boost=2.0)
    assert plan.precise_swap and plan.weight == pytest.approx(0.5)      # style boost * 0.25 on input 7
    assert not layer_plan("style transfer precise", 1.0, "input", 0, False).precise_swap
    assert layer_plan("composition precise", 1.0, "output", 6, True).weight == 1.0
    assert layer_plan("composition precise", 1.0, "output", 7, True).precise_swap
    assert weight_table("composition precise", 1.0, True, boost=0.5)[3] == 1.0        # composition keeps the weight


def test_style_and_composition_tables():
    assert weight_table("style and composition", 1.2, True, weight_composition=0.8) == {3: 0.8, 6: 1.2}
    strong = weight_table("strong style and composition", 1.0, True, weight_composition=0.5)
    assert strong == {0: 1.0, 1: 1.0, 2: 1.0, 3: 0.5, 4: 1.0, 5: 1.0, 6: 1.0, 7: 1.0, 8: 1.0, 9: 1.0, 10: 1.0}
    assert layer_plan("style and composition", 1.0, "input", 3, True).from_table


def test_simple_node_types():
    assert [simple_weight_type(v) for v in ("standard", "prompt is more important", "style transfer")] == [
        "linear", "ease out", "style transfer"]


def test_combine_modes():
    x = torch.tensor([[1.0, 2.0], [3.0, -2.0], [5.0, 0.0]])
    assert torch.equal(combine(x, "add"), torch.tensor([[9.0, 0.0]]))
    assert torch.equal(combine(x, "subtract"), torch.tensor([[-3.0, 3.0]]))
    assert torch.equal(combine(x, "average"), torch.tensor([[3.0, 0.0]]))
    norm = x / x.norm(dim=0, keepdim=True)
    assert torch.allclose(combine(x, "norm average"), norm.mean(0, keepdim=True))
    assert combine(x, "concat") is x


def test_c_penalty_scalings():
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(6, 640, generator=g), torch.randn(6, 640, generator=g)
    w = 1.5 * 640 / 1280
    k, v = scaled_kv(keys, values, "kv_penalty", 1.5)
    assert torch.allclose(k, keys * w) and torch.allclose(v, values * w)
    k, v = scaled_kv(keys, values, "k_mean_v_penalty", 1.5, tokens_per_image=3)
    for rows in (slice(0, 3), slice(3, 6)):           # the mean is each photo's own
        mean = values[rows].mean(0, keepdim=True)
        assert torch.allclose(v[rows], values[rows] - mean + mean * w, atol=1e-6)
    assert torch.allclose(k, keys * w)


def test_paired_lora_by_name():
    loras = ["other.safetensors", "h94/ip-adapter-faceid-plusv2_sd15_lora.safetensors",
             "ip-adapter-faceid_sd15_lora.safetensors"]
    assert paired_lora_name("ip-adapter-faceid_sd15.bin", loras) == "ip-adapter-faceid_sd15_lora.safetensors"
    assert paired_lora_name("ip-adapter-faceid-plusv2_sd15.bin", loras) == loras[1]
    assert paired_lora_name("ip-adapter-faceid-plus_sd15.bin", loras) is None


@pytest.mark.parametrize("name, v2", [("ip-adapter-faceid-plus_sd15.safetensors", False),
                                      ("ip-adapter-faceid-plusv2_sd15.safetensors", True),
                                      ("my-adapter.safetensors", True)])
def test_faceid_plus_v1_and_v2_are_told_apart_by_the_file(tmp_path, name, v2):
    path = tmp_path / name
    save_file(flat(h94_checkpoint("faceid_plusv2", 64, [32, 64], seed=1)), str(path))
    adapter = load_adapter(str(path), name)
    assert adapter.image_proj.shortcut is v2
    assert adapter.config.describe().endswith("v2)" if v2 else "v1)")
    proj = adapter.image_proj.float()
    g = torch.Generator().manual_seed(2)
    arcface, clip = torch.randn(1, 32, generator=g), torch.randn(1, 5, 48, generator=g)
    tokens = FaceIDProjection.forward(proj, arcface)
    refined = proj.perceiver_resampler.run(tokens, clip)
    expected = tokens + 0.5 * refined if v2 else refined
    assert torch.allclose(proj(arcface, clip, 0.5), expected, atol=1e-6)


def test_layer_weights_replace_the_type():
    table = parse_layer_weights("0:0.5, 3:1.2\n6:1")
    assert table == {0: 0.5, 3: 1.2, 6: 1.0}
    assert layer_plan("ease in", 2.0, "input", 3, True, layer_weights=table).weight == pytest.approx(2.4)
    assert layer_plan("linear", 2.0, "input", 1, True, layer_weights=table).weight is None
    assert layer_plan("composition precise", 1.0, "output", 6, True, layer_weights=table).precise_swap
    with pytest.raises(ValueError, match="index:weight"):
        parse_layer_weights("3=1")
