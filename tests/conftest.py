"""Shared test setup.

The pack is the installed package ``omniid`` (scripts/setup.sh: ``pip install -e .``);
its root ``__init__`` only defines ComfyUI's entry point, so importing the core needs no
ComfyUI. Test support is the package ``support`` (tests/support, on pytest's path).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from omniid.cli.provision import find_comfyui, host_name
from support import assets

CI = bool(os.environ.get("CI"))


def pytest_report_header(config):
    comfyui = find_comfyui()
    import torch
    lines = [f"host: {host_name()} (torch {torch.__version__})"]
    if comfyui is None:
        return lines + ["ComfyUI: NOT FOUND (run ./scripts/setup.sh, or set COMFYUI_PATH) -- the real-ComfyUI tests in "
                        "tests/comfy will " + ("FAIL (CI is set)" if CI else "be SKIPPED")]
    return lines + [f"ComfyUI: {comfyui} -- the real-ComfyUI tests in tests/comfy will run"]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI a skip is a failure: CI must prove the real-ComfyUI and frontend tests, not skip them."""
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which counts as a failure: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """A whole module skipped at collection (importorskip) also fails under CI."""
    outcome = yield
    report = outcome.get_result()
    if CI and report.skipped:
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true, which counts as a failure: {reason}"


def pytest_terminal_summary(terminalreporter):
    passed = [r for r in terminalreporter.stats.get("passed", []) if r.when == "call"]
    comfy = sum(1 for r in passed if "comfy" in r.keywords)
    frontend = sum(1 for r in passed if "frontend" in r.keywords)
    import torch
    terminalreporter.write_line(f"host {host_name()} (torch {torch.__version__}): {comfy} passed tests drove the real "
                                f"ComfyUI, {frontend} of them its frontend in headless Chromium; {len(passed) - comfy} "
                                "were unit tests")


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
