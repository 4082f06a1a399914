"""InfiniteYou through the nodes in a real ComfyUI: a tiny InfuseNet in the published diffusers FLUX ControlNet
layout (one double block of FLUX.1's width, which ComfyUI's own ControlNet loader reads) and a tiny image
projection in image_proj_model.bin's layout, on the tiny FLUX: strength 1 with a five-keypoint control image
changes the image; a photo without a face is skipped and reported; a batch with no face, or a file of another
kind as InfuseNet or projection, is a clear error. (Exactness against the authors' pipeline, and strength 0
sampling bit-identically: tests/comfy/test_infiniteyou.py, in process.)"""
import pytest

from omniid.cli.client import ExecutionFailed
from support.assets import TEST_ARCFACE_ONNX, cache_dir
from support.graph import Graph
from support.testing import image_change, images_of, install_models, load_workflow
from support.tiny_prompts import tiny

INFUSENET = "omniid_tiny_infusenet.safetensors"
PROJECTION = "omniid_tiny_image_proj_model.bin"
VERSION = 1


def tiny_files():
    """The tiny InfuseNet (diffusers' FluxControlNetModel keys, bf16 as published) and projection, written once."""
    target = cache_dir() / "infiniteyou" / f"v{VERSION}"
    if not (target / "done").is_file():
        import torch
        from diffusers import FluxControlNetModel
        from safetensors.torch import save_file
        target.mkdir(parents=True, exist_ok=True)
        with torch.device("meta"):
            net = FluxControlNetModel(num_layers=1, num_single_layers=0, guidance_embeds=True)
        g = torch.Generator().manual_seed(0)
        state = {}
        for key, value in net.state_dict().items():
            if value.ndim >= 2:
                gain = 40.0 if key.startswith("controlnet_blocks") else 1.0   # a visible effect in one step
                tensor = torch.randn(value.shape, generator=g) * gain * value[0].numel() ** -0.5
            else:
                tensor = (1.0 if "norm" in key else 0.0) + 0.1 * torch.randn(value.shape, generator=g)
            state[key] = tensor.to(torch.bfloat16).contiguous()
        save_file(state, str(target / INFUSENET))
        from omniid.encoders import infiniteyou as IY
        torch.manual_seed(0)
        projection = IY.Resampler(IY.ResamplerConfig(dim=128, depth=1, heads=2, dim_head=64, output_dim=4096))
        torch.save({"image_proj": projection.state_dict()}, target / PROJECTION)
        (target / "done").write_text("ok")
    return target


@pytest.fixture(scope="module")
def installed(comfy_server):
    install_models(comfy_server.base_directory, tiny_files(), (("controlnet", INFUSENET), ("infiniteyou", PROJECTION)))
    return comfy_server


def flux_graph(strengths: dict, photos=("obama.jpg", "cat.png"), projection=PROJECTION, infusenet=INFUSENET):
    """Tiny FLUX sampled plain and with InfiniteYou at each strength; name -> SaveImage node, name -> apply node."""
    g = Graph()
    unet = g.out(g.add("UNETLoader", unet_name="omniid_tiny_flux.safetensors", weight_dtype="default"))
    vae = g.out(g.add("VAELoader", vae_name="omniid_tiny_flux_ae.safetensors"))
    text = g.out(g.add("OmniTestFluxText", text="a portrait photo", tokens=8))
    positive = g.out(g.add("FluxGuidance", conditioning=text, guidance=3.5))
    negative = g.out(g.add("ConditioningZeroOut", conditioning=text))
    latent = g.out(g.add("EmptySD3LatentImage", width=64, height=64, batch_size=1))
    faces = g.out(g.add("OmniIdentityFaceAnalysisLoader", backend="dlib", provider="CPU", det_size=640,
                        arcface_model=TEST_ARCFACE_ONNX))
    loaded = g.out(g.add("OmniIdentityInfiniteYouLoader", infusenet=infusenet, image_proj=projection))
    images = g.photos(*photos)
    pose = g.photos("obama.jpg")
    saves, applies = {}, {}
    for name, strength in {"plain": None, **strengths}.items():
        conditioning = positive
        if strength is not None:
            applies[name] = g.add("OmniIdentityApplyInfiniteYou", positive=positive, infiniteyou=loaded,
                                  face_analysis=faces, images=images, vae=vae, strength=strength, start_at=0.0,
                                  end_at=1.0, control_image=pose, width=64, height=64)
            conditioning = g.out(applies[name])
        sample = g.out(g.add("KSampler", model=unet, positive=conditioning, negative=negative, latent_image=latent,
                             seed=3, steps=1, cfg=1.0, sampler_name="euler", scheduler="normal", denoise=1.0))
        decoded = g.out(g.add("VAEDecode", samples=sample, vae=vae))
        saves[name] = g.add("SaveImage", images=decoded, filename_prefix=f"infiniteyou/{name}")
    return g, saves, applies


def test_strength_one_with_a_keypoint_image_changes_the_image_and_a_faceless_photo_is_skipped(comfy, installed):
    g, saves, applies = flux_graph({"one": 1.0})
    result = comfy.run(g.nodes, timeout=900)
    images = {name: images_of(comfy, result, node)[0] for name, node in saves.items()}
    mean, changed = image_change(images["one"], images["plain"])
    assert mean > 1.0 and changed > 0.5, (mean, changed)
    report = result.outputs[applies["one"]]["text"][0]
    assert "1 of 2 photo(s) used" in report and "no face in photo(s) 2 (skipped)" in report, report
    assert "five keypoints" in report, report


def test_a_batch_with_no_face_or_a_wrong_file_is_a_clear_error(comfy, installed):
    g, _, _ = flux_graph({"one": 1.0}, photos=("cat.png",))
    with pytest.raises(ExecutionFailed) as failure:
        comfy.run(g.nodes, timeout=600)
    assert failure.value.error["node_type"] == "OmniIdentityApplyInfiniteYou"
    assert "found no face in any of the 1 photo(s)" in failure.value.error["exception_message"]
    path = installed.base_directory / "models" / "infiniteyou" / "omniid_not_a_projection.safetensors"
    if not path.exists():
        from safetensors.torch import save_file
        import torch
        save_file({"ip_adapter.1.to_k_ip.weight": torch.zeros(2, 2)}, str(path))
    g, _, _ = flux_graph({"one": 1.0}, projection=path.name)
    with pytest.raises(ExecutionFailed) as failure:
        comfy.run(g.nodes, timeout=600)
    assert failure.value.error["node_type"] == "OmniIdentityInfiniteYouLoader"
    assert "is not InfiniteYou's image projection" in failure.value.error["exception_message"]
    # an SD1.5 ControlNet where InfuseNet belongs
    g, _, _ = flux_graph({"one": 1.0}, infusenet="omniid_tiny_controlnet.safetensors")
    with pytest.raises(ExecutionFailed) as failure:
        comfy.run(g.nodes, timeout=600)
    assert failure.value.error["node_type"] == "OmniIdentityInfiniteYouLoader"
    assert "is not InfuseNet" in failure.value.error["exception_message"], failure.value.error["exception_message"]


def test_the_start_flux_infiniteyou_workflow_runs_with_its_keypoint_image(comfy, installed):
    # (that the identity changes the image, against strength 0: the test above, on the same graph's nodes)
    prompt = tiny(load_workflow("api/start_flux_infiniteyou.json"))
    titles = {node["_meta"]["title"]: node_id for node_id, node in prompt.items()}
    loader, faces, apply = (prompt[titles[t]]["inputs"] for t in ("InfiniteYou", "Face analysis", "Apply InfiniteYou"))
    # no tiny IR-SE50 file: the face analysis' ArcFace embeds instead; the tiny size on the control canvas too
    loader.update(infusenet=INFUSENET, image_proj=PROJECTION, arcface="face analysis")
    faces["arcface_model"] = TEST_ARCFACE_ONNX
    apply.update(width=64, height=64)
    prompt[titles["Pose photo"]]["inputs"]["image"] = "obama.jpg"
    prompt[titles["Sampler"]]["inputs"]["steps"] = 1
    result = comfy.run(prompt, timeout=900)
    image = images_of(comfy, result, titles["Save"])[0]
    assert image.shape == (64, 64, 3)
    control = images_of(comfy, result, titles["Control image"])[0]
    assert control.shape == (64, 64, 3)
    drawn = (control > 0).any(axis=2).mean()
    assert 0.02 < drawn < 0.5, drawn                       # the five keypoints' discs and limbs on black
    assert "1 of 1 photo(s) used" in result.outputs[titles["Apply InfiniteYou"]]["text"][0]
