"""PuLID-FLUX through the nodes in a real ComfyUI: a tiny file in the published layout (written by the pack's
own modules for the tiny FLUX: 1 double + 1 single block of width 3072, so 2 modules) with a tiny
EVA02-CLIP, sampled with weight 0 (bit-identical to plain sampling) and weight 1 (a visible change);
two photos of which one has no face (skipped and reported, no crash); wrong files refused. (Several
photos of one person: tests/comfy/test_pulid_flux.py, in process.)"""
import numpy as np
import pytest

from omniid.cli.client import ExecutionFailed
from support.assets import TEST_ARCFACE_ONNX, cache_dir
from support.graph import Graph
from support.testing import image_change, images_of, install_models, load_workflow
from support.tiny_prompts import tiny

PULID = "omniid_tiny_pulid_flux.safetensors"
EVA = "omniid_tiny_eva02_clip.safetensors"
VERSION = 1


def tiny_files():
    """The tiny PuLID-FLUX and EVA02-CLIP files, written once into the test cache."""
    target = cache_dir() / "pulid_flux" / f"v{VERSION}"
    if not (target / "done").is_file():
        import torch
        from omniid.encoders import eva_clip
        from omniid.encoders import pulid_flux as P
        target.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        eva_config = eva_clip.EvaConfig(image_size=112, width=64, depth=21, heads=1, mlp_hidden=170, embed_dim=24)
        eva_clip.save_file(eva_clip.EvaVision(eva_clip.build(eva_config), eva_config), str(target / EVA))
        config = P.PuLIDFluxConfig(dim=128, depth=5, heads=2, dim_head=64, num_queries=8, output_dim=48,
                                   vit_width=64, id_width=512 + 24, num_ca=2, ca_dim=3072, ca_heads=1)
        model = P.PuLIDFlux(config)
        with torch.no_grad():
            for module in model.pulid_ca:
                module.to_out.weight.mul_(30.0)          # a visible effect from random weights in two steps
        P.save_file(model, str(target / PULID))
        (target / "done").write_text("ok")
    return target


@pytest.fixture(scope="module")
def installed(comfy_server):
    install_models(comfy_server.base_directory, tiny_files(), (("pulid", PULID), ("clip_vision", EVA)))
    return comfy_server


def flux_graph(weights: dict, photos=("obama.jpg", "cat.png"), eva=EVA) -> tuple[Graph, dict, dict]:
    """Tiny FLUX sampled plain and with PuLID at each weight; name -> SaveImage node, name -> apply node."""
    g = Graph()
    unet = g.out(g.add("UNETLoader", unet_name="omniid_tiny_flux.safetensors", weight_dtype="default"))
    vae = g.out(g.add("VAELoader", vae_name="omniid_tiny_flux_ae.safetensors"))
    text = g.out(g.add("OmniTestFluxText", text="a portrait photo", tokens=8))
    positive = g.out(g.add("FluxGuidance", conditioning=text, guidance=3.5))
    negative = g.out(g.add("ConditioningZeroOut", conditioning=text))
    latent = g.out(g.add("EmptySD3LatentImage", width=64, height=64, batch_size=1))
    faces = g.out(g.add("OmniIdentityFaceAnalysisLoader", backend="dlib", provider="CPU", det_size=640,
                        arcface_model=TEST_ARCFACE_ONNX))
    pulid = g.out(g.add("OmniIdentityPuLIDFluxLoader", pulid_file=PULID, eva_clip=eva))
    images = g.photos(*photos)
    saves, applies = {}, {}
    for name, weight in {"plain": None, **weights}.items():
        model = unet
        if weight is not None:
            applies[name] = g.add("OmniIdentityApplyPuLIDFlux", model=unet, pulid_flux=pulid, face_analysis=faces,
                                  images=images, weight=weight, start_at=0.0, end_at=1.0)
            model = g.out(applies[name])
        sample = g.out(g.add("KSampler", model=model, positive=positive, negative=negative, latent_image=latent,
                             seed=3, steps=1, cfg=1.0, sampler_name="euler", scheduler="normal", denoise=1.0))
        decoded = g.out(g.add("VAEDecode", samples=sample, vae=vae))
        saves[name] = g.add("SaveImage", images=decoded, filename_prefix=f"pulid_flux/{name}")
    return g, saves, applies


def test_weight_zero_is_plain_sampling_and_weight_one_changes_the_image(comfy, installed):
    g, saves, applies = flux_graph({"zero": 0.0, "one": 1.0})
    result = comfy.run(g.nodes, timeout=900)
    images = {name: images_of(comfy, result, node)[0] for name, node in saves.items()}
    assert np.array_equal(images["zero"], images["plain"])
    mean, changed = image_change(images["one"], images["plain"])
    assert mean > 1.0 and changed > 0.5, (mean, changed)
    # the photo without a face (the cat) is skipped and said so
    report = result.outputs[applies["one"]]["text"][0]
    assert "1 of 2 photo(s) used" in report and "no face in photo(s) 2 (skipped)" in report, report


def test_a_batch_with_no_face_at_all_is_an_error_that_says_so(comfy, installed):
    g, _, _ = flux_graph({"one": 1.0}, photos=("cat.png",))
    with pytest.raises(ExecutionFailed) as failure:
        comfy.run(g.nodes, timeout=600)
    assert failure.value.error["node_type"] == "OmniIdentityApplyPuLIDFlux"
    assert "found no face in any of the 1 photo(s)" in failure.value.error["exception_message"]


def test_a_wrong_file_is_refused_naming_what_it_is(comfy, installed):
    g, _, _ = flux_graph({"one": 1.0}, eva="omniid_random_clip_vit_h.safetensors")
    with pytest.raises(ExecutionFailed) as failure:
        comfy.run(g.nodes, timeout=600)
    assert failure.value.error["node_type"] == "OmniIdentityPuLIDFluxLoader"
    assert "not an EVA02-CLIP vision checkpoint" in failure.value.error["exception_message"]


def test_the_start_flux_pulid_workflow_runs_from_1_and_3_photos_averaged_and_concatenated(comfy, installed):
    prompt = tiny(load_workflow("api/start_flux_pulid.json"))
    for node in prompt.values():
        if node["class_type"] == "OmniIdentityPuLIDFluxLoader":
            node["inputs"].update(pulid_file=PULID, eva_clip=EVA)
    result = comfy.run(prompt, timeout=900)
    titles = {node["_meta"]["title"]: node_id for node_id, node in prompt.items()}
    images = {name: images_of(comfy, result, titles[f"Save ({name})"])[0]
              for name in ("1 photo", "3, average", "3, concat")}
    # three identities from the same seed: each pair differs across the image
    for a, b in (("1 photo", "3, average"), ("1 photo", "3, concat"), ("3, average", "3, concat")):
        mean, changed = image_change(images[a], images[b])
        assert mean > 0.5 and changed > 0.3, (a, b, mean, changed)
    assert "3 of 3 photo(s) used" in result.outputs[titles["PuLID from 3 photos (concat)"]]["text"][0]


def test_the_start_flux_pulid_rb_workflow_guides_the_pulid_model(comfy, installed):
    """PuLID-FLUX, then RB-Guidance on the patched model (its tracked pass differentiates through PuLID's modules,
    loaded in inference mode): the guided latent differs from the same graph's at strength 0 (which samples as
    CFGGuider does), and the preview names FLUX's default feature block."""
    from safetensors.torch import load_file
    prompt = tiny(load_workflow("api/start_flux_pulid_rb.json"))
    titles = {node["_meta"]["title"]: node_id for node_id, node in prompt.items()}
    prompt[titles["PuLID-FLUX"]]["inputs"].update(pulid_file=PULID, eva_clip=EVA)
    rb = prompt[titles["RB-Guidance"]]["inputs"]
    # the tiny text stand-in has no tokenizer to find the subject in: name its token; T5-XXL is not loaded
    del rb["clip"], rb["prompt"]
    rb.update(feature_block=0, subject_token=3, start_fraction=0.7)
    del prompt[titles["Text encoders"]]
    prompt[titles["Schedule"]]["inputs"]["steps"] = 3           # the last step guided (sigma 0.61)
    latents = {}
    for name, strength in (("guided", 8.5), ("unguided", 0.0)):
        rb["strength"] = strength
        prompt["keep"] = {"class_type": "SaveLatent", "inputs": {"samples": [titles["Sampler"], 0],
                                                                 "filename_prefix": f"pulid_rb/{name}"}}
        result = comfy.run(prompt, timeout=900)
        folder = installed.base_directory / "output" / "pulid_rb"
        latents[name] = load_file(str(sorted(folder.glob(f"{name}_0*.latent"))[-1]))["latent_tensor"]
        if name == "guided":
            text = "\n".join(result.outputs[titles["RB-Guidance"]].get("text", []))
            assert images_of(comfy, result, titles["Save"])
    change = float((latents["guided"] - latents["unguided"]).abs().max() / latents["unguided"].abs().max())
    assert 1e-5 < change < 0.5, change
    assert "features: FLUX block 1 of 2 (double block 0)" in text, text
