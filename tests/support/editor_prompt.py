"""Run an editor workflow in a ComfyUI loaded in this process: the API prompt the editor would queue for it
(widget values matched to the node classes' inputs, links through reroutes), ComfyUI's own validation and
executor, and a twin with IPAdapter_plus's nodes taken out (tests/support/ipadapter_plus_examples.py)."""
from __future__ import annotations

import asyncio
import inspect
import json
import uuid


def resolved(value):
    """A value, or the result of the coroutine ComfyUI releases return in its place."""
    return asyncio.run(value) if inspect.iscoroutine(value) else value


WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
VIRTUAL = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}


def api_prompt(workflow: dict, classes: dict) -> dict:
    """The API prompt the editor queues for ``workflow``."""
    nodes = {n["id"]: n for n in workflow["nodes"]}
    links = {link[0]: link for link in workflow["links"]}

    def source(link_id):
        _, src, slot = links[link_id][:3]
        if nodes[src]["type"] == "Reroute":
            return source(nodes[src]["inputs"][0]["link"])
        return nodes[src], slot

    prompt = {}
    for node in workflow["nodes"]:
        if node["type"] in VIRTUAL or node.get("mode", 0) == 2:
            continue
        if node.get("mode", 0) != 0:
            raise ValueError(f"node {node['id']} ({node['type']}) is bypassed: not handled here")
        spec = classes[node["type"]].INPUT_TYPES()
        declared = {**spec.get("required", {}), **spec.get("optional", {})}
        sockets = {s["name"]: s.get("link") for s in node.get("inputs") or []}
        values = list(node.get("widgets_values") or [])
        inputs, position = {}, 0
        for name, entry in declared.items():
            kind, options = entry[0], (entry[1] if len(entry) > 1 and isinstance(entry[1], dict) else {})
            widget = (isinstance(kind, (list, tuple)) or kind in WIDGET_TYPES) and not options.get("forceInput")
            value = None
            if widget:
                if position < len(values):
                    value = values[position]
                else:      # saved before the widget existed: the editor gives the default
                    value = options.get("default", kind[0] if isinstance(kind, (list, tuple)) else
                                        options.get("options", [None])[0])
                position += 1
                if kind == "INT" and (name in ("seed", "noise_seed") or options.get("control_after_generate")):
                    position += 1          # the control_after_generate widget's value
            link = sockets.get(name)
            if link is not None:
                src, slot = source(link)
                inputs[name] = value if src["type"] == "PrimitiveNode" else [str(src["id"]), slot]
            elif widget:
                inputs[name] = value
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def without_ipadapter(prompt: dict) -> dict:
    """``prompt`` with every sampler's model taken from before IPAdapter_plus's nodes (no adapter, no LoRA)."""
    out = json.loads(json.dumps(prompt))
    for node in out.values():
        if node["class_type"] in ("KSampler", "KSamplerAdvanced", "CFGGuider", "DualCFGGuider", "BasicGuider",
                                  "BasicScheduler"):
            model = node["inputs"]["model"]
            while out[model[0]]["class_type"].startswith("IPAdapter"):
                model = out[model[0]]["inputs"]["model"]
            node["inputs"]["model"] = model
    return out


def execute(executor, prompt: dict) -> None:
    import execution
    prompt_id = str(uuid.uuid4())
    valid = resolved(execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0]:
        raise RuntimeError(f"invalid prompt: {valid[1]} {valid[3]}")
    executor.execute(prompt, prompt_id, {}, valid[2])
    if not executor.success:
        error = executor.status_messages[-1][1]
        raise RuntimeError(f"prompt failed at node {error.get('node_id')} ({error.get('node_type')}): "
                           f"{error.get('exception_type')}: {error.get('exception_message')}"
                           + "".join(error.get("traceback", [])[-3:]))
