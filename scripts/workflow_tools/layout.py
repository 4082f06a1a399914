"""The one layout every editor workflow follows: stages left to right, a titled, coloured group each.

Inputs (the photos and text you change) -> Identity (face analysis, encoders) -> Model (checkpoint,
adapters, Infinite-ID) -> Training -> Sampling (prompts, latent, guider, sampler) -> Output. An
"About" group on the left holds the workflow's note; every stage group starts with a short note
on what it does. Stages without nodes are left out. The frontend itself places the nodes (it
knows their sizes), by the JavaScript below.
"""
from __future__ import annotations

import json

from support.browser import SHOW_PHOTOS_JS

# key, group title, group colour, what the stage's note says
STAGES = (
    ("inputs", "Inputs", "#3f789e", "The photos and text you change."),
    ("identity", "Identity", "#8a5a9e", "Faces found and aligned, then encoded into an identity."),
    ("model", "Model", "#a1743a", "The base model, and the identity put into its attention."),
    ("training", "Training", "#9e3f3f", "Training runs inside these nodes; Cancel keeps a checkpoint that resumes."),
    ("sampling", "Sampling", "#3f8a5a", "Prompts, latent and sampler: where the image is made."),
    ("output", "Output", "#55595e", "What is saved or previewed."),
)
STAGE_OF = {
    "LoadImage": "inputs", "ImageBatch": "inputs", "PrimitiveStringMultiline": "inputs", "PrimitiveString": "inputs",
    "OmniIdentityFaceAnalysisLoader": "identity", "OmniIdentityFaceCrop": "identity",
    "OmniIdentityFaceMask": "identity", "CLIPVisionLoader": "identity", "OmniIdentityEncoderLoader": "identity",
    "OmniIdentityEncode": "identity", "OmniIdentityEncodeBaseline": "identity",
    "OmniIdentityEncodeInfiniteID": "identity", "OmniIdentityCombineEmbeds": "identity",
    "OmniIdentityLoadEmbeds": "identity", "OmniIdentityFlameLoader": "identity", "OmniIdentityFlameFit": "identity",
    "OmniIdentityFlameLandmarks": "identity", "OmniIdentityFaceLandmarks": "identity",
    "OmniIdentityDataset": "identity", "OmniIdentityBuildDataset": "identity",
    "OmniIdentityPuLIDFluxLoader": "identity", "OmniIdentityInfiniteYouLoader": "identity",
    "CheckpointLoaderSimple": "model", "UNETLoader": "model", "CLIPLoader": "model", "DualCLIPLoader": "model",
    "VAELoader": "model", "ControlNetLoader": "model", "OmniIdentityAdapterLoader": "model", "OmniIdentityApplyAdapter": "model",
    "OmniIdentityMixedAttention": "model", "OmniIdentityAdaINMean": "model", "OmniIdentityApplyPuLIDFlux": "model",
    "OmniIdentityApplyInfiniteYou": "sampling",
    "OmniIdentityTrainEncoderMTD": "training", "OmniIdentityTrainFlowMatching": "training",
    "OmniIdentityTrainPivotEncoder": "training",
    "CLIPTextEncode": "sampling", "ConditioningZeroOut": "sampling", "FluxGuidance": "sampling",
    "ControlNetApplyAdvanced": "sampling", "OmniIdentityApplyPivot": "sampling", "EmptyLatentImage": "sampling",
    "EmptySD3LatentImage": "sampling", "EmptyFlux2LatentImage": "sampling", "Flux2Scheduler": "sampling",
    "FluxKontextImageScale": "sampling", "VAEEncode": "sampling", "ReferenceLatent": "sampling", "KSampler": "sampling",
    "RandomNoise": "sampling", "KSamplerSelect": "sampling", "BasicScheduler": "sampling", "OmniIdentityRBGuidance": "sampling",
    "SamplerCustomAdvanced": "sampling",
    "VAEDecode": "output", "SaveImage": "output", "PreviewImage": "output", "PreviewAny": "output",
    "MaskToImage": "output", "OmniIdentitySimilarity": "output", "OmniIdentitySaveEncoder": "output",
    "OmniIdentitySaveAdapter": "output", "OmniIdentitySaveEmbeds": "output", "OmniIdentitySavePivotEncoder": "output",
}


def stage_of(node: dict, overrides: dict) -> str:
    title = node.get("_meta", {}).get("title", "")
    if title in overrides:
        return overrides[title]
    if node["class_type"] not in STAGE_OF:
        raise KeyError(f"no stage for {node['class_type']!r}: add it to STAGE_OF in scripts/workflow_tools/layout.py")
    return STAGE_OF[node["class_type"]]


def plan(api: dict, overrides: dict, stage_notes: dict) -> list[dict]:
    """The groups in order: [{key, title, color, note, ids}] for the stages that have nodes."""
    groups = []
    for key, title, color, note in STAGES:
        ids = [int(i) for i, node in api.items() if stage_of(node, overrides) == key]
        if ids:
            groups.append({"key": key, "title": title, "color": color, "note": stage_notes.get(key, note),
                           "ids": ids})
    return groups


BUILD = """
(async () => {
  %(show_photos)s
  const api = %(api)s, groups = %(groups)s, about = %(about)s;
  app.clean();                                 // 1.27's loadApiJson keeps the last graph's previews, by node id
  await app.loadApiJson(api, %(name)s);        // a promise in newer frontends (1.49: nodes made after an await)
  const graph = app.graph;
  await showPhotos(false);                     // Load Image nodes placed at their size with the photo shown
  for (const node of graph._nodes)
    for (const w of node.widgets || [])
      if (w.name === "control_after_generate") w.value = "fixed";
  const GAP = 40, HEADER = 56, PAD = 24, NOTE_H = 96, MAX_H = 1100, TITLE = LiteGraph.NODE_TITLE_HEIGHT;
  const byId = new Map(graph._nodes.map(n => [String(n.id), n]));    // API ids are numbers, or strings
  const columns = [{title: "About", color: "#444444", note: about, ids: [], about: true}, ...groups];
  for (const column of columns) {
    const n = LiteGraph.createNode("MarkdownNote");
    n.title = column.about ? "About this workflow" : column.title + ": what it does";
    graph.add(n);
    n.widgets[0].value = column.note;          // after add: 1.49 gives an added node's widgets stored values
    column.header = n;
    column.group = new LiteGraph.LGraphGroup(column.title);
    column.group.color = column.color;
    column.group.font_size = 28;
    graph.add(column.group);
  }
  const settle = n => {                       // a node's size as the frontend will draw it
    const min = n.computeSize();
    n.size = [Math.max(n.size[0], min[0]), Math.max(n.size[1], min[1])];
  };
  const place = () => {
    let x = 0;
    for (const column of columns) {
      const members = column.ids.map(id => byId.get(String(id)));
      members.forEach(settle);
      const width = Math.max(360, ...members.map(n => n.size[0]));
      const lanes = [[]];                     // a tall stage becomes sub-columns: readable at 75 %%
      let height = 0;
      for (const n of members) {
        if (height > 0 && height + n.size[1] > MAX_H) { lanes.push([]); height = 0; }
        lanes[lanes.length - 1].push(n);
        height += n.size[1] + GAP + TITLE;
      }
      const inner = column.about ? 560 : lanes.length * width + (lanes.length - 1) * GAP;
      column.header.size = [inner, column.about ? 640 : NOTE_H];
      column.header.pos = [x + PAD, HEADER + TITLE];
      const below = column.header.pos[1] + column.header.size[1];
      let bottom = below;
      lanes.forEach((lane, i) => {
        let y = below + GAP + TITLE;
        for (const n of lane) {
          n.pos = [x + PAD + i * (width + GAP), y];
          y += n.size[1] + GAP + TITLE;
        }
        bottom = Math.max(bottom, y - GAP - TITLE);
      });
      column.group.pos = [x, 0];
      column.group.size = [inner + 2 * PAD, bottom + PAD];
      x += inner + 2 * PAD + 2 * GAP;
    }
  };
  place();
  app.canvas.draw(true, true);                // widgets measure themselves on the first draw
  place();
  app.canvas.ds.scale = %(zoom)s;               // the view saved with it: from the top left, at this zoom
  app.canvas.ds.offset = [40, 40];
  graph.setDirtyCanvas(true, true);
  return graph.serialize();
})()
"""

# the canvas at 75 % zoom, sized to show the whole graph
AT_ZOOM = """
(() => {
  const scale = %(scale)s, margin = 40;
  const groups = app.graph._groups;
  const x0 = Math.min(...groups.map(g => g.pos[0])) - margin, y0 = Math.min(...groups.map(g => g.pos[1])) - margin;
  const x1 = Math.max(...groups.map(g => g.pos[0] + g.size[0])) + margin;
  const y1 = Math.max(...groups.map(g => g.pos[1] + g.size[1])) + margin;
  return {x0, y0, width: Math.ceil((x1 - x0) * scale), height: Math.ceil((y1 - y0) * scale)};
})()
"""

DRAW = """
(() => {
  const c = app.canvas, rect = c.canvas.getBoundingClientRect();
  // newer frontends lay menus, the sidebar and toasts over the canvas: hidden (layout kept) for the screenshot,
  // all but the nodes' own DOM widgets (notes, text boxes)
  window.__omniidHidden = [];
  for (let el = c.canvas; el.parentElement && el !== document.body; el = el.parentElement)
    for (const sibling of el.parentElement.children)
      if (sibling !== el && sibling.style.visibility !== "hidden"
          && !sibling.matches(".dom-widget, textarea") && !sibling.querySelector(".dom-widget, textarea")) {
        sibling.style.visibility = "hidden";
        window.__omniidHidden.push(sibling);
      }
  c.low_quality_zoom_threshold = 0.05;
  c.show_info = false;
  c.ds.scale = %(scale)s;
  c.ds.offset = [-(%(x0)s), -(%(y0)s)];
  c.setDirty(true, true);
  c.draw(true, true);
  return {x: rect.left, y: rect.top, width: %(width)s, height: %(height)s};
})()
"""


SHOW_OVERLAYS = "(window.__omniidHidden || []).forEach(el => { el.style.visibility = ''; }), true"


def build_script(name: str, api: dict, groups: list[dict], about: str, zoom: float = 0.75) -> str:
    return BUILD % {"api": json.dumps(api), "name": json.dumps(name), "groups": json.dumps(groups),
                    "about": json.dumps(about), "zoom": json.dumps(zoom), "show_photos": SHOW_PHOTOS_JS}
