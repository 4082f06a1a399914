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
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

COMPAT = "OmniIdentityApplyIPAdapterCompat"
ADAPTER_LOADER = "OmniIdentityAdapterLoader"
FACE_LOADER = "OmniIdentityFaceAnalysisLoader"
CLIP_LOADER = "CLIPVisionLoader"
PREP = "OmniIdentityPrepImageForClipVision"

# IPAdapter_plus's widget inputs per node, in its INPUT_TYPES order (older saves may lack trailing ones)
IPA_WIDGETS = {
    "IPAdapter": ("weight", "start_at", "end_at", "weight_type"),
    "IPAdapterAdvanced": ("weight", "weight_type", "combine_embeds", "start_at", "end_at", "embeds_scaling"),
    "IPAdapterFaceID": ("weight", "weight_faceidv2", "weight_type", "combine_embeds", "start_at", "end_at",
                        "embeds_scaling"),
    "IPAdapterPreciseStyleTransfer": ("weight", "style_boost", "combine_embeds", "start_at", "end_at",
                                      "embeds_scaling"),
    "IPAdapterPreciseComposition": ("weight", "composition_boost", "combine_embeds", "start_at", "end_at",
                                    "embeds_scaling"),
    "IPAdapterStyleComposition": ("weight_style", "weight_composition", "expand_style", "combine_embeds", "start_at",
                                  "end_at", "embeds_scaling"),
    "IPAdapterMS": ("weight", "weight_faceidv2", "weight_type", "combine_embeds", "start_at", "end_at",
                    "embeds_scaling", "layer_weights"),
    "IPAdapterModelLoader": ("ipadapter_file",),
    "IPAdapterUnifiedLoader": ("preset",),
    "IPAdapterUnifiedLoaderFaceID": ("preset", "lora_strength", "provider"),
    "IPAdapterUnifiedLoaderCommunity": ("preset",),
    "IPAdapterInsightFaceLoader": ("provider", "model_name"),
    "PrepImageForClipVision": ("interpolation", "crop_position", "sharpening"),
}
IPA_DEFAULTS = {"weight": 1.0, "start_at": 0.0, "end_at": 1.0, "weight_type": "linear", "combine_embeds": "concat",
                "embeds_scaling": "V only", "weight_faceidv2": 1.0, "style_boost": 1.0, "composition_boost": 0.0,
                "lora_strength": 0.6, "provider": "CPU", "model_name": "buffalo_l", "layer_weights": "",
                "interpolation": "LANCZOS", "crop_position": "top", "sharpening": 0.0,
                "weight_style": 1.0, "expand_style": False, "weight_composition": 1.0}
APPLY_TYPES = ("IPAdapter", "IPAdapterAdvanced", "IPAdapterFaceID", "IPAdapterPreciseStyleTransfer",
               "IPAdapterPreciseComposition", "IPAdapterMS", "IPAdapterStyleComposition")
LOADER_TYPES = ("IPAdapterModelLoader", "IPAdapterUnifiedLoader", "IPAdapterUnifiedLoaderFaceID",
                "IPAdapterUnifiedLoaderCommunity")
# sockets of IPAdapter_plus's apply nodes -> the compatible node's
APPLY_SOCKETS = {"model": "model", "image": "image", "image_negative": "image_negative", "attn_mask": "attn_mask",
                 "clip_vision": "clip_vision", "insightface": "face_analysis", "image_style": "image",
                 "image_composition": "image_composition"}

# the pack's nodes as the editor lays them out: socket inputs, widget inputs (in order), outputs
TARGETS = {
    COMPAT: (("model", "MODEL"), ("adapter", "IDENTITY_ADAPTER"), ("clip_vision", "CLIP_VISION"), ("image", "IMAGE"),
             ("image_negative", "IMAGE"), ("image_composition", "IMAGE"), ("attn_mask", "MASK"),
             ("face_analysis", "FACE_ANALYSIS")),
    ADAPTER_LOADER: (),
    PREP: (("image", "IMAGE"),),
    FACE_LOADER: (),
    CLIP_LOADER: (),
}
WIDGETS = {
    COMPAT: ("weight", "weight_type", "combine_embeds", "start_at", "end_at", "embeds_scaling", "weight_faceidv2",
             "weight_composition", "boost", "faceid_lora", "faceid_lora_strength", "layer_weights"),
    ADAPTER_LOADER: ("adapter_name",),
    FACE_LOADER: ("backend", "provider", "det_size", "dlib_detector", "arcface_model"),
    CLIP_LOADER: ("clip_name",),
    PREP: ("interpolation", "crop_position", "sharpening"),
}
OUTPUTS = {COMPAT: (("model", "MODEL"), ("face_image", "IMAGE")), ADAPTER_LOADER: (("adapter", "IDENTITY_ADAPTER"),),
           FACE_LOADER: (("face_analysis", "FACE_ANALYSIS"),), CLIP_LOADER: (("CLIP_VISION", "CLIP_VISION"),),
           PREP: (("image", "IMAGE"),)}
TITLES = {COMPAT: "Apply IP-Adapter, IPAdapter_plus compatible (OmniIdentity)",
          ADAPTER_LOADER: "Identity Adapter Loader (OmniIdentity)", FACE_LOADER: "Face Analysis Loader (OmniIdentity)",
          CLIP_LOADER: "Load CLIP Vision", PREP: "Prep Image For CLIP Vision (OmniIdentity)"}

CLIP_H, CLIP_G, CLIP_336 = ("CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors", "CLIP-ViT-bigG-14-laion2B-39B-b160k.safetensors",
                            "clip-vit-large-patch14-336.bin")
# preset (lower case prefix) -> (SD1.5 file, SDXL file, CLIP vision)
PRESETS = (
    ("light", ("ip-adapter_sd15_light_v11.bin", None, CLIP_H)),
    ("standard", ("ip-adapter_sd15.safetensors", "ip-adapter_sdxl_vit-h.safetensors", CLIP_H)),
    ("vit-g", ("ip-adapter_sd15_vit-G.safetensors", "ip-adapter_sdxl.safetensors", CLIP_G)),
    ("plus (", ("ip-adapter-plus_sd15.safetensors", "ip-adapter-plus_sdxl_vit-h.safetensors", CLIP_H)),
    ("plus face", ("ip-adapter-plus-face_sd15.safetensors", "ip-adapter-plus-face_sdxl_vit-h.safetensors", CLIP_H)),
    ("full", ("ip-adapter-full-face_sd15.safetensors", None, CLIP_H)),
    ("faceid portrait unnorm", (None, "ip-adapter-faceid-portrait_sdxl_unnorm.bin", CLIP_H)),
    ("faceid portrait", ("ip-adapter-faceid-portrait-v11_sd15.bin", "ip-adapter-faceid-portrait_sdxl.bin", CLIP_H)),
    ("faceid plus v2", ("ip-adapter-faceid-plusv2_sd15.bin", "ip-adapter-faceid-plusv2_sdxl.bin", CLIP_H)),
    ("faceid plus -", ("ip-adapter-faceid-plus_sd15.bin", None, CLIP_H)),
    ("faceid", ("ip-adapter-faceid_sd15.bin", "ip-adapter-faceid_sdxl.bin", CLIP_H)),
    ("composition", ("ip_plus_composition_sd15.safetensors", "ip_plus_composition_sdxl.safetensors", CLIP_H)),
    ("kolors", (None, "Kolors-IP-Adapter-Plus.bin", CLIP_336)),
)
LORA_PRESETS = ("faceid", "faceid plus -", "faceid plus v2")     # presets whose loader applies the FaceID LoRA

UNSUPPORTED = {
    "IPAdapterBatch": "unfold batch (one image per latent of the batch) is not in the pack yet",
    "IPAAdapterFaceIDBatch": "unfold batch (one image per latent of the batch) is not in the pack yet",
    "IPAdapterTiled": "tiled encoding of large or non-square references is not in the pack yet",
    "IPAdapterTiledBatch": "tiled encoding and unfold batch are not in the pack yet",
    "IPAdapterEmbeds": "IPAdapter_plus's EMBEDS pipeline (IPAdapter Encoder / Combine Embeds) has no converter yet",
    "IPAdapterEmbedsBatch": "IPAdapter_plus's EMBEDS pipeline and unfold batch have no converter yet",
    "IPAdapterEncoder": "IPAdapter_plus's EMBEDS pipeline (weighted encodes) has no converter yet",
    "IPAdapterCombineEmbeds": "IPAdapter_plus's EMBEDS pipeline has no converter yet",
    "IPAdapterSaveEmbeds": "IPAdapter_plus's pickled .ipadpt embeds are not read (the pack never loads pickles)",
    "IPAdapterLoadEmbeds": "IPAdapter_plus's pickled .ipadpt embeds are not read (the pack never loads pickles)",
    "IPAdapterStyleCompositionBatch": "a separate composition image and unfold batch are not in the pack yet",
    "IPAdapterClipVisionEnhancer": "the tiled CLIP vision enhancer is not in the pack yet",
    "IPAdapterClipVisionEnhancerBatch": "the tiled CLIP vision enhancer and unfold batch are not in the pack yet",
    "IPAdapterFromParams": "IPADAPTER_PARAMS (regional conditioning) are not in the pack yet",
    "IPAdapterRegionalConditioning": "IPADAPTER_PARAMS (regional conditioning) are not in the pack yet",
    "IPAdapterCombineParams": "IPADAPTER_PARAMS (regional conditioning) are not in the pack yet",
    "IPAdapterFaceIDKolors": "Kolors FaceID (its ChatGLM UNet's encoder_hid_proj inside the adapter) is not in the pack yet",
    "IPAdapterNoise": "IPAdapter_plus's noise images have no counterpart in the pack yet (connect any image to image_negative)",
    "IPAdapterWeights": "frame weight schedules (AnimateDiff) are not in the pack yet",
    "IPAdapterWeightsFromStrategy": "frame weight schedules (AnimateDiff) are not in the pack yet",
    "IPAdapterPromptScheduleFromWeightsStrategy": "frame weight schedules (AnimateDiff) are not in the pack yet",
    "IPAdapterCombineWeights": "frame weight schedules (AnimateDiff) are not in the pack yet",
}
IPA_TYPES = set(IPA_WIDGETS) | set(UNSUPPORTED)


class ConvertError(ValueError):
    """A file that is not a workflow."""


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
    reasons: dict[str, str] = {n.id: UNSUPPORTED[n.type] for n in nodes.values() if n.type in UNSUPPORTED}
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
