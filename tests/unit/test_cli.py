"""The command line's argument handling and exit codes (no ComfyUI needed)."""
import json

import pytest

from omniid.cli import main as cli


def write(tmp_path, data, name="wf.json"):
    path = tmp_path / name
    path.write_text(data if isinstance(data, str) else json.dumps(data))
    return path


PROMPT = {
    "1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}, "_meta": {"title": "Reference"}},
    "2": {"class_type": "OmniIdentityFaceCrop", "inputs": {"crop_size": 224}},
}


def test_overrides_by_id_title_and_type(tmp_path):
    prompt = cli.load_api_workflow(write(tmp_path, PROMPT))
    cli.apply_overrides(prompt, ["Reference.image=b.png", "2.crop_size=512", "OmniIdentityFaceCrop.padding=0.5",
                                 "1.label=\"text\""])
    assert prompt["1"]["inputs"] == {"image": "b.png", "label": "text"}
    assert prompt["2"]["inputs"] == {"crop_size": 512, "padding": 0.5}


@pytest.mark.parametrize("bad", ["nodot=1", "1.image", "Missing.image=x"])
def test_bad_overrides(tmp_path, bad):
    with pytest.raises(cli.UsageError):
        cli.apply_overrides(cli.load_api_workflow(write(tmp_path, PROMPT)), [bad])


def test_workflow_file_errors(tmp_path):
    with pytest.raises(cli.UsageError, match="not found"):
        cli.load_api_workflow(tmp_path / "nope.json")
    with pytest.raises(cli.UsageError, match="not valid JSON"):
        cli.load_api_workflow(write(tmp_path, "{"))
    with pytest.raises(cli.UsageError, match="UI-format"):
        cli.load_api_workflow(write(tmp_path, {"nodes": [], "links": []}))
    with pytest.raises(cli.UsageError, match="not an API-format"):
        cli.load_api_workflow(write(tmp_path, {"1": {"inputs": {}}}))
    assert cli.load_api_workflow(write(tmp_path, {"prompt": PROMPT})) == PROMPT


def test_exit_codes_without_a_server(tmp_path, capsys, monkeypatch):
    workflow = write(tmp_path, PROMPT)
    assert cli.main(["run", str(tmp_path / "missing.json"), "--server", "http://127.0.0.1:9"]) == cli.EXIT_USAGE
    assert cli.main(["run", str(workflow), "--server", "http://127.0.0.1:9", "--upload",
                     str(tmp_path / "missing.jpg")]) == cli.EXIT_USAGE
    assert "--upload: no such file" in capsys.readouterr().err
    assert cli.main(["run", str(workflow), "--server", "http://127.0.0.1:9"]) == cli.EXIT_COMFYUI
    assert "cannot reach ComfyUI" in capsys.readouterr().err
    assert cli.main(["run", str(workflow), "--comfyui", str(tmp_path)]) == cli.EXIT_COMFYUI
    assert "is not a ComfyUI checkout" in capsys.readouterr().err
    assert cli.main(["serve", "--comfyui", str(tmp_path)]) == cli.EXIT_COMFYUI
    monkeypatch.setattr(cli, "find_comfyui", lambda explicit=None: None)
    assert cli.main(["run", str(workflow)]) == cli.EXIT_COMFYUI
    assert "no ComfyUI found" in capsys.readouterr().err
