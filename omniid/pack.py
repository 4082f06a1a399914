"""Import the pack's core outside ComfyUI, under the package name ``omni_identity``.

The pack's folder can have any name (ComfyUI loads it from custom_nodes/ by path),
and its root ``__init__`` is ComfyUI's entry point; tools, tests and benchmarks
import the core through this alias instead, without running that entry point.
"""
from __future__ import annotations

import importlib.machinery
import importlib.util
import sys

from .comfy_server import PACK_ROOT

PACKAGE = "omni_identity"


def import_pack():
    """The pack as a namespace package: ``omni_identity.encoders`` etc. become importable."""
    if PACKAGE not in sys.modules:
        spec = importlib.machinery.ModuleSpec(PACKAGE, None, is_package=True)
        spec.submodule_search_locations = [str(PACK_ROOT)]
        sys.modules[PACKAGE] = importlib.util.module_from_spec(spec)
    return sys.modules[PACKAGE]
