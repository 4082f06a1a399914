"""`python -m omniid convert WORKFLOW.json`: IPAdapter_plus's nodes rewritten into this pack's.

Editor (UI) and API workflows alike. What converts (IPAdapter_plus 9d076a3d's node ids):
- IPAdapterModelLoader -> Identity Adapter Loader (the same file name in models/ipadapter);
- IPAdapterUnifiedLoader / ...FaceID / ...Community -> Identity Adapter Loader with the file its preset
  finds (h94's names; SDXL when the checkpoint's name says xl) + Load CLIP Vision (CLIP-H, bigG for
  the ViT-G preset, CLIP-L 336 for Kolors) (+ Face Analysis Loader with insightface/buffalo_l for FaceID
  presets); the loader's MODEL output was its model input passed through, so its consumers are
  wired to that input's source (the FaceID LoRA moves to the apply node's faceid_lora_strength);
- IPAdapterInsightFaceLoader -> Face Analysis Loader (insightface/<model_name>, its provider);
- PrepImageForClipVision -> Prep Image For CLIP Vision (OmniIdentity), the same values;
- IPAdapterNoise -> IPAdapter Noise (OmniIdentity), the same values (its fade, dissolve and gaussian types);
- IPAdapter, IPAdapterAdvanced, IPAdapterFaceID, IPAdapterPreciseStyleTransfer,
  IPAdapterPreciseComposition, IPAdapterMS, IPAdapterStyleComposition -> Apply IP-Adapter, IPAdapter_plus compatible
  (OmniIdentityApplyIPAdapterCompat) with the same values (IPAdapter's simple weight types as the types
  they stand for; IPAdapter Advanced's FaceID v2 weight, twice the weight; the precise boosts).
Links, positions, sizes, titles, modes and every other node are kept. Nodes that do not convert stay as
they are and are listed with the reason (the pack has no such feature yet), and so are the IPAdapter_plus
nodes that depend on them.
"""
from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

from .convert_plan import Plan, graph_from_api, graph_from_ui, plan
from .convert_tables import TARGETS, WIDGETS, OUTPUTS, TITLES


class ConvertError(ValueError):
    """A file that is not a workflow."""


# ----------------------------------------------------------------------------- writing it back
def convert_api(data: dict, p: Plan) -> dict:
    out = copy.deepcopy(data)

    def resolve(src):
        while tuple(src) in p.passthrough:
            src = p.passthrough[tuple(src)]
        return src

    for node_id, (kind, links, widgets) in p.replace.items():
        key = node_id if node_id in out else int(node_id)
        title = (out[key].get("_meta") or {}).get("title")
        inputs = {**widgets, **{name: [src[0], src[1]] for name, src in links.items()}}
        out[key] = {"class_type": kind, "inputs": inputs, "_meta": {"title": TITLES[kind] if title in (None, data[key]["class_type"]) else title}}
    for new_id, kind, widgets, _ in p.new:
        out[new_id] = {"class_type": kind, "inputs": dict(widgets), "_meta": {"title": TITLES[kind]}}
    planned = {str(k) for k in p.replace} | {new_id for new_id, *_ in p.new}
    for key, entry in out.items():
        if str(key) in planned:            # the plan's links already name the new sources
            continue
        for name, value in list(entry.get("inputs", {}).items()):
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int):
                src = resolve((str(value[0]), value[1]))
                entry["inputs"][name] = [src[0], src[1]]
    return out


def convert_ui(data: dict, p: Plan) -> dict:
    out = copy.deepcopy(data)
    nodes = {str(n["id"]): n for n in out["nodes"]}
    links = {link[0]: link for link in out.get("links", []) if link}
    replace = dict(p.replace)

    def resolve(src):
        while tuple(src) in p.passthrough:
            src = p.passthrough[tuple(src)]
        return src

    def node_ref(node_id: str):
        return int(node_id) if node_id.isdigit() else node_id

    for new_id, kind, widgets, near in p.new:      # the loaders a unified loader becomes, below it
        anchor = nodes[near]
        pos = anchor.get("pos") or [0, 0]
        pos = [pos.get("0", 0), pos.get("1", 0)] if isinstance(pos, dict) else list(pos)
        rank = sum(1 for other in p.new if other[3] == near and int(other[0]) <= int(new_id))
        raw = {"id": int(new_id), "type": kind, "pos": [pos[0], pos[1] + 130 * rank], "size": [315, 82],
               "flags": {}, "order": anchor.get("order", 0), "mode": anchor.get("mode", 0), "inputs": [],
               "outputs": [], "properties": {"Node name for S&R": kind}, "widgets_values": []}
        out["nodes"].append(raw)
        nodes[new_id] = raw
        replace[new_id] = (kind, {}, widgets)
    kept = []
    for link in links.values():
        if str(link[3]) in replace:              # inputs of replaced nodes are rebuilt from the plan
            continue
        src = resolve((str(link[1]), int(link[2])))   # MODEL through a unified loader: from its source
        link[1], link[2] = node_ref(src[0]), src[1]
        kept.append(link)
    next_link = max([int(data.get("last_link_id") or 0)] + list(links)) + 1
    pending = []
    for node_id, (kind, wanted, widgets) in replace.items():
        for name, src in wanted.items():
            link = [next_link, node_ref(src[0]), src[1], node_ref(node_id), None, None]
            next_link += 1
            kept.append(link)
            pending.append((link, name))
        raw = nodes[node_id]
        raw["type"] = kind
        raw["inputs"] = [{"name": name, "type": type_, "link": None} for name, type_ in TARGETS.get(kind, ())]
        raw["outputs"] = [{"name": name, "type": type_, "links": [], "slot_index": i}
                          for i, (name, type_) in enumerate(OUTPUTS[kind])]
        raw["widgets_values"] = [widgets.get(name) for name in WIDGETS[kind]]
        raw.setdefault("properties", {})["Node name for S&R"] = kind
    for link, name in pending:
        target = nodes[str(link[3])]
        link[4] = next(i for i, socket in enumerate(target["inputs"]) if socket["name"] == name)
    for raw in nodes.values():                   # sockets and outputs list their links again
        for socket in raw.get("inputs") or []:
            socket["link"] = None
        for output in raw.get("outputs") or []:
            output["links"] = []
    final = []
    for link in kept:
        source, target = nodes.get(str(link[1])), nodes.get(str(link[3]))
        if source is None or target is None or link[4] >= len(target.get("inputs") or []):
            continue
        target["inputs"][link[4]]["link"] = link[0]
        outputs = source.get("outputs") or []
        if link[2] < len(outputs):
            outputs[link[2]]["links"].append(link[0])
            link[5] = outputs[link[2]]["type"]
        final.append(link)
    out["links"] = sorted(final, key=lambda link: link[0])
    out["last_link_id"] = max([int(data.get("last_link_id") or 0)] + [link[0] for link in final])
    out["last_node_id"] = max([int(data.get("last_node_id") or 0)] + [int(i) for i in nodes if i.isdigit()])
    return out


# ----------------------------------------------------------------------------- entry points
def convert(data: dict) -> tuple[dict, Plan]:
    """(converted workflow, plan with what converted and what did not) for an editor or API workflow."""
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        graph = graph_from_ui(data)
        p = plan(graph)
        return convert_ui(data, p), p
    if isinstance(data, dict) and "prompt" in data and isinstance(data["prompt"], dict):
        data = data["prompt"]
    if isinstance(data, dict) and data and all(isinstance(n, dict) and "class_type" in n for n in data.values()):
        graph = graph_from_api(data)
        p = plan(graph)
        return convert_api(data, p), p
    raise ConvertError("not a ComfyUI workflow: neither an editor workflow (nodes and links) nor an API one "
                       "(node id -> {class_type, inputs})")


def report(p: Plan) -> str:
    lines = [f"converted {len(p.converted)} IPAdapter_plus node(s)"]
    lines += [f"  #{node_id} {old} -> {new}" for node_id, old, new in p.converted]
    lines += [f"  + #{node_id} {kind} (for #{near})" for node_id, kind, _, near in p.new]
    if p.skipped:
        lines.append(f"could not convert {len(p.skipped)} node(s) (kept as they are; IPAdapter_plus still needed for them):")
        lines += [f"  #{node_id} {kind}: {reason}" for node_id, kind, reason in p.skipped]
    lines += [f"note: {note}" for note in p.notes]
    return "\n".join(lines)


def add_parser(sub) -> None:
    c = sub.add_parser("convert", help="rewrite IPAdapter_plus nodes in a workflow (editor or API) into this pack's")
    c.add_argument("workflow", help="the workflow JSON (editor or API format)")
    c.add_argument("-o", "--output", help="where to write it (default: WORKFLOW.omniid.json beside it)")
    c.add_argument("--strict", action="store_true", help="exit 1 when a node could not be converted")


def cmd_convert(args) -> int:
    path = Path(args.workflow)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        converted, p = convert(data)
    except FileNotFoundError:
        print(f"error: workflow file not found: {path}", file=sys.stderr)
        return 2
    except (json.JSONDecodeError, ConvertError) as exc:
        print(f"error: {path}: {exc}", file=sys.stderr)
        return 2
    target = Path(args.output) if args.output else path.with_name(path.stem + ".omniid.json")
    target.write_text(json.dumps(converted, indent=2), encoding="utf-8")
    print(report(p))
    print(f"wrote {target}")
    return 1 if args.strict and p.skipped else 0
