"""Reading ComfyUI's call arguments defensively.

Wrappers around the diffusion model receive the model's forward arguments positionally
(x, timesteps, context, y, control, transformer_options for UNets; x, timestep, context,
y, guidance, ref_latents, control, transformer_options for FLUX), and later ComfyUI
releases add arguments. These helpers find transformer_options by keyword first, then at
its known position, and leave every other argument as it came.
"""
from __future__ import annotations

from typing import Optional


def find_options(args: tuple, kwargs: dict, position: int) -> Optional[dict]:
    """transformer_options among a wrapper's arguments after x (``position`` among ``args``), or None."""
    options = kwargs.get("transformer_options")
    if isinstance(options, dict):
        return options
    if len(args) > position and isinstance(args[position], dict):
        return args[position]
    return None


def with_options(args: tuple, kwargs: dict, position: int, options: dict) -> tuple[tuple, dict]:
    """(args, kwargs) with transformer_options replaced wherever it was found."""
    if isinstance(kwargs.get("transformer_options"), dict) or len(args) <= position:
        return args, {**kwargs, "transformer_options": options}
    return (*args[:position], options, *args[position + 1:]), kwargs
