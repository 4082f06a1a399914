"""The start_kontext_rb workflow in a real ComfyUI (both hosts: Kontext's nodes are in ComfyUI 0.3.64 too).

Kontext dev is FLUX.1 dev's layout, so the tiny FLUX file stands in for it; the photo goes in through the
workflow's own Kontext path (encoded, Set Reference Latent) and RB-Guidance works on top of that conditioning.
"""
from support.guided_twin import add_plain_twin, guided_change
from support.testing import images_of, load_workflow
from support.tiny_prompts import tiny


def test_the_start_kontext_rb_workflow_guides_kontext(comfy, comfy_server):
    """The guided latent differs from ComfyUI's CFGGuider's on the same inputs and noise, the preview names
    FLUX's default feature block, and the image is saved. The photo is scaled to 64 px instead of a Kontext size
    (FLUX's full-size autoencoder on a 1024 px photo takes minutes on a CPU) and matched whole; the text stand-in
    has no tokenizer, so the subject is named by its token; three steps, the last guided (sigma 0.61 < 0.7)."""
    prompt = tiny(load_workflow("api/start_kontext_rb.json"))
    titles = {node["_meta"]["title"]: node_id for node_id, node in prompt.items()}
    scale = prompt[titles["Photo at Kontext's size"]]
    assert scale["class_type"] == "FluxKontextImageScale"
    scale.update(class_type="ImageScale", inputs={**scale["inputs"], "upscale_method": "area", "width": 64,
                                                  "height": 64, "crop": "center"})
    assert prompt[titles["Reference latent"]]["inputs"]["latent"] == [titles["Photo latent"], 0]
    rb = prompt[titles["RB-Guidance"]]["inputs"]
    del rb["clip"], rb["prompt"], prompt[titles["Text encoders"]]
    rb.update(feature_block=0, subject_token=3, start_fraction=0.7, reference=[titles["Photo at Kontext's size"], 0],
              reference_region="whole image")
    add_plain_twin(prompt, titles["RB-Guidance"], titles["Sampler"], "kontext_rb")
    result = comfy.run(prompt, timeout=900)
    assert images_of(comfy, result, titles["Save"])
    preview = "\n".join(result.outputs[titles["RB-Guidance"]].get("text", []))
    _, change = guided_change(comfy_server.base_directory, "kontext_rb")
    assert 1e-5 < change < 0.5, change
    assert "features: FLUX block 1 of 2 (double block 0)" in preview, preview
