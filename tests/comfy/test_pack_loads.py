"""The pack loads into a real ComfyUI and describes itself fully."""
import re

PACK_NODES = ("OmniIdentityFaceAnalysisLoader", "OmniIdentityFaceCrop", "OmniIdentityEncoderLoader",
              "OmniIdentityEncode", "OmniIdentityEncodeBaseline", "OmniIdentityCombineEmbeds",
              "OmniIdentitySaveEmbeds", "OmniIdentityLoadEmbeds")


def test_log_shows_the_pack_loaded_without_import_errors(comfy_server, comfy):
    log = comfy_server.log_text()
    lines = [l for l in log.splitlines() if "ComfyUI-OmniIdentity" in l]
    assert any(re.search(r"seconds: .*custom_nodes/ComfyUI-OmniIdentity$", l) for l in lines), log[-3000:]
    assert not any("IMPORT FAILED" in l or "Cannot import" in l for l in lines), "\n".join(lines)
    assert "failed to import its nodes" not in log
    assert "Error while calling comfy_entrypoint" not in log


def test_log_names_the_comfyui_found_and_each_adaptation(comfy_server, comfyui):
    version = (comfyui / "comfyui_version.py").read_text().split("=")[-1].strip(" '\"\n")
    lines = [l for l in comfy_server.log_text().splitlines() if f"ComfyUI-OmniIdentity: ComfyUI {version};" in l]
    assert len(lines) == 1, comfy_server.log_text()[-3000:]
    # each adaptation is named exactly where this ComfyUI has the feature
    features = {"dynamic VRAM": "def is_dynamic", "training flag": "in_training"}
    sources = {"dynamic VRAM": "comfy/model_patcher.py", "training flag": "comfy/model_management.py"}
    for name, marker in features.items():
        assert (name in lines[0]) == (marker in (comfyui / sources[name]).read_text()), (name, lines[0])
    if "adapted to" not in lines[0]:
        assert lines[0].endswith("no adaptation needed")


def test_object_info_describes_every_node_and_input(comfy):
    info = comfy.object_info()
    ours = sorted(n for n in info if n.startswith("OmniIdentity"))
    assert set(PACK_NODES) <= set(ours), f"missing: {set(PACK_NODES) - set(ours)}"
    for node_id in ours:
        node = info[node_id]
        assert node["category"].startswith("OmniIdentity/")
        assert len(node["description"]) > 40
        inputs = {**node["input"].get("required", {}), **node["input"].get("optional", {})}
        assert inputs
        for name, spec in inputs.items():
            assert spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert all(node["output_tooltips"]), f"{node_id} has an output without a tooltip"
        assert node["display_name"].endswith("(OmniIdentity)")


def test_face_nodes_types(comfy):
    loader = comfy.object_info("OmniIdentityFaceAnalysisLoader")["OmniIdentityFaceAnalysisLoader"]
    assert loader["output"] == ["FACE_ANALYSIS"]
    backends = loader["input"]["required"]["backend"][1]["options"]
    assert backends[0] == "dlib" and "insightface/antelopev2" in backends and "insightface/buffalo_l" in backends
    crop = comfy.object_info("OmniIdentityFaceCrop")["OmniIdentityFaceCrop"]
    assert crop["output"] == ["IMAGE", "MASK", "FACES", "IMAGE"]
    assert crop["output_name"] == ["crops", "masks", "faces", "preview"]


def test_model_folders_are_registered(comfy, comfy_server):
    folders = comfy.get_json("/models")
    for name in ("omni_identity", "ipadapter", "insightface", "flame"):
        assert name in folders
    (comfy_server.base_directory / "models" / "omni_identity" / "probe.safetensors").write_bytes(b"")
    (comfy_server.base_directory / "models" / "omni_identity" / "ignored.txt").write_bytes(b"")
    listed = comfy.get_json("/models/omni_identity")
    assert "probe.safetensors" in listed and "ignored.txt" not in listed
