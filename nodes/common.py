"""Helpers shared by the node classes: custom types, progress and cancellation, logging."""
from __future__ import annotations

import logging
from typing import Callable

import comfy.model_management
import comfy.utils
from comfy_api.latest import io

CATEGORY = "OmniIdentity"
LOG = logging.getLogger("OmniIdentity")

# custom socket types of the pack (core types are used wherever one exists)
Faces = io.Custom("FACES")


def progress(total: int) -> Callable[[int], None]:
    """A per-step callback: advances the node's progress bar and honours Cancel."""
    bar = comfy.utils.ProgressBar(total)

    def step(_index: int = 0) -> None:
        comfy.model_management.throw_exception_if_processing_interrupted()
        bar.update(1)

    return step
