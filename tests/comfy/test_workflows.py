"""Every example API workflow runs in a real ComfyUI on the tiny models (model names substituted)."""
from pathlib import Path

import pytest

from support.testing import LOADED_WORKFLOWS, WORKFLOWS, images_of, load_workflow
from support.tiny_prompts import tiny

# workflows whose run is tested elsewhere, with their own substitutions
RUN_ELSEWHERE = {
    "face_crop.json": "test_face_nodes.py",
    "similarity.json": "test_metrics_nodes.py",
    "flame_controlnet_grid.json": "test_flame_nodes.py",
    "train_omni_id.json": "test_training_nodes.py",
    "start_flux_xlabs.json": "test_flux_ip_adapters.py",
    "start_flux_pulid.json": "test_pulid_flux_nodes.py",
    "start_flux_infiniteyou.json": "test_infiniteyou_nodes.py",
    "start_flux_pulid_rb.json": "test_pulid_flux_nodes.py",
    "start_kontext_rb.json": "test_rb_kontext_workflow.py",
    "start_flux2_klein_rb.json": "test_rb_flux2_workflow.py",      # FLUX.2: ComfyUI 0.33 on, with its tiny files
}


def api_workflows() -> list[str]:
    return sorted(p.name for p in (WORKFLOWS / "api").glob("*.json"))


def test_every_api_workflow_is_run_by_a_test(request):
    """Runs after every other test of the session (tests/comfy/conftest.py): each workflow left to another
    test file was loaded by that file's tests, in this session, whenever that file ran in it."""
    assert set(api_workflows()) >= set(RUN_ELSEWHERE)
    ran = {Path(item.fspath).name for item in request.session.items}
    expected = {f"api/{name}" for name, where in RUN_ELSEWHERE.items() if where in ran}
    assert expected <= LOADED_WORKFLOWS, sorted(expected - LOADED_WORKFLOWS)


@pytest.mark.parametrize("name", [n for n in api_workflows() if n not in RUN_ELSEWHERE])
def test_api_workflow_runs_on_the_tiny_models(comfy, name):
    # FLUX graphs get the test conditioning (support/tiny_prompts.py); test_flux_text_encoders.py runs
    # identity_flux with FLUX's real text encoders
    prompt = tiny(load_workflow(f"api/{name}"))
    result = comfy.run(prompt, timeout=900)
    savers = [node_id for node_id, node in prompt.items() if node["class_type"] == "SaveImage"]
    assert savers
    for node_id in savers:
        assert images_of(comfy, result, node_id), f"{name}: {prompt[node_id]['_meta']['title']} saved nothing"

