"""One input-checking layer for every node of the pack, read off the node's own schema.

At queue time (``validate_inputs``) the values typed into the prompt are checked: numbers
finite and inside their documented range (ComfyUI skips its own min/max check for inputs a
node's validate_inputs takes, and JSON's NaN passes it anyway), combo values among their
options, ordered pairs (start <= end, min <= max) in order. At run time every input is
checked again, now with the values that came through links: images must be (B, H, W, 3 or 4)
and at least the node's minimum size, masks are normalised to (B, H, W) or refused, no
tensor may hold NaN or Inf, and the pack's own objects (identity embeds, adapters, encoders,
face analysers) must be what the socket promises. Every message names the node, the input,
the value, and what would be valid.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch
from comfy_api.latest import io


class InputError(ValueError):
    """A node input that cannot be used; the message says which and why."""


def _describe(value) -> str:
    if torch.is_tensor(value):
        return f"a tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _range(spec) -> str:
    low, high = getattr(spec, "min", None), getattr(spec, "max", None)
    if low is not None and high is not None:
        return f"a number from {low} to {high}"
    if low is not None:
        return f"a number >= {low}"
    if high is not None:
        return f"a number <= {high}"
    return "a finite number"


def number_problem(spec, value) -> Optional[str]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"is {_describe(value)}, not a number; give {_range(spec)}"
    if isinstance(value, float) and not math.isfinite(value):
        return f"is {value}, not a finite number; give {_range(spec)}"
    low, high = getattr(spec, "min", None), getattr(spec, "max", None)
    if (low is not None and value < low) or (high is not None and value > high):
        return f"is {value}, outside its range; give {_range(spec)}"
    return None


def value_problems(node_cls, values: dict) -> list[str]:
    """Problems of the values known at queue time (links arrive as None and are skipped)."""
    schema = node_cls.define_schema()
    specs = {spec.id: spec for spec in schema.inputs}
    problems = []
    for name, value in values.items():
        spec = specs.get(name)
        if value is None or spec is None:
            continue
        problem = None
        if spec.io_type in ("INT", "FLOAT"):
            problem = number_problem(spec, value)
        elif isinstance(spec, io.Combo.Input) and value not in spec.options:
            options = list(spec.options)
            shown = options if len(options) <= 12 else options[:12] + [f"... {len(options)} in all"]
            problem = f"is {_describe(value)}, not one of its options {shown}"
        elif name in getattr(node_cls, "PARSERS", {}):
            try:
                node_cls.PARSERS[name](value)
            except ValueError as exc:
                problem = f"is {_describe(value)}: {exc}"
        if problem:
            problems.append(f"{name} {problem}")
    for low, high in getattr(node_cls, "ORDERED", ()):
        a, b = values.get(low), values.get(high)
        if isinstance(a, (int, float)) and isinstance(b, (int, float)) and a > b:
            problems.append(f"{low} ({a}) is greater than {high} ({b}); {low} must not exceed {high}")
    return problems


def queue_check(node_cls, **values) -> bool | str:
    """For a node's validate_inputs: True, or one message listing every problem."""
    problems = value_problems(node_cls, values)
    if not problems:
        return True
    return f"{node_cls.define_schema().display_name}: " + "; ".join(problems)


# -- run time ------------------------------------------------------------------------------
def _finite(tensor: torch.Tensor) -> bool:
    return bool(torch.isfinite(tensor).all()) if tensor.is_floating_point() else True


def check_image(name: str, image, min_size: int) -> torch.Tensor:
    if not torch.is_tensor(image) or image.ndim != 4:
        raise InputError(f"{name} is {_describe(image)}; it must be an IMAGE batch (B, H, W, 3 or 4)")
    if image.shape[-1] not in (3, 4):
        raise InputError(f"{name} has {image.shape[-1]} channel(s) (shape {tuple(image.shape)}); it must be an RGB "
                         "or RGBA image: convert a grey image or a mask with 'Convert Mask to Image'")
    if image.shape[0] == 0 or min(image.shape[1:3]) < min_size:
        raise InputError(f"{name} is {image.shape[2]} x {image.shape[1]} px ({image.shape[0]} image(s)); this node "
                         f"needs at least one image of at least {min_size} x {min_size} px")
    if not _finite(image):
        raise InputError(f"{name} holds NaN or infinite pixel values; check the node that made it")
    return image


def check_mask(name: str, mask) -> torch.Tensor:
    """A mask as (B, H, W) in [0, 1]: (H, W), (B, H, W), (B, 1, H, W) and (B, H, W, 1) are accepted."""
    if not torch.is_tensor(mask):
        raise InputError(f"{name} is {_describe(mask)}; it must be a MASK")
    if mask.ndim == 2:
        mask = mask[None]
    elif mask.ndim == 4 and mask.shape[1] == 1:
        mask = mask[:, 0]
    elif mask.ndim == 4 and mask.shape[-1] == 1:
        mask = mask[..., 0]
    if mask.ndim != 3 or min(mask.shape) == 0:
        raise InputError(f"{name} has shape {tuple(mask.shape)}; a mask is (H, W), (B, H, W) or (B, 1, H, W)")
    if not _finite(mask):
        raise InputError(f"{name} holds NaN or infinite values; check the node that made it")
    return mask.float().clamp(0.0, 1.0)


def run_check(node_cls, values: dict, custom: dict[str, Callable]) -> dict:
    """All inputs of one execution checked and normalised; raises InputError naming node and input."""
    schema = node_cls.define_schema()
    title = schema.display_name
    checked = dict(values)
    try:
        problems = value_problems(node_cls, values)
        if problems:
            raise InputError("; ".join(problems))
        min_size = getattr(node_cls, "MIN_IMAGE_SIZE", 16)
        for spec in schema.inputs:
            value = values.get(spec.id)
            if value is None:
                continue
            if spec.io_type == "IMAGE":
                checked[spec.id] = check_image(spec.id, value, min_size)
            elif spec.io_type == "MASK":
                checked[spec.id] = check_mask(spec.id, value)
            elif spec.io_type in custom:
                custom[spec.io_type](spec.id, value)
    except InputError as exc:
        raise InputError(f"{title}: {exc}") from None
    return checked
