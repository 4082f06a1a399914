"""One FLUX graph run unmodified: identity_flux with FLUX's own text encoders (CLIP-L and a random full-size
T5-XXL in float8, as the fp8 files users run) from ComfyUI's DualCLIPLoader, where every other FLUX test
gets the test conditioning (support/tiny_prompts.py). ComfyUI's T5 path is not the pack's code: run on the
primary host only (about 30 s of T5-XXL on the CPU); test_workflows.py runs the graph on both hosts."""
from support.testing import images_of, load_workflow
from support.tiny_prompts import tiny


def test_identity_flux_runs_with_flux_text_encoders(comfy):
    prompt = tiny(load_workflow("api/identity_flux.json"), flux_text_encoders=True)
    assert any(node["class_type"] == "DualCLIPLoader" for node in prompt.values())
    result = comfy.run(prompt, timeout=900)
    savers = [node_id for node_id, node in prompt.items() if node["class_type"] == "SaveImage"]
    assert savers and all(images_of(comfy, result, node_id) for node_id in savers)
