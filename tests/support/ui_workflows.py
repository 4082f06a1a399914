"""Make the editor (UI) workflows and their thumbnails from the API-format workflows.

    .venv/bin/python -m omniid.ui_workflows [--comfyui PATH]

For each ``workflows/api/<name>.json`` the real frontend, served by a ComfyUI started on
the tiny test models and driven in headless Chromium, builds the graph
(``app.loadApiJson``), lays it out, fixes the seeds, adds a note saying what the
workflow is for and which model files go where, and serialises it to
``workflows/<name>.json`` (where ComfyUI's template browser finds a pack's workflows),
with a thumbnail ``workflows/<name>.jpg``. The UI files are thus exactly what the editor
makes of the API twins; ``tests/comfy/test_frontend.py`` checks that they load and
convert back.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from . import assets
from .browser import Chromium, Page
from omniid.cli.server import comfyui_python, find_comfyui
from .testing import WORKFLOWS, populate_base, start_server

MODEL_FOLDERS = {
    "CheckpointLoaderSimple": {"ckpt_name": "checkpoints"},
    "CLIPVisionLoader": {"clip_name": "clip_vision"},
    "ControlNetLoader": {"control_net_name": "controlnet"},
    "UNETLoader": {"unet_name": "diffusion_models"},
    "DualCLIPLoader": {"clip_name1": "text_encoders", "clip_name2": "text_encoders"},
    "VAELoader": {"vae_name": "vae"},
    "OmniIdentityEncoderLoader": {"encoder_name": "omni_identity"},
    "OmniIdentityAdapterLoader": {"adapter_name": "ipadapter"},
    "OmniIdentityFlameLoader": {"model": "flame", "landmark_embedding": "flame"},
    "OmniIdentityFaceAnalysisLoader": {"arcface_model": "insightface"},
}
READY = ("window.app && app.graph && window.LiteGraph && "
         "LiteGraph.registered_node_types['OmniIdentityEncode'] ? true : false")


def model_lines(api: dict) -> list[str]:
    lines = []
    for node in api.values():
        for field, folder in MODEL_FOLDERS.get(node["class_type"], {}).items():
            value = node["inputs"].get(field)
            if isinstance(value, str) and value != "none":
                line = f"- `models/{folder}/{value}` ({node['_meta']['title']})"
                if line not in lines:
                    lines.append(line)
        if node["class_type"] == "OmniIdentityFaceAnalysisLoader" and node["inputs"].get("backend") == "dlib":
            line = "- face analysis: dlib is bundled, no file needed"
            if line not in lines:
                lines.append(line)
    return lines


def template_notes() -> dict:
    """workflows/notes.toml: name -> {title, purpose}."""
    import tomllib
    return tomllib.loads((WORKFLOWS / "notes.toml").read_text(encoding="utf-8"))


def note_text(name: str, api: dict, notes: dict) -> str:
    info = notes[name]
    text = [f"## {info['title']}", "", info["purpose"], "", "**Model files** (rename in the loaders if yours differ):"]
    text += model_lines(api) or ["- none"]
    inputs = sorted({n["inputs"]["image"] for n in api.values() if n["class_type"] == "LoadImage"})
    if inputs:
        text += ["", "**Photos**: load your own in " + ", ".join(f"`{i}`" for i in inputs) + "."]
    text += ["", "Pack: ComfyUI-OmniIdentity. API twin: `workflows/api/" + name + ".json`."]
    return "\n".join(text)


BUILD = """
(async () => {
  const api = %(api)s;
  app.loadApiJson(api, %(name)s);
  for (const node of app.graph._nodes)
    for (const w of node.widgets || [])
      if (w.name === "control_after_generate") w.value = "fixed";
  const nodes = app.graph._nodes;
  const minX = Math.min(...nodes.map(n => n.pos[0])), minY = Math.min(...nodes.map(n => n.pos[1]));
  const note = LiteGraph.createNode("MarkdownNote");
  note.title = "About this workflow";
  note.widgets[0].value = %(note)s;
  note.size = [520, 340];
  note.pos = [minX, minY - 400];
  app.graph.add(note);
  app.graph.setDirtyCanvas(true, true);
  return app.graph.serialize();
})()
"""

FIT = """
(() => {
  const nodes = app.graph._nodes;
  const x0 = Math.min(...nodes.map(n => n.pos[0])) - 40, y0 = Math.min(...nodes.map(n => n.pos[1])) - 80;
  app.canvas.low_quality_zoom_threshold = 0.05;
  const x1 = Math.max(...nodes.map(n => n.pos[0] + n.size[0])) + 40;
  const y1 = Math.max(...nodes.map(n => n.pos[1] + n.size[1])) + 40;
  const el = app.canvas.canvas, rect = el.getBoundingClientRect();
  const scale = Math.min(rect.width / (x1 - x0), rect.height / (y1 - y0));
  app.canvas.ds.scale = scale;
  app.canvas.ds.offset = [-x0 + (rect.width / scale - (x1 - x0)) / 2, -y0 + (rect.height / scale - (y1 - y0)) / 2];
  app.canvas.setDirty(true, true);
  app.canvas.draw(true, true);
  return {x: rect.left, y: rect.top, width: rect.width, height: rect.height};
})()
"""


def open_editor(browser: Chromium, url: str) -> Page:
    """The editor at ``url``, with the first-run template dialog already dismissed."""
    import urllib.request
    settings = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False,
                "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1}
    request = urllib.request.Request(f"{url}/settings", data=json.dumps(settings).encode(), method="POST",
                                     headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=30).close()
    page = browser.new_page()
    page.navigate(url)
    page.wait_for(READY, timeout=180)
    return page


def build_all(url: str, names: list[str] | None = None, thumbnails: bool = True) -> list[Path]:
    from PIL import Image
    notes = template_notes()
    written = []
    with Chromium(width=1600, height=1000) as browser:
        page = open_editor(browser, url)
        for api_path in sorted((WORKFLOWS / "api").glob("*.json")):
            name = api_path.stem
            if names and name not in names:
                continue
            api = json.loads(api_path.read_text())
            ui = page.evaluate(BUILD % {"api": json.dumps(api), "name": json.dumps(name),
                                        "note": json.dumps(note_text(name, api, notes))})
            target = WORKFLOWS / f"{name}.json"
            target.write_text(json.dumps(ui, indent=1) + "\n")
            written.append(target)
            if thumbnails:
                clip = page.evaluate(FIT)
                import time
                time.sleep(0.5)
                shot = WORKFLOWS / f"{name}.jpg"
                page.screenshot(shot, clip=clip)
                with Image.open(shot) as image:
                    image.convert("RGB").resize((640, int(640 * image.height / image.width))).save(shot, quality=82)
                written.append(shot)
        page.close()
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_PATH, else the one scripts/setup.sh recorded)")
    parser.add_argument("--only", action="append", help="workflow names to rebuild (default: all)")
    args = parser.parse_args(argv)
    comfyui = Path(args.comfyui) if args.comfyui else find_comfyui()
    if comfyui is None:
        print("error: no ComfyUI checkout (set COMFYUI_PATH)", file=sys.stderr)
        return 3
    tiny = assets.tiny_models(comfyui, comfyui_python(comfyui))
    base = populate_base(Path(tempfile.mkdtemp(prefix="omniid-ui-")), tiny, {})
    server = start_server(comfyui, base)
    try:
        for path in build_all(server.url, args.only):
            print(path.relative_to(WORKFLOWS.parent))
    finally:
        server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
