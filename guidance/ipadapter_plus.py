"""IPAdapter_plus's conventions, as data and small functions (pure torch; the host applies them).

ComfyUI_IPAdapter_plus (cubiq, maintenance only since April 2025) is where most IP-Adapter
workflows come from. Reproducing its images takes its conventions, which differ from h94's:

- the unconditional input it builds per kind of file (``unconditional_rule``): for files that
  read CLIP tokens (Plus, Plus-Face, Full-Face, FaceID Plus) the tokens of a black 224 x 224
  image (or of ``image_negative``); for files that read the pooled embedding (base) or ArcFace
  alone (FaceID, Portrait) zeros (for base, the pooled embedding of ``image_negative`` if given);
- its block coverage: every cross-attention layer of the input and output blocks, never the middle
  block (it patches ComfyUI's key ``("middle", 1)``, which ComfyUI never calls: the middle block's
  key is ``("middle", 0)``, on SD1.5 and SDXL alike);
- ``embeds_scaling``: "V only" (its default: the identity term times the weight, this pack's
  ``output`` weight mode), "K+V" (keys and values times the weight, ``kv``), "K+V w/ C penalty"
  and "K+mean(V) w/ C penalty" (the weight times inner width / 1280, on keys and values, or on the
  keys and the per-image mean of the values);
- ``weight_type``: a weight per layer, from the layer's transformer index (the position of its
  SpatialTransformer in the forward order input, middle, output: 16 on SD1.5, 11 on SDXL) and its
  block (``layer_weight``); the "precise" types give some layers the image on the unconditional
  branch only;
- ``combine_embeds``: how several photos' encoder outputs merge before the projection
  (``combine``).
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Optional

import torch

WEIGHT_TYPES = ("linear", "ease in", "ease out", "ease in-out", "reverse in-out", "weak input", "weak output",
                "weak middle", "strong middle", "style transfer", "composition", "strong style transfer",
                "style and composition", "style transfer precise", "composition precise")
STYLE_COMPOSITION_TYPES = ("strong style and composition",)   # its Style & Composition node's expand_style
SIMPLE_WEIGHT_TYPES = ("standard", "prompt is more important", "style transfer")   # its IPAdapter (simple) node
EMBEDS_SCALINGS = ("V only", "K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")
COMBINE_MODES = ("concat", "add", "subtract", "average", "norm average")
SCALING_MODES = {"V only": "output", "K+V": "kv", "K+V w/ C penalty": "kv_penalty",
                 "K+mean(V) w/ C penalty": "k_mean_v_penalty"}    # -> LayerInjection.weight_mode
PENALTY_WIDTH = 1280.0


def simple_weight_type(value: str) -> str:
    """IPAdapter_plus's simple node's three choices as the weight types they stand for."""
    if value.startswith("style"):
        return "style transfer"
    return "ease out" if value == "prompt is more important" else "linear"


def transformer_count(sdxl: bool) -> int:
    """The ``layers`` IPAdapter_plus's ease curves divide by: 11 for SDXL files, 16 otherwise."""
    return 11 if sdxl else 16


@dataclass(frozen=True)
class LayerPlan:
    """What one layer gets: its weight (None: the layer is not patched) and whether the image moves to the
    unconditional branch (the conditional branch then reads zero tokens), as the precise types do."""
    weight: Optional[float]
    precise_swap: bool = False
    from_table: bool = False       # the weight came from a table (a composition image applies to transformer 3)


def weight_table(weight_type: str, weight: float, sdxl: bool, weight_composition: float = 1.0,
                 boost: Optional[float] = None) -> Optional[dict[int, float]]:
    """The {transformer index: weight} table of the block-selecting types (None for the others).

    ``boost``: the style boost of "style transfer precise" or the composition boost of "composition
    precise" (IPAdapter_plus's precise nodes; the weight itself when not given)."""
    w, wc = weight, weight_composition
    if weight_type == "style transfer":
        return {6: w} if sdxl else {i: w for i in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)}
    if weight_type == "composition":
        return {3: w} if sdxl else {4: w * 0.25, 5: w}
    if weight_type == "strong style transfer":
        return ({i: w for i in (0, 1, 2, 4, 5, 6, 7, 8, 9, 10)} if sdxl
                else {i: w for i in (0, 1, 2, 3, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)})
    if weight_type == "style and composition":
        if sdxl:
            return {3: wc, 6: w}
        return {**{i: w for i in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)}, 4: wc * 0.25, 5: wc}
    if weight_type == "strong style and composition":
        if sdxl:
            return {**{i: w for i in (0, 1, 2, 4, 5, 6, 7, 8, 9, 10)}, 3: wc}
        return {**{i: w for i in range(16)}, 4: wc, 5: wc}
    if weight_type == "style transfer precise":
        wc = boost if boost is not None else w
        if sdxl:
            return {3: wc, 6: w}
        return {**{i: w for i in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)}, 4: wc * 0.25, 5: wc}
    if weight_type == "composition precise":
        wc, w = w, (boost if boost is not None else w)
        if sdxl:
            return {**{i: w * 0.1 for i in (0, 1, 2, 4, 5, 7, 8, 9, 10)}, 3: wc, 6: w}
        return {**{i: w for i in (0, 1, 2, 3, 9, 10, 11, 12, 13, 14, 15)}, 4: wc * 0.25, 5: wc,
                **{i: w * 0.1 for i in (6, 7, 8)}}
    return None


def parse_layer_weights(text: str) -> dict[int, float]:
    """IPAdapter_plus's ``layer_weights`` (its Mad Scientist node): "index:weight, ..." by transformer index."""
    table = {}
    for part in filter(None, (p.strip() for p in (text or "").replace("\n", ",").split(","))):
        index, sep, value = part.partition(":")
        try:
            if not sep:
                raise ValueError
            table[int(index)] = float(value)
        except ValueError:
            raise ValueError(f"layer_weights entry {part!r} is not 'index:weight' (e.g. '3:0.8, 6:1')") from None
    return table


def layer_plan(weight_type: str, weight: float, group: str, transformer_index: int, sdxl: bool,
               weight_composition: float = 1.0, boost: Optional[float] = None,
               layer_weights: Optional[dict[int, float]] = None) -> LayerPlan:
    """One layer's weight under ``weight_type``, from its block group and transformer index. ``layer_weights``
    (a table of multipliers of the weight by transformer index) replaces the type's weights; the precise
    types keep their unconditional-branch layers, the others act as linear."""
    if weight_type not in WEIGHT_TYPES + STYLE_COMPOSITION_TYPES:
        raise ValueError(f"weight_type must be one of {WEIGHT_TYPES + STYLE_COMPOSITION_TYPES}, not {weight_type!r}")
    layers, t = transformer_count(sdxl), transformer_index
    if layer_weights:
        if t not in layer_weights:
            return LayerPlan(None)
        composition_layers = (3,) if sdxl else (4, 5)
        swap = ((weight_type == "style transfer precise" and t in composition_layers)
                or (weight_type == "composition precise" and t not in composition_layers))
        return LayerPlan(layer_weights[t] * weight, swap, True)
    if weight_type == "ease in":
        return LayerPlan(weight * (0.05 + 0.95 * (1 - t / layers)))
    if weight_type == "ease out":
        return LayerPlan(weight * (0.05 + 0.95 * (t / layers)))
    if weight_type == "ease in-out":
        return LayerPlan(weight * (0.05 + 0.95 * (1 - abs(t - layers / 2) / (layers / 2))))
    if weight_type == "reverse in-out":
        return LayerPlan(weight * (0.05 + 0.95 * (abs(t - layers / 2) / (layers / 2))))
    if weight_type in ("weak input", "weak middle", "weak output"):
        return LayerPlan(weight * 0.2 if group == weight_type.split()[1] else weight)
    if weight_type == "strong middle":
        return LayerPlan(weight * 0.2 if group in ("input", "output") else weight)
    table = weight_table(weight_type, weight, sdxl, weight_composition, boost)
    if table is None:
        return LayerPlan(weight)
    if t not in table:
        return LayerPlan(None)
    composition_layers = (3,) if sdxl else (4, 5)
    swap = ((weight_type == "style transfer precise" and t in composition_layers)
            or (weight_type == "composition precise" and t not in composition_layers))
    return LayerPlan(table[t], swap, True)


def combine(x: torch.Tensor, mode: str) -> torch.Tensor:
    """Several photos' encoder outputs (N, ...) merged as IPAdapter_plus's ``combine_embeds`` does;
    "concat" (and a single photo) keeps them all."""
    if mode not in COMBINE_MODES:
        raise ValueError(f"combine_embeds must be one of {COMBINE_MODES}, not {mode!r}")
    if mode == "concat" or x.shape[0] < 2:
        return x
    if mode == "add":
        return x.sum(0, keepdim=True)
    if mode == "subtract":
        return (x[0] - x[1:].mean(0))[None]
    if mode == "average":
        return x.mean(0, keepdim=True)
    return (x / x.norm(dim=0, keepdim=True)).mean(0, keepdim=True)


def repeat_to(x: torch.Tensor, count: int) -> torch.Tensor:
    """``x`` cut or padded (repeating its last row) to ``count`` rows (IPAdapter_plus's tensor_to_size)."""
    if x.shape[0] < count:
        return torch.cat([x, x[-1:].expand(count - x.shape[0], *x.shape[1:])])
    return x[:count]


def scaled_kv(keys: torch.Tensor, values: torch.Tensor, mode: str, weight: float,
              tokens_per_image: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Identity keys and values (L, inner) as a "K+V" or "w/ C penalty" scaling gives them to the attention.

    The penalties scale the weight by inner / 1280; "K+mean(V)" scales the keys and only the mean of the
    values over each photo's ``tokens_per_image`` tokens (all tokens when 0)."""
    if mode == "kv":
        return keys * weight, values * weight
    if mode not in ("kv_penalty", "k_mean_v_penalty"):
        raise ValueError(f"no key/value scaling for weight mode {mode!r}")
    w = weight * keys.shape[-1] / PENALTY_WIDTH
    if mode == "kv_penalty":
        return keys * w, values * w
    per = tokens_per_image if tokens_per_image and values.shape[0] % tokens_per_image == 0 else values.shape[0]
    grouped = values.reshape(-1, per, values.shape[-1])
    mean = grouped.mean(1, keepdim=True)
    return keys * w, ((grouped - mean) + mean * w).reshape(values.shape)


def _plain(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", os.path.splitext(os.path.basename(name))[0].lower())


def paired_lora_name(adapter_name: str, loras: list[str]) -> Optional[str]:
    """The LoRA h94 published with a FaceID file, by IPAdapter_plus's naming: the adapter's name followed
    by ``lora`` (ip-adapter-faceid_sd15.bin -> ip-adapter-faceid_sd15_lora.safetensors; separators and
    case ignored), among ``loras`` (names in ComfyUI's loras folder, then the ipadapter folder)."""
    wanted = _plain(adapter_name) + "lora"
    return next((name for name in loras if name.lower().endswith(".safetensors") and _plain(name) == wanted), None)
