"""The plan of `python -m omniid convert`: a workflow read into a format-neutral graph, and what becomes what
(which IPAdapter_plus nodes convert, which stay and why, the loaders a unified loader becomes, the values)."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Optional

from .convert_tables import (COMPAT, ADAPTER_LOADER, FACE_LOADER, CLIP_LOADER, PREP, NOISE, NOISE_TYPES,
                             IPA_WIDGETS, IPA_DEFAULTS,
                             APPLY_TYPES, LOADER_TYPES, APPLY_SOCKETS, WIDGETS, PRESETS, LORA_PRESETS, UNSUPPORTED)


# ----------------------------------------------------------------------------- a format-neutral graph
@dataclass
class Node:
    id: str
    type: str
    links: dict = field(default_factory=dict)       # input name -> (source id, slot)
    widgets: dict = field(default_factory=dict)     # input name -> value
    raw: Optional[dict] = None                      # the original (UI node or API entry)


def ipa_widgets(node_type: str, values) -> dict:
    names = IPA_WIDGETS.get(node_type, ())
    values = list(values or [])
    return {name: (values[i] if i < len(values) else IPA_DEFAULTS.get(name)) for i, name in enumerate(names)}


def graph_from_ui(data: dict) -> dict[str, Node]:
    links = {link[0]: link for link in data.get("links", []) if link}
    nodes = {}
    for raw in data["nodes"]:
        node = Node(str(raw["id"]), raw["type"], raw=raw)
        for socket in raw.get("inputs") or []:
            link = links.get(socket.get("link"))
            if link is not None:
                node.links[socket["name"]] = (str(link[1]), int(link[2]))
        node.widgets = ipa_widgets(raw["type"], raw.get("widgets_values"))
        nodes[node.id] = node
    return nodes


def graph_from_api(data: dict) -> dict[str, Node]:
    nodes = {}
    for key, raw in data.items():
        node = Node(str(key), raw["class_type"], raw=raw)
        for name, value in (raw.get("inputs") or {}).items():
            if isinstance(value, list) and len(value) == 2 and isinstance(value[1], int) and isinstance(value[0], (str, int)):
                node.links[name] = (str(value[0]), value[1])
            else:
                node.widgets[name] = value
        nodes[node.id] = node
    return nodes


# ----------------------------------------------------------------------------- the plan
@dataclass
class Plan:
    """What becomes what: node id -> (new type, links, widgets); new nodes; MODEL pass-throughs; report."""
    replace: dict = field(default_factory=dict)
    new: list = field(default_factory=list)         # (new id, type, widgets, near node id)
    passthrough: dict = field(default_factory=dict)   # (node id, slot) -> (source id, slot)
    converted: list = field(default_factory=list)
    skipped: list = field(default_factory=list)     # (node id, type, reason)
    notes: list = field(default_factory=list)


def preset_files(preset: str, sdxl: bool) -> tuple[Optional[str], str]:
    text = (preset or "").lower()
    for prefix, (sd15, xl, clip) in PRESETS:
        if text.startswith(prefix):
            return (xl if sdxl else sd15), clip
    raise KeyError(preset)


def looks_sdxl(nodes: dict[str, Node]) -> bool:
    """Whether the workflow's checkpoint is SDXL, from its loader's file name (IPAdapter_plus asks the model)."""
    for node in nodes.values():
        if not node.type.startswith(("CheckpointLoader", "UNETLoader", "MZ_KolorsUNETLoader")):
            continue
        if node.raw is not None and "widgets_values" in node.raw:
            names = (node.raw.get("widgets_values") or [None])[:1]
        else:
            names = [node.widgets.get("ckpt_name"), node.widgets.get("unet_name")]
        if any(isinstance(v, str) and re.search(r"xl|kolors|pony|illustrious", v, re.IGNORECASE) for v in names):
            return True
    return False


def consumers(nodes: dict[str, Node], node_id: str, slot: int) -> list[tuple[str, str]]:
    return [(n.id, name) for n in nodes.values() for name, src in n.links.items() if src == (node_id, slot)]


def plan(nodes: dict[str, Node]) -> Plan:
    p = Plan()
    sdxl = looks_sdxl(nodes)
    reasons: dict[str, str] = {n.id: UNSUPPORTED[n.type] for n in nodes.values() if n.type in UNSUPPORTED
                               and not (n.type == "IPAdapterNoise" and n.widgets.get("type") in NOISE_TYPES)}
    for n in nodes.values():
        if n.type in APPLY_TYPES:
            problem = apply_problem(n)
            if not problem and n.type == "IPAdapterStyleComposition" and not sdxl:
                problem = "style and composition is SDXL only (IPAdapter_plus refuses SD1.5 here too)"
            if problem:
                reasons[n.id] = problem
        elif n.type in LOADER_TYPES and n.type != "IPAdapterModelLoader":
            try:
                if preset_files(n.widgets.get("preset"), sdxl)[0] is None:
                    reasons[n.id] = f"preset {n.widgets.get('preset')!r} has no {'SDXL' if sdxl else 'SD1.5'} file"
            except KeyError:
                reasons[n.id] = f"unknown preset {n.widgets.get('preset')!r}"

    def users(n: Node) -> list[str]:
        """The nodes reading a loader's IPADAPTER (or INSIGHTFACE), other loaders' pipeline inputs aside."""
        slot = 1 if n.type in LOADER_TYPES and n.type != "IPAdapterModelLoader" else 0
        return [c for c, _ in consumers(nodes, n.id, slot) if nodes[c].type not in LOADER_TYPES]

    changed = True
    while changed:                       # an apply needs its loader converted; a loader, one user that converts
        changed = False
        for n in nodes.values():
            if n.id in reasons:
                continue
            if n.type in APPLY_TYPES:
                source = n.links.get("ipadapter")
                loader = nodes.get(source[0]) if source else None
                face = nodes.get(n.links["insightface"][0]) if "insightface" in n.links else None
                if loader is None or loader.type not in LOADER_TYPES or loader.id in reasons:
                    reasons[n.id] = ("its ipadapter comes from a node that does not convert"
                                     + (f" ({loader.type} #{loader.id})" if loader is not None else ""))
                elif "clip_vision" not in n.links and loader.type == "IPAdapterModelLoader":
                    reasons[n.id] = "no clip_vision connected (IPAdapter_plus needs one here too)"
                elif face is not None and (face.type != "IPAdapterInsightFaceLoader" or face.id in reasons):
                    reasons[n.id] = f"its insightface comes from a node that does not convert ({face.type} #{face.id})"
                changed = changed or n.id in reasons
            elif n.type in LOADER_TYPES + ("IPAdapterInsightFaceLoader",):
                readers = users(n)
                if readers and all(c in reasons for c in readers):
                    reasons[n.id] = f"every node it feeds stays with IPAdapter_plus (#{', #'.join(readers)})"
                    changed = True
    next_id = max([int(i) for i in nodes if i.isdigit()] + [0]) + 1
    made: dict[str, dict] = {}          # loader id -> {"adapter"/"face": id, "clip": id, "face": id, "lora": strength}

    def add(kind: str, widgets: dict, near: str) -> str:
        nonlocal next_id
        new_id = str(next_id)
        next_id += 1
        p.new.append((new_id, kind, widgets, near))
        return new_id

    for n in nodes.values():
        if n.id in reasons or n.type not in LOADER_TYPES + ("IPAdapterInsightFaceLoader",):
            continue
        split = any(c in reasons for c in users(n))     # some readers stay: keep it, add the pack's beside it
        if n.type == "IPAdapterInsightFaceLoader":
            kind, widgets = FACE_LOADER, face_widgets(n.widgets.get("model_name"), n.widgets.get("provider"))
        elif n.type == "IPAdapterModelLoader":
            kind, widgets = ADAPTER_LOADER, {"adapter_name": n.widgets.get("ipadapter_file")}
        else:
            preset = n.widgets.get("preset")
            adapter_file, clip = preset_files(preset, sdxl)
            kind, widgets = ADAPTER_LOADER, {"adapter_name": adapter_file}
        if split:
            target = add(kind, widgets, n.id)
            p.converted.append((n.id, n.type, f"{kind} #{target} (added; #{n.id} stays for the nodes that do not convert)"))
        else:
            target = n.id
            p.replace[n.id] = (kind, {}, widgets)
            p.converted.append((n.id, n.type, kind))
        made[n.id] = {"target": target}
        if n.type not in ("IPAdapterInsightFaceLoader", "IPAdapterModelLoader"):
            made[n.id]["clip"] = add(CLIP_LOADER, {"clip_name": clip}, n.id)
            if n.type == "IPAdapterUnifiedLoaderFaceID":
                made[n.id]["face"] = add(FACE_LOADER, face_widgets("buffalo_l", n.widgets.get("provider")), n.id)
                if any(str(preset).lower().startswith(prefix) and not str(preset).lower().startswith("faceid portrait")
                       for prefix in LORA_PRESETS):
                    made[n.id]["lora"] = float(n.widgets.get("lora_strength") or 0.0)
            if "model" in n.links:
                made[n.id]["model"] = n.links["model"]
                if not split:
                    p.passthrough[(n.id, 0)] = n.links["model"]
            p.notes.append(f"#{n.id} {n.type} '{preset}': uses models/ipadapter/{adapter_file} and "
                           f"models/clip_vision/{clip} ({'SDXL' if sdxl else 'SD1.5'} from the checkpoint's name); "
                           "rename or choose yours in the loaders if yours are named otherwise")
    for n in nodes.values():
        if n.type == "PrepImageForClipVision":       # a pure image step: always converts
            p.replace[n.id] = (PREP, {"image": n.links["image"]} if "image" in n.links else {},
                               {k: n.widgets.get(k) for k in WIDGETS[PREP]})
            p.converted.append((n.id, n.type, PREP))
        if n.type == "IPAdapterNoise" and n.widgets.get("type") in NOISE_TYPES:     # an image step as well
            p.replace[n.id] = (NOISE, {"image": n.links["image_optional"]} if "image_optional" in n.links else {},
                               {k: n.widgets.get(k) for k in WIDGETS[NOISE]})
            p.converted.append((n.id, n.type, NOISE))
    for n in nodes.values():
        if n.id in reasons or n.type not in APPLY_TYPES:
            continue
        loader = n.links["ipadapter"][0]
        extra = made[loader]
        links = {APPLY_SOCKETS[name]: src for name, src in n.links.items() if name in APPLY_SOCKETS}
        model = links.get("model")
        while model is not None and model[0] in made and "model" in made[model[0]] and model[1] == 0:
            model = links["model"] = made[model[0]]["model"]    # a unified loader passes its model input through
        links["adapter"] = (extra["target"], 0)
        if "face_analysis" in links:
            links["face_analysis"] = (made[links["face_analysis"][0]]["target"], 0)
        if "clip_vision" not in links and "clip" in extra:
            links["clip_vision"] = (extra["clip"], 0)
        if "face_analysis" not in links and "face" in extra:
            links["face_analysis"] = (extra["face"], 0)
        if n.type == "IPAdapterStyleComposition" and "image_composition" not in links and "image" in links:
            links["image_composition"] = links["image"]          # its default: the style image
        widgets = compat_widgets(n.type, n.widgets)
        if "lora" in extra:
            widgets.update(faceid_lora="auto", faceid_lora_strength=extra["lora"])
        p.replace[n.id] = (COMPAT, links, widgets)
        p.converted.append((n.id, n.type, COMPAT))
    for node_id, reason in reasons.items():
        p.skipped.append((node_id, nodes[node_id].type, reason))
    p.skipped.sort(key=lambda item: int(item[0]) if item[0].isdigit() else 0)
    return p


def apply_problem(n: Node) -> Optional[str]:
    from_links = [name for name in ("weight", "start_at", "end_at", "weight_faceidv2") if name in n.links]
    if from_links:
        return f"{', '.join(from_links)} come{'s' if len(from_links) == 1 else ''} through a link (a weight schedule)"
    if "ipadapter" not in n.links:
        return "no ipadapter connected"
    return None


def face_widgets(model_name, provider) -> dict:
    provider = {"ROCM": "ROCm"}.get(str(provider), str(provider or "CPU"))
    return {"backend": f"insightface/{model_name or 'buffalo_l'}", "provider": provider, "det_size": 640,
            "dlib_detector": "hog", "arcface_model": "none"}


def compat_widgets(node_type: str, w: dict) -> dict:
    """The compatible node's widget values for an IPAdapter_plus apply node's."""
    weight = float(w.get("weight", 1.0))
    out = {"weight": weight, "weight_type": w.get("weight_type", "linear"),
           "combine_embeds": w.get("combine_embeds", "concat"), "start_at": float(w.get("start_at", 0.0)),
           "end_at": float(w.get("end_at", 1.0)), "embeds_scaling": w.get("embeds_scaling", "V only"),
           "weight_faceidv2": weight * 2, "weight_composition": 1.0, "boost": weight,
           "faceid_lora": "auto", "faceid_lora_strength": 0.0, "layer_weights": ""}
    if node_type == "IPAdapter":
        value = str(w.get("weight_type", "standard"))
        out["weight_type"] = ("style transfer" if value.startswith("style")
                              else "ease out" if value == "prompt is more important" else "linear")
    elif node_type in ("IPAdapterFaceID", "IPAdapterMS"):
        out["weight_faceidv2"] = float(w.get("weight_faceidv2", 1.0))
        out["layer_weights"] = str(w.get("layer_weights") or "")
    elif node_type == "IPAdapterStyleComposition":
        weight = float(w.get("weight_style", 1.0))
        out.update(weight=weight, weight_faceidv2=weight * 2, boost=weight,
                   weight_composition=float(w.get("weight_composition", 1.0)),
                   weight_type="strong style and composition" if w.get("expand_style") else "style and composition",
                   combine_embeds=w.get("combine_embeds") or "average")
    elif node_type == "IPAdapterPreciseStyleTransfer":
        out.update(weight_type="style transfer precise", boost=float(w.get("style_boost", 1.0)))
    elif node_type == "IPAdapterPreciseComposition":
        out.update(weight_type="composition precise", boost=float(w.get("composition_boost", 0.0)))
    return out
