"""The start_flux2_klein_rb workflow in a real ComfyUI, on tiny FLUX.2 files that ComfyUI's own loaders detect.

FLUX.2 exists from ComfyUI 0.33 on (0.3.64 has no FLUX.2 model, nodes or text encoder type), so this file is
not in tests/oldest_host.txt. The tiny files: a klein-layout FLUX.2 DiT (1 double + 1 single block, width 128:
one head of FLUX.2's fixed head size 128, no guidance input, a text input 4096 wide for the test conditioning)
in Black Forest Labs' single-file layout, and a FLUX.2-layout VAE (the tiny FLUX.1 autoencoder with 32 latent
channels, 1 x 1 quant convs and the batch-norm statistics of the latent, by which ComfyUI detects the published
FLUX.2 VAE).
"""
import pytest

from support.assets import cache_dir
from support.guided_twin import add_plain_twin, guided_change
from support.testing import images_of, install_models, load_workflow

KLEIN = "omniid_tiny_flux2_klein.safetensors"
VAE = "omniid_tiny_flux2_vae.safetensors"
VERSION = 1


def tiny_files(tiny_models):
    """The tiny FLUX.2 DiT and VAE, written once into the test cache."""
    target = cache_dir() / "flux2_klein" / f"v{VERSION}"
    if not (target / "done").is_file():
        import torch
        from diffusers import Flux2Transformer2DModel
        from safetensors.torch import load_file, save_file
        from support.flux2_layout import bfl_state_dict
        target.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        dit = Flux2Transformer2DModel(in_channels=128, num_layers=1, num_single_layers=1, attention_head_dim=128,
                                      num_attention_heads=1, joint_attention_dim=4096, guidance_embeds=False)
        save_file({k: v.to(torch.float16) for k, v in bfl_state_dict(dit.state_dict()).items()}, str(target / KLEIN))
        vae = load_file(str(tiny_models / "vae" / "omniid_tiny_flux_ae.safetensors"))
        g = torch.Generator().manual_seed(1)
        vae["encoder.conv_out.weight"] = torch.randn(64, 512, 3, 3, generator=g) * (512 * 9) ** -0.5
        vae["encoder.conv_out.bias"] = torch.zeros(64)
        vae["decoder.conv_in.weight"] = torch.randn(512, 32, 3, 3, generator=g) * (32 * 9) ** -0.5
        vae["quant_conv.weight"], vae["quant_conv.bias"] = torch.eye(64)[:, :, None, None], torch.zeros(64)
        vae["post_quant_conv.weight"] = torch.eye(32)[:, :, None, None]
        vae["post_quant_conv.bias"] = torch.zeros(32)
        vae["bn.running_mean"] = torch.randn(128, generator=g) * 0.1
        vae["bn.running_var"] = torch.rand(128, generator=g) + 0.5
        save_file({k: v.to(torch.float16).contiguous() for k, v in vae.items()}, str(target / VAE))
        (target / "done").write_text("ok")
    return target


@pytest.fixture(scope="module")
def installed(comfy_server, tiny_models):
    install_models(comfy_server.base_directory, tiny_files(tiny_models), (("diffusion_models", KLEIN), ("vae", VAE)))
    return comfy_server


def test_the_start_flux2_klein_rb_workflow_guides_flux2(comfy, installed):
    """The workflow's own FLUX.2 nodes (Empty Flux 2 Latent, Flux2Scheduler at 64 px: sigmas 1, 0.955, 0.875,
    0.7, so start_fraction 0.8 guides the last step, as at 1024 px) on the tiny files: the guided latent differs
    from ComfyUI's CFGGuider's on the same inputs and noise, the preview names FLUX.2's default block, and the image is saved. The
    text stand-in replaces klein's Qwen3 encoder (512 tokens, as klein's tokenizer pads to), so the subject is
    named by its token; the reference is the photo at 64 px, matched whole."""
    prompt = load_workflow("api/start_flux2_klein_rb.json")
    titles = {node["_meta"]["title"]: node_id for node_id, node in prompt.items()}
    prompt[titles["FLUX.2 klein model"]]["inputs"]["unet_name"] = KLEIN
    prompt[titles["VAE"]]["inputs"]["vae_name"] = VAE
    prompt[titles["Photo"]]["inputs"]["image"] = "id_1.png"
    text = prompt[titles["Prompt text"]]["inputs"]["value"]
    prompt[titles["Prompt"]] = {"class_type": "OmniTestFluxText", "inputs": {"text": text, "tokens": 512}}
    del prompt[titles["Text encoder"]]
    rb = prompt[titles["RB-Guidance"]]["inputs"]
    del rb["clip"], rb["prompt"]
    # the reference at 64 px, matched whole: the full-size autoencoder takes 16 s per 512 px photo on a CPU
    prompt["small"] = {"class_type": "ImageScale", "inputs": {"image": [titles["Photo"], 0], "upscale_method": "area",
                                                              "width": 64, "height": 64, "crop": "center"}}
    rb.update(subject_token=3, reference=["small", 0], reference_region="whole image")
    prompt[titles["Latent"]]["inputs"].update(width=64, height=64)
    prompt[titles["Schedule"]]["inputs"].update(width=64, height=64)
    add_plain_twin(prompt, titles["RB-Guidance"], titles["Sampler"], "klein_rb")
    result = comfy.run(prompt, timeout=900)
    assert images_of(comfy, result, titles["Save"])
    preview = "\n".join(result.outputs[titles["RB-Guidance"]].get("text", []))
    guided, change = guided_change(installed.base_directory, "klein_rb")
    assert guided.shape[1] == 128                                  # FLUX.2's latent
    assert 1e-5 < change < 0.5, change
    assert "features: FLUX.2 block 1 of 2 (double block 0)" in preview, preview
