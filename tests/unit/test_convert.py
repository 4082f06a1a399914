"""`python -m omniid convert` on every workflow of IPAdapter_plus's own examples/ folder, read from the
vendored archive at test time (nothing of it is copied into the repository), and on an API workflow.

For each editor workflow: the nodes expected to convert do and the others are listed with a reason;
every original node is still there at its position; every link is consistent (both ends exist, the
socket and the output list it, its type is the output's); links between nodes the converter leaves
alone are unchanged, except that a model taken from a unified loader now comes from that loader's own
model source; the converted apply nodes carry the original values."""
import io
import json
import tarfile
from pathlib import Path

import pytest

from omniid.cli import convert_tables as C
from omniid.cli.convert import convert
from omniid.cli.convert_plan import compat_widgets, ipa_widgets
from omniid.cli.main import main

ARCHIVE = Path(__file__).resolve().parents[2].parent / "shared" / "vendor" / "ComfyUI_IPAdapter_plus-9d076a3d.tar.gz"

# workflow -> IPAdapter_plus node types that stay (each listed with a reason, or a loader kept for them beside
# the pack's); every other one converts
STAYS = {
    "IPAdapter_FaceIDv2_Kolors.json": {"IPAdapterModelLoader", "IPAdapterInsightFaceLoader", "IPAdapterFaceIDKolors"},
    "ipadapter_advanced.json": set(),
    "ipadapter_clipvision_enhancer.json": {"IPAdapterUnifiedLoader", "IPAdapterClipVisionEnhancer"},
    "ipadapter_combine_embeds.json": set(),
    "ipadapter_cosxl_edit.json": set(),
    "ipadapter_faceid.json": set(),
    "ipadapter_faceid_batch.json": set(),
    "ipadapter_ideal_faceid_config.json": set(),
    "ipadapter_kolors.json": set(),
    "ipadapter_negative_image.json": set(),
    "ipadapter_noise_injection.json": set(),
    "ipadapter_portrait.json": set(),
    "ipadapter_precise_composition.json": set(),
    "ipadapter_precise_weight_type.json": set(),
    "ipadapter_regional_conditioning.json": {"IPAdapterRegionalConditioning", "IPAdapterCombineParams",
                                             "IPAdapterFromParams", "IPAdapterUnifiedLoader"},
    "ipadapter_simple.json": set(),
    "ipadapter_style_composition.json": set(),
    "ipadapter_tiled.json": {"IPAdapterModelLoader", "IPAdapterTiled"},
    "ipadapter_weight_types.json": set(),
    "ipadapter_weighted_embeds.json": {"IPAdapterUnifiedLoader", "IPAdapterEmbeds", "IPAdapterEncoder",
                                       "IPAdapterCombineEmbeds"},
    "ipadapter_weights.json": {"IPAdapterUnifiedLoader", "IPAdapterBatch", "IPAdapterWeights"},
}
OURS = {C.COMPAT, C.ADAPTER_LOADER, C.FACE_LOADER, C.CLIP_LOADER, C.PREP, C.NOISE}


def examples() -> dict:
    if not ARCHIVE.is_file():
        pytest.skip(f"IPAdapter_plus's archive is not at {ARCHIVE}")
    out = {}
    with tarfile.open(ARCHIVE) as archive:
        for member in archive.getmembers():
            if "/examples/" in member.name and member.name.endswith(".json"):
                out[Path(member.name).name] = json.load(io.TextIOWrapper(archive.extractfile(member), encoding="utf-8"))
    return out


EXAMPLES = examples() if ARCHIVE.is_file() else {}


def test_every_example_is_covered():
    assert set(examples()) == set(STAYS)


def check_links(workflow: dict) -> None:
    nodes = {n["id"]: n for n in workflow["nodes"]}
    ids = set()
    for link_id, source, slot, target, target_slot, kind in workflow["links"]:
        ids.add(link_id)
        assert source in nodes and target in nodes, (link_id, source, target)
        assert nodes[target]["inputs"][target_slot]["link"] == link_id
        assert link_id in nodes[source]["outputs"][slot]["links"]
        assert kind == nodes[source]["outputs"][slot]["type"]
        if nodes[target]["type"] in OURS or nodes[source]["type"] in OURS:
            assert kind == nodes[target]["inputs"][target_slot]["type"], (link_id, kind)
    for node in nodes.values():
        for socket in node.get("inputs") or []:
            assert socket.get("link") is None or socket["link"] in ids
        for output in node.get("outputs") or []:
            assert all(link in ids for link in output.get("links") or [])
    assert workflow["last_link_id"] >= max(ids | {0}) and workflow["last_node_id"] >= max(nodes)


@pytest.mark.parametrize("name", sorted(STAYS))
def test_example_converts(name):
    original = EXAMPLES[name]
    converted, plan = convert(original)
    before = {n["id"]: n for n in original["nodes"]}
    after = {n["id"]: n for n in converted["nodes"]}
    ipa = {n["id"]: n["type"] for n in original["nodes"] if n["type"] in C.IPA_TYPES}
    stayed = {after[i]["type"] for i in ipa if after[i]["type"] == ipa[i]}
    assert stayed == STAYS[name]
    beside = {int(i) for i, _, new in plan.converted if "(added;" in new}     # kept for the nodes that stay
    assert {int(i) for i, _, _ in plan.skipped} == {i for i in ipa if after[i]["type"] == ipa[i]} - beside
    assert all(reason for _, _, reason in plan.skipped)
    assert set(before) <= set(after)
    assert all(after[i]["pos"] == before[i]["pos"] for i in before)
    assert {n["type"] for i, n in after.items() if i not in before} <= OURS
    check_links(converted)
    # links between nodes left alone are kept; a model from a converted unified loader comes from its source
    loaders = {i: n for i, n in before.items() if n["type"].startswith("IPAdapterUnifiedLoader")
               and after[i]["type"] == C.ADAPTER_LOADER}
    links_before = {link[0]: link for link in original["links"]}
    for link in original["links"]:
        _, source, slot, target, target_slot, _ = link
        if after[target]["type"] != before[target]["type"]:
            continue
        while source in loaders and slot == 0:
            upstream = next(s for s in before[source]["inputs"] if s["name"] == "model")["link"]
            source, slot = links_before[upstream][1], links_before[upstream][2]
        now = after[target]["inputs"][target_slot]["link"]
        assert now is not None
        kept = next(lk for lk in converted["links"] if lk[0] == now)
        assert (kept[1], kept[2]) == (source, slot)
    for node_id, old_type, new_type in plan.converted:
        if new_type != C.COMPAT:
            continue
        node, old = after[int(node_id)], before[int(node_id)]
        values = dict(zip(C.WIDGETS[C.COMPAT], node["widgets_values"]))
        given = ipa_widgets(old_type, old["widgets_values"])
        assert values["weight"] == given.get("weight", given.get("weight_style")) and values["start_at"] == given["start_at"]
        assert values["end_at"] == given["end_at"]
        if old_type == "IPAdapterAdvanced":
            assert values["weight_type"] == given["weight_type"] and values["embeds_scaling"] == given["embeds_scaling"]
            assert values["combine_embeds"] == given["combine_embeds"]
        linked = {s["name"] for s in node["inputs"] if s["link"] is not None}
        assert {"model", "adapter", "clip_vision", "image"} <= linked


def test_unified_faceid_loader_becomes_three_loaders_and_the_lora_moves_to_the_apply():
    converted, plan = convert(EXAMPLES["ipadapter_faceid.json"])
    nodes = {n["id"]: n for n in converted["nodes"]}
    assert nodes[20]["widgets_values"] == ["ip-adapter-faceid-plusv2_sd15.bin"]
    apply = dict(zip(C.WIDGETS[C.COMPAT], nodes[18]["widgets_values"]))
    assert apply["faceid_lora"] == "auto" and apply["faceid_lora_strength"] == 0.6
    assert apply["weight_faceidv2"] == 2 and apply["weight"] == 1           # IPAdapterFaceID's own values
    kinds = sorted(n["type"] for n in nodes.values() if n["id"] > 20)
    assert kinds == [C.CLIP_LOADER, C.FACE_LOADER]
    model = next(s for s in nodes[18]["inputs"] if s["name"] == "model")["link"]
    assert next(lk for lk in converted["links"] if lk[0] == model)[1] == 4    # the checkpoint, not the loader


def test_simple_node_types_precise_boosts_and_layer_weights():
    converted, _ = convert(EXAMPLES["ipadapter_precise_composition.json"])
    node = next(n for n in converted["nodes"] if n["id"] == 12)
    values = dict(zip(C.WIDGETS[C.COMPAT], node["widgets_values"]))
    assert values["weight_type"] == "composition precise" and values["boost"] == pytest.approx(0.35)
    assert values["embeds_scaling"] == "K+mean(V) w/ C penalty"
    mad = dict(zip(C.WIDGETS[C.COMPAT], next(n for n in converted["nodes"] if n["id"] == 15)["widgets_values"]))
    assert mad["layer_weights"] == "0:0, 1:0, 2:0, 3:0.8, 4:0, 5:0, 6:0.35, 7:0, 8:0, 9:0, 10:0"
    assert mad["weight_type"] == "composition precise" and mad["weight_faceidv2"] == 1
    assert compat_widgets("IPAdapter", {"weight": 0.4, "weight_type": "prompt is more important"})["weight_type"] == "ease out"


API = {
    "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl/juggernaut.safetensors"}},
    "11": {"class_type": "IPAdapterUnifiedLoader", "inputs": {"model": ["4", 0], "preset": "PLUS FACE (portraits)"}},
    "12": {"class_type": "LoadImage", "inputs": {"image": "face.png"}},
    "10": {"class_type": "IPAdapter", "inputs": {"model": ["11", 0], "ipadapter": ["11", 1], "image": ["12", 0],
                                                 "weight": 0.7, "start_at": 0.1, "end_at": 0.9,
                                                 "weight_type": "style transfer"}},
    "14": {"class_type": "IPAdapterTiled", "inputs": {"model": ["10", 0], "ipadapter": ["15", 0], "image": ["12", 0],
                                                      "weight": 1.0, "weight_type": "linear", "combine_embeds": "concat",
                                                      "start_at": 0, "end_at": 1, "sharpening": 0,
                                                      "embeds_scaling": "V only"}},
    "15": {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": "ip-adapter-plus_sdxl_vit-h.safetensors"}},
    "3": {"class_type": "KSampler", "inputs": {"model": ["14", 0], "seed": 1}},
    "5": {"class_type": "KSampler", "inputs": {"model": ["11", 0], "seed": 1}},
}


def test_api_workflow():
    converted, plan = convert(API)
    assert converted["11"] == {"class_type": C.ADAPTER_LOADER, "_meta": {"title": C.TITLES[C.ADAPTER_LOADER]},
                               "inputs": {"adapter_name": "ip-adapter-plus-face_sdxl_vit-h.safetensors"}}
    apply = converted["10"]
    assert apply["class_type"] == C.COMPAT
    clip = apply["inputs"]["clip_vision"][0]
    assert converted[clip] == {"class_type": C.CLIP_LOADER, "inputs": {"clip_name": C.CLIP_H},
                               "_meta": {"title": "Load CLIP Vision"}}
    assert apply["inputs"]["model"] == ["4", 0] and apply["inputs"]["adapter"] == ["11", 0]
    assert apply["inputs"]["image"] == ["12", 0]
    assert (apply["inputs"]["weight"], apply["inputs"]["start_at"], apply["inputs"]["end_at"]) == (0.7, 0.1, 0.9)
    assert apply["inputs"]["weight_type"] == "style transfer" and apply["inputs"]["embeds_scaling"] == "V only"
    assert converted["5"]["inputs"]["model"] == ["4", 0]          # the unified loader's model passed through
    assert converted["14"] == API["14"] and converted["15"] == API["15"]      # tiled stays, with its loader
    assert [(i, kind) for i, kind, _ in plan.skipped] == [("14", "IPAdapterTiled"), ("15", "IPAdapterModelLoader")]


def test_cli(tmp_path, capsys):
    source = tmp_path / "simple.json"
    source.write_text(json.dumps(EXAMPLES["ipadapter_simple.json"]))
    assert main(["convert", str(source)]) == 0
    written = json.loads((tmp_path / "simple.omniid.json").read_text())
    assert {n["type"] for n in written["nodes"]} >= {C.COMPAT, C.ADAPTER_LOADER, C.CLIP_LOADER}
    assert "converted 2 IPAdapter_plus node(s)" in capsys.readouterr().out
    partial = tmp_path / "tiled.json"
    partial.write_text(json.dumps(EXAMPLES["ipadapter_tiled.json"]))
    assert main(["convert", str(partial), "-o", str(tmp_path / "out.json"), "--strict"]) == 1
    assert "IPAdapterTiled: tiled encoding" in capsys.readouterr().out
    (tmp_path / "bad.json").write_text("[1, 2]")
    assert main(["convert", str(tmp_path / "bad.json")]) == 2


def test_prep_image_keeps_its_values():
    converted, _ = convert(EXAMPLES["ipadapter_advanced.json"])
    prep = next(n for n in converted["nodes"] if n["id"] == 17)
    assert prep["type"] == C.PREP and prep["widgets_values"] == ["LANCZOS", "top", 0.15]


def test_noise_keeps_its_values_and_its_image_and_shuffle_stays():
    converted, _ = convert(EXAMPLES["ipadapter_noise_injection.json"])
    noise = next(n for n in converted["nodes"] if n["id"] == 18)
    assert noise["type"] == C.NOISE and noise["widgets_values"] == ["fade", 0.3, 5]
    source = next(link for link in converted["links"] if link[0] == noise["inputs"][0]["link"])
    assert source[1] == 17           # its photo: the prepped image, as before
    shuffled = json.loads(json.dumps(EXAMPLES["ipadapter_noise_injection.json"]))
    next(n for n in shuffled["nodes"] if n["id"] == 18)["widgets_values"][0] = "shuffle"
    converted, plan = convert(shuffled)
    assert next(n for n in converted["nodes"] if n["id"] == 18)["type"] == "IPAdapterNoise"
    assert any(int(i) == 18 and "shuffle" in reason for i, _, reason in plan.skipped)
