"""The editor workflows in the real frontend (comfyui-frontend-package served by ComfyUI, headless Chromium).

Each workflows/<name>.json must load with every node type known (no missing-node dialog),
without a console error or exception, show its saved widget values (the seeds' control
widgets included), keep its layout with the users' photos shown, and the frontend's
graphToPrompt of it must equal its API twin workflows/api/<name>.json. Run on each
supported host, so on each frontend it serves (1.27 with ComfyUI 0.3.64, 1.49 with 0.33).
A workflow built on core nodes that older supported releases lack (FLUX.2's, from ComfyUI 0.33;
``newer_core_nodes`` in workflows/notes.toml) loads there as a user sees it: ComfyUI's missing-nodes
dialog names exactly the nodes that host lacks, nothing else fails, and every other node keeps its values.
"""
import json
import tomllib

import pytest

from support.browser import SHOW_PHOTOS, Chromium, find_chromium, open_editor
from support.testing import WORKFLOWS

UI_WORKFLOWS = sorted(p.stem for p in WORKFLOWS.glob("*.json"))
# requests the editor makes for files a fresh test server does not have, and (frontend 1.49) the size lookups
# it sends, in the background, to the download address it knows for a model file the server lacks: a machine
# without internet fails them whenever they land; not errors of the workflows
EXPECTED_MISSING = ("/api/view?", "user.css", "favicon.ico", "/api/userdata", "api.comfy.org", "https://huggingface.co/")


pytestmark = pytest.mark.frontend
NOTES = tomllib.loads((WORKFLOWS / "notes.toml").read_text(encoding="utf-8"))
# Escape closes the missing-nodes dialog (PrimeVue's); true once none is left (its closing transition takes a moment)
CLOSE_DIALOGS = """
new Promise(resolve => {
  if (!document.querySelector('.p-dialog')) return resolve(true);
  document.dispatchEvent(new KeyboardEvent('keydown', {key: 'Escape', code: 'Escape', bubbles: true}));
  let tries = 0;
  const poll = () => !document.querySelector('.p-dialog') ? resolve(true) : ++tries > 40 ? resolve(false)
                                                                                   : setTimeout(poll, 50);
  poll();
})
"""


def open_workflow(editor, ui: dict, name: str) -> None:
    """Load an editor workflow without the dialogs on missing nodes or models (the test of the load checks them)."""
    editor.evaluate(f"app.loadGraphData({json.dumps(ui)}, true, true, {json.dumps(name)}, "
                    "{showMissingNodesDialog: false, showMissingModelsDialog: false})")


def unknown_types(editor, ui: dict, name: str) -> list[str]:
    """The workflow's node types this editor does not know: none, or (on an older host) some of the core nodes
    the workflow's notes say it needs from a newer ComfyUI."""
    missing = editor.evaluate(f"{json.dumps(sorted({n['type'] for n in ui['nodes']}))}"
                              ".filter(t => !LiteGraph.registered_node_types[t])")
    assert set(missing) <= set(NOTES[name].get("newer_core_nodes", [])), \
        f"{name}: node types unknown to the editor: {missing}"
    return missing


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
    for name in api:
        assert (WORKFLOWS / f"{name}.jpg").is_file(), name
        assert name in NOTES, name


LAYOUT = """
(() => {
  const T = LiteGraph.NODE_TITLE_HEIGHT, groups = app.graph._groups, nodes = app.graph._nodes;
  const box = n => [n.pos[0], n.pos[1] - T, n.pos[0] + n.size[0], n.pos[1] + n.size[1]];
  const inside = (b, g) => b[0] >= g.pos[0] && b[1] >= g.pos[1] && b[2] <= g.pos[0] + g.size[0]
                           && b[3] <= g.pos[1] + g.size[1];
  const owner = nodes.map(n => groups.filter(g => inside(box(n), g)).map(g => groups.indexOf(g)));
  const overlaps = [];
  for (let i = 0; i < nodes.length; i++)
    for (let j = i + 1; j < nodes.length; j++) {
      const a = box(nodes[i]), b = box(nodes[j]);
      if (a[0] < b[2] && b[0] < a[2] && a[1] < b[3] && b[1] < a[3]) overlaps.push([nodes[i].title, nodes[j].title]);
    }
  const groupOf = new Map(nodes.map((n, i) => [n.id, owner[i].length === 1 ? owner[i][0] : -1]));
  const links = Object.values(app.graph.links || {}).filter(l => l).map(l => [groupOf.get(l.origin_id),
                                                                             groupOf.get(l.target_id)]);
  return {groups: groups.map(g => g.title), owners: nodes.map((n, i) => [n.title, owner[i]]), overlaps, links,
          order: groups.map(g => g.pos[0])};
})()
"""


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_editor_workflow_keeps_the_pack_layout(editor, name):
    """Titled groups left to right, every node in exactly one of them, none overlapping (with a photo in every
    Load Image, which then grows by its preview), no wire spanning the whole canvas (first stage to last)."""
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    open_workflow(editor, ui, name)
    editor.evaluate(SHOW_PHOTOS)                # a user's photo in every Load Image, which grows by its preview
    layout = editor.evaluate(LAYOUT)
    assert layout["groups"][0] == "About" and len(layout["groups"]) >= 3, layout["groups"]
    assert layout["order"] == sorted(layout["order"]), "groups are not laid out left to right"
    outside = [(title, owner) for title, owner in layout["owners"] if len(owner) != 1]
    assert not outside, f"{name}: nodes not inside exactly one group: {outside}"
    assert not layout["overlaps"], f"{name}: overlapping nodes {layout['overlaps']}"
    first, last = 1, len(layout["groups"]) - 1
    if last - first >= 2:
        assert [first, last] not in layout["links"], f"{name}: a wire runs from the first stage to the last"


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_editor_workflow_loads_cleanly_and_matches_its_api_twin(editor, name):
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    missing = unknown_types(editor, ui, name)
    editor.console.clear()
    editor.exceptions.clear()
    editor.evaluate(f"app.loadGraphData({json.dumps(ui)}, true, true, {json.dumps(name)})")
    prompt = editor.evaluate("app.graphToPrompt().then(p => p.output)")
    dialog = editor.evaluate("(document.querySelector('.p-dialog') || {}).innerText || ''")
    reported = editor.evaluate("document.body.innerText.includes('Some Nodes Are Missing') || "
                               "document.body.innerText.includes('missing nodes')")
    if missing:                    # an older host: its dialog names what it lacks, one line each
        assert editor.evaluate(CLOSE_DIALOGS)
        assert reported and set(missing) <= set(dialog.splitlines()), (name, dialog)
    else:
        assert not reported, f"{name}: the editor reports missing nodes"
    errors = [m for m in editor.console if m["type"] == "error"
              and not any(part in (m.get("url") or m["text"]) for part in EXPECTED_MISSING)]
    assert errors == [] and editor.exceptions == [], f"{name}: {errors} {editor.exceptions}"
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    assert prompt.keys() == api.keys(), name
    for node_id, node in api.items():
        if node["class_type"] in missing:
            continue
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


# what the editor shows after loading: each node's widgets (name, value) and its widgets_values re-serialised
SHOWN = """
Object.fromEntries(app.graph._nodes.map(n => [String(n.id), {
  type: n.type, widgets: (n.widgets || []).map(w => [w.name, w.value]),
  controls: (n.widgets || []).filter(w => (w.linkedWidgets || []).length).map(w => [w.name, w.linkedWidgets[0].value]),
  saved: n.serialize().widgets_values ?? null}]))
"""


@pytest.mark.parametrize("name", UI_WORKFLOWS)
def test_editor_workflow_shows_the_saved_widget_values(editor, name):
    """The widgets show what the file saved, read by name against the API twin (not by position, which is how
    a frontend misreads a file): every literal input of the twin, every seed's control widget at "fixed" (the
    templates fix their seeds), and each node's widgets_values written back exactly as saved."""
    ui = json.loads((WORKFLOWS / f"{name}.json").read_text())
    missing = unknown_types(editor, ui, name)
    open_workflow(editor, ui, name)
    shown = editor.evaluate(SHOWN)
    api = json.loads((WORKFLOWS / "api" / f"{name}.json").read_text())
    for node_id, node in api.items():
        if node["class_type"] in missing:      # a placeholder: no widgets, its saved values kept (checked below)
            continue
        widgets = dict(shown[node_id]["widgets"])
        for key, value in node["inputs"].items():
            if not isinstance(value, list) and key in widgets:
                assert widgets[key] == value, f"{name} node {node_id} ({node['class_type']}): {key} shows " \
                                              f"{widgets[key]!r}, saved {value!r}"
        controls = dict(shown[node_id]["controls"])
        for seed in ("seed", "noise_seed"):
            if seed in widgets:
                assert controls.get(seed) == "fixed", \
                    f"{name} node {node_id}: the control of {seed} shows {controls.get(seed)!r}, saved 'fixed'"
    for node in ui["nodes"]:
        if "widgets_values" in node:
            assert shown[str(node["id"])]["saved"] == node["widgets_values"], \
                f"{name} node {node['id']} ({node['type']}): widgets_values read back differently"


ROUND_TRIP = """
(() => {
  const differ = [];
  for (const type of Object.keys(LiteGraph.registered_node_types).filter(t => t.startsWith("OmniIdentity"))) {
    const made = LiteGraph.createNode(type), read = LiteGraph.createNode(type);
    if (!(made.widgets || []).length) continue;
    app.graph.add(made);
    app.graph.add(read);
    read.configure({...JSON.parse(JSON.stringify(made.serialize())), id: read.id});
    const a = made.widgets.map(w => [w.name, w.value]), b = read.widgets.map(w => [w.name, w.value]);
    if (JSON.stringify(a) !== JSON.stringify(b)) differ.push({type, made: a, read: b});
    app.graph.remove(made);
    app.graph.remove(read);
  }
  return differ;
})()
"""


def test_every_pack_node_reads_back_what_the_editor_saves(editor):
    """A node saved by this frontend and loaded again shows the same widget values, for every node of the pack:
    the frontend's loader must not take its saved values for an older layout (frontend 1.49 did for RB-Guidance
    while its seed's control widget was implied by the name seed, not stated)."""
    editor.evaluate("app.graph.clear()")
    assert editor.evaluate(ROUND_TRIP) == []
