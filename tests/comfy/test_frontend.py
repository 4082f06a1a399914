"""The editor workflows in the real frontend (comfyui-frontend-package served by ComfyUI, headless Chromium).

Each workflows/<name>.json must load with every node type known (no missing-node dialog),
without a console error or exception, and the frontend's graphToPrompt of it must equal
its API twin workflows/api/<name>.json.
"""
import json

import pytest

from support.browser import Chromium, find_chromium
from support.testing import WORKFLOWS
from support.ui_workflows import open_editor, template_notes

UI_WORKFLOWS = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
# requests the editor makes for files a fresh test server does not have; not errors of the workflows
EXPECTED_MISSING = ("/api/view?", "user.css", "favicon.ico", "/api/userdata", "api.comfy.org")


pytestmark = pytest.mark.frontend


@pytest.fixture(scope="module")
def editor(comfy_server):
    if find_chromium() is None:
        pytest.skip("no Chromium on this machine (apt install chromium, or set OMNIID_CHROMIUM): the frontend "
                    "tests are SKIPPED")
    with Chromium() as browser:
        page = open_editor(browser, comfy_server.url)
        yield page
        page.close()


def test_every_api_workflow_has_an_editor_twin_and_a_thumbnail():
    api = sorted(p.stem for p in (WORKFLOWS / "api").glob("*.json"))
    assert UI_WORKFLOWS == api
    notes = template_notes()
    for name in api:
        assert (WORKFLOWS / f"{name}.jpg").is_file(), name
        assert name in notes, name


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_editor_workflow_loads_cleanly_and_matches_its_api_twin(editor, name):
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    missing = editor.evaluate(f"{json.dumps(sorted({n['type'] for n in ui['nodes']}))}"
                              ".filter(t => !LiteGraph.registered_node_types[t])")
    assert missing == [], f"{name}: node types unknown to the editor: {missing}"
    editor.console.clear()
    editor.exceptions.clear()
    editor.evaluate(f"app.loadGraphData({json.dumps(ui)}, true, true, {json.dumps(name)})")
    prompt = editor.evaluate("app.graphToPrompt().then(p => p.output)")
    dialog = editor.evaluate("document.body.innerText.includes('Some Nodes Are Missing') || "
                             "document.body.innerText.includes('missing nodes')")
    assert not dialog, f"{name}: the editor reports missing nodes"
    errors = [m for m in editor.console if m["type"] == "error"
              and not any(part in (m.get("url") or m["text"]) for part in EXPECTED_MISSING)]
    assert errors == [] and editor.exceptions == [], f"{name}: {errors} {editor.exceptions}"
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    assert prompt.keys() == api.keys(), name
    for node_id, node in api.items():
        got = prompt[node_id]
        assert got["class_type"] == node["class_type"], (name, node_id)
        assert got["_meta"]["title"] == node["_meta"]["title"], (name, node_id)
        expected = {k: v for k, v in node["inputs"].items()}
        # the editor also writes optional widgets left at their defaults; the API twin may omit them
        extra = {k: v for k, v in got["inputs"].items() if k not in expected}
        defaults = editor.evaluate(f"(() => {{ const n = LiteGraph.createNode({json.dumps(node['class_type'])});"
                                   " return Object.fromEntries((n.widgets || []).map(w => [w.name, w.value])); })()")
        assert {k: v for k, v in got["inputs"].items() if k in expected} == expected, (name, node_id)
        for key, value in extra.items():
            assert defaults.get(key) == value, f"{name} node {node_id}: {key}={value!r} is not the default"
