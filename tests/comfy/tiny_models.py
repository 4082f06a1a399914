"""Write tiny random checkpoints that a real ComfyUI detects and samples with.

Run with the Python that runs ComfyUI (it builds the modules with ComfyUI's own
classes, so the key layouts are exactly the ones ComfyUI's detection reads):

    python tests/comfy/tiny_models.py --comfyui /opt/ComfyUI --out DIR

Writes, under DIR:
  checkpoints/omniid_tiny_sd15.safetensors  SD1.5 layout: UNet of width 320 and context
      768 but one level deep (one res block, one transformer block), full-size CLIP-L
      text encoder (its config is fixed), TAESD-layout VAE
  vae/omniid_tiny_taesd.safetensors          the same VAE alone
  controlnet/omniid_tiny_controlnet.safetensors  a ControlNet matching the UNet
  clip_vision/omniid_random_clip_vit_h.safetensors  a CLIP-H vision tower at full size
      (ComfyUI picks the vision config by layer count, so only the real layout loads)
  checkpoints/omniid_tiny_sdxl.safetensors  SDXL family: a UNet of the KOALA-700M layout
      (transformer depths 0/2/5, context 2048, ADM 2816; ComfyUI loads it as an SDXL model)
      at width 320 on every level, SDXL's CLIP-L + CLIP-G text encoders at full size (their
      configs are fixed), TAESD-layout VAE
  diffusion_models/omniid_tiny_flux.safetensors  FLUX dev layout with one double and one
      single block, written key by key (support.flux_layout; ComfyUI 0.3.64's detection fixes
      FLUX's width at 3072, so only the depth is small)
  text_encoders/omniid_random_t5xxl_fp8.safetensors  T5-XXL at full size (its config is
      fixed) in float8, as the fp8 files users run (each matrix's rows drawn for one eighth and repeated)
  text_encoders/omniid_tiny_clip_l.safetensors  the CLIP-L text encoder alone
  vae/omniid_tiny_flux_ae.safetensors  a 16-channel autoencoder of FLUX's layout
All weights are random (seeded): images are noise-like, but every code path is real.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

VERSION = 6  # bump when the layouts below change, so cached files are rebuilt
SEED = 20251122

UNET_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
    channel_mult=[1], num_heads=8, use_spatial_transformer=True, transformer_depth=[1],
    transformer_depth_output=[1, 1], transformer_depth_middle=1, context_dim=768,
    use_linear_in_transformer=False, legacy=False,
)

SDXL_UNET_CONFIG = dict(
    image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1, 1],
    channel_mult=[1, 1, 1], num_head_channels=64, use_spatial_transformer=True, transformer_depth=[0, 2, 5],
    transformer_depth_output=[0, 0, 2, 2, 5, 5], transformer_depth_middle=1, context_dim=2048,
    use_linear_in_transformer=True, adm_in_channels=2816, num_classes="sequential", legacy=False,
)


def initialise(module, generator) -> None:
    """Deterministic random weights (ComfyUI's ops leave parameters uninitialised)."""
    import torch
    norm_types = (torch.nn.GroupNorm, torch.nn.LayerNorm)
    for sub in module.modules():
        for name, param in sub.named_parameters(recurse=False):
            with torch.no_grad():
                if isinstance(sub, norm_types):
                    param.fill_(1.0 if name == "weight" else 0.0)
                elif param.ndim >= 2:
                    fan_in = param[0].numel()
                    std = 0.02 if isinstance(sub, torch.nn.Embedding) else fan_in ** -0.5
                    param.copy_(torch.randn(param.shape, generator=generator) * std)
                else:
                    param.zero_()


def build(out_dir: str) -> dict:
    import torch
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import comfy.ops
    from comfy.cldm.cldm import ControlNet
    from comfy.clip_model import CLIPTextModel, CLIPVisionModelProjection
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
    from comfy.taesd.taesd import TAESD
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(SEED)
    ops = comfy.ops.disable_weight_init

    unet = UNetModel(**UNET_CONFIG, operations=ops)
    initialise(unet, generator)
    clip_config = json.load(open(os.path.join(os.path.dirname(comfy.ops.__file__), "sd1_clip_config.json")))
    clip = CLIPTextModel(clip_config, torch.float32, "cpu", ops)
    initialise(clip, generator)
    vae = TAESD(latent_channels=4)
    initialise(vae, generator)
    with torch.no_grad():
        vae.vae_scale.fill_(1.0)
        vae.vae_shift.fill_(0.0)
        # keep decoded pixels around mid-grey so image differences are not clipped away
        last_conv = [m for m in vae.taesd_decoder.modules() if isinstance(m, torch.nn.Conv2d)][-1]
        last_conv.weight.mul_(0.05)
        last_conv.bias.fill_(0.5)
    control = ControlNet(hint_channels=3, operations=ops, **UNET_CONFIG)
    initialise(control, generator)
    vision_config = json.load(open(os.path.join(os.path.dirname(comfy.ops.__file__), "clip_vision_config_h.json")))
    vision = CLIPVisionModelProjection(vision_config, torch.float32, "cpu", ops)
    initialise(vision, generator)

    def half(state, prefix=""):
        return {prefix + k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}

    import comfy.sdxl_clip
    import comfy.supported_models
    sdxl_unet = UNetModel(**SDXL_UNET_CONFIG, operations=ops)
    initialise(sdxl_unet, generator)
    sdxl_clip = comfy.sdxl_clip.SDXLClipModel(device="cpu", dtype=torch.float16)
    initialise(sdxl_clip, generator)
    sdxl_clip_state = {k: v for k, v in sdxl_clip.state_dict().items() if not k.endswith("position_ids")}
    sdxl_clip_state = comfy.supported_models.SDXL(dict(SDXL_UNET_CONFIG)).process_clip_state_dict_for_saving(
        sdxl_clip_state)
    sdxl_checkpoint = {**half(sdxl_unet.state_dict(), "model.diffusion_model."), **half(sdxl_clip_state),
                       **half(vae.state_dict(), "first_stage_model.")}
    del sdxl_clip

    clip_state = {k: v for k, v in clip.state_dict().items() if not k.endswith("position_ids")}
    checkpoint = {**half(unet.state_dict(), "model.diffusion_model."),
                  **half(clip_state, "cond_stage_model.transformer."),
                  **half(vae.state_dict(), "first_stage_model.")}
    files = {
        "checkpoints/omniid_tiny_sd15.safetensors": checkpoint,
        "vae/omniid_tiny_taesd.safetensors": half(vae.state_dict()),
        "controlnet/omniid_tiny_controlnet.safetensors": half(control.state_dict()),
        "clip_vision/omniid_random_clip_vit_h.safetensors": half(vision.state_dict()),
        "checkpoints/omniid_tiny_sdxl.safetensors": sdxl_checkpoint,
        "text_encoders/omniid_tiny_clip_l.safetensors": half(clip_state),
        **flux_files(generator, ops),
    }
    for rel, state in files.items():
        path = os.path.join(out_dir, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        save_file(state, path + ".tmp", metadata={"omniid_tiny_models": str(VERSION)})
        os.replace(path + ".tmp", path)
    return {rel: sum(v.numel() for v in state.values()) for rel, state in files.items()}


def repeated_rows(shape, std: float, generator, repeats: int = 8):
    """float8 N(0, std^2) weights whose first 1/``repeats`` of the rows is drawn and repeated: 4.8 billion draws
    took most of a cold build (about 90 s of two CPU cores); a random test encoder needs no more."""
    import torch
    block = (torch.randn((-(-shape[0] // repeats), *shape[1:]), generator=generator) * std).to(torch.float8_e4m3fn)
    tiled = block.view(torch.uint8).repeat(repeats, *([1] * (len(shape) - 1)))[:shape[0]]
    return tiled.contiguous().view(torch.float8_e4m3fn)


def flux_files(generator, ops) -> dict:
    """The FLUX pieces: a shallow DiT, its autoencoder and a random full-size T5-XXL in float8."""
    import torch
    import comfy.text_encoders.t5
    from comfy.ldm.models.autoencoder import AutoencodingEngine
    from support.flux_layout import flux_state_dict

    flux = flux_state_dict(hidden=3072, heads=24, depth=1, single=1, seed=SEED)
    ddconfig = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
    ae = AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": ddconfig},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": ddconfig})
    initialise(ae, generator)
    config = json.load(open(os.path.join(os.path.dirname(comfy.text_encoders.t5.__file__), "t5_config_xxl.json")))
    with torch.device("meta"):
        shapes = comfy.text_encoders.t5.T5(config, torch.float32, "meta", ops).state_dict()
    t5 = {}
    for key, meta in shapes.items():
        if meta.ndim >= 2:
            std = 0.02 if key.startswith("shared") or "relative_attention_bias" in key else meta.shape[-1] ** -0.5
            t5[key] = repeated_rows(meta.shape, std, generator)
        else:
            t5[key] = torch.ones(meta.shape).to(torch.float8_e4m3fn)
    half = lambda state: {k: v.detach().to(torch.float16).contiguous() for k, v in state.items()}
    return {"diffusion_models/omniid_tiny_flux.safetensors": flux,
            "vae/omniid_tiny_flux_ae.safetensors": half(ae.state_dict()),
            "text_encoders/omniid_random_t5xxl_fp8.safetensors": t5}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    sys.path.insert(0, os.path.abspath(args.comfyui))
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))   # tests/: support
    sys.argv = sys.argv[:1]
    counts = build(args.out)
    print(json.dumps({"version": VERSION, "parameters": counts}))


if __name__ == "__main__":
    main()
