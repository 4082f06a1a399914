"""Shared test setup.

The pack is imported as the package ``omni_identity`` (its folder name varies:
ComfyUI loads it under whatever name it has in custom_nodes). Only the core and the
tooling are imported here; the root ``__init__`` (ComfyUI's entry point) is not run,
so unit tests need no ComfyUI.
"""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent


def _import_tooling() -> None:
    """``omniid`` (the tooling next to the pack) by path, then the pack as ``omni_identity``."""
    if "omniid" not in sys.modules:
        spec = importlib.util.spec_from_file_location("omniid", ROOT / "omniid" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "omniid")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["omniid"] = module
        spec.loader.exec_module(module)
    from omniid.pack import import_pack
    import_pack()


_import_tooling()

from omniid import assets  # noqa: E402
from omniid.comfy_server import find_comfyui  # noqa: E402


def pytest_report_header(config):
    comfyui = find_comfyui()
    if comfyui is None:
        return ("ComfyUI: NOT FOUND (set COMFYUI_PATH or use /opt/ComfyUI) -- "
                "the real-ComfyUI tests in tests/comfy will be SKIPPED")
    return f"ComfyUI: {comfyui} -- the real-ComfyUI tests in tests/comfy will run"


@pytest.fixture(scope="session")
def photos() -> Path:
    """Folder of real face photos (face_recognition 1.3.0 test images)."""
    return assets.face_photos()


@pytest.fixture(scope="session")
def no_face_photo() -> Path:
    return assets.no_face_photo()


@pytest.fixture(scope="session")
def image_batch():
    """Photos as a ComfyUI IMAGE batch (1, H, W, 3) float in [0, 1]."""
    import torch

    def make(*paths: Path) -> torch.Tensor:
        arrays = [assets.load_photo(p) for p in paths]
        if len({a.shape for a in arrays}) != 1:
            raise ValueError("photos of one batch must share a size")
        return torch.from_numpy(np.stack(arrays).astype(np.float32) / 255.0)

    return make
