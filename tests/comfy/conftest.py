"""Fixtures that drive a real ComfyUI (from COMFYUI_PATH, else /opt/ComfyUI) on the CPU.

The server runs in a temporary --base-directory with this pack linked into its
custom_nodes, the tiny checkpoints linked into its model folders and the test
photos in its input folder. Without a ComfyUI checkout every test here is skipped,
with the reason in the report.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from support import assets
from omniid.cli.client import ComfyClient
from omniid.cli.server import comfyui_python, find_comfyui
from support.testing import populate_base, start_server


RUN_LAST = "test_every_api_workflow_is_run_by_a_test"       # test_workflows.py: checks what the others ran


def pytest_collection_modifyitems(items):
    here = Path(__file__).parent
    for item in items:
        if here in Path(item.fspath).parents:
            item.add_marker(pytest.mark.comfy)
    items.sort(key=lambda item: item.name == RUN_LAST)      # stable: everything else keeps its order


@pytest.fixture(scope="session")
def comfyui() -> Path:
    path = find_comfyui()
    if path is None:
        pytest.skip("no ComfyUI checkout found: run ./scripts/setup.sh (it provisions the pinned ComfyUI) or set "
                    "COMFYUI_PATH to run the real-ComfyUI integration tests")
    return path


@pytest.fixture(scope="session")
def tiny_models(comfyui) -> Path:
    return assets.tiny_models(comfyui, comfyui_python(comfyui))


@pytest.fixture(scope="session")
def input_photos(photos, no_face_photo) -> dict[str, Path]:
    """Name in ComfyUI's input folder -> photo."""
    named = {name: photos / name for name in ("obama.jpg", "obama2.jpg", "biden.jpg", "32bit.png")}
    named["cat.png"] = no_face_photo
    named["two_people.png"] = assets.two_people_photo()
    named.update(assets.identity_photo_set())
    return named


FIXTURE_NODES = Path(__file__).with_name("fixture_nodes")


@pytest.fixture(scope="session")
def comfy_server(comfyui, tiny_models, input_photos, tmp_path_factory):
    base = populate_base(tmp_path_factory.mktemp("comfy-base"), tiny_models, input_photos)
    (base / "custom_nodes").mkdir(exist_ok=True)
    for pack in FIXTURE_NODES.iterdir():              # test-only nodes (bad values for the input checks)
        (base / "custom_nodes" / pack.name).symlink_to(pack, target_is_directory=True)
    server = start_server(comfyui, base)
    yield server
    server.cleanup()


@pytest.fixture
def comfy(comfy_server) -> ComfyClient:
    assert comfy_server.alive(), f"ComfyUI died; log tail:\n{comfy_server.log_tail()}"
    return ComfyClient(comfy_server.url)
