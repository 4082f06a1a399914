"""Tiny diffusers models with the real layouts (few layers, small widths, random weights).

    PYTHONPATH=tests python -m support.tiny_diffusers {sd15,sdxl,flux,comfy_sd15,flux2,chroma,qwen_image,z_image} FOLDER [--seed N]
    PYTHONPATH=tests python -m support.tiny_diffusers data FOLDER

The first writes a model folder ``omniid train --stage flow --model FOLDER`` reads: ``unet/`` (SD1.5,
SDXL) or ``transformer/`` (FLUX.1, FLUX.2, Chroma, Qwen-Image, Z-Image) and ``vae/``, saved with diffusers' ``save_pretrained``, and
``text_embeds.safetensors``, a fixed random prompt conditioning of the model's widths. The
second writes what the rest of a smoke run needs: ``identities/`` (six synthetic identities of
eight photos) and ``tiny_vit.json`` (a small random open_clip ViT for ``--clip open_clip:...``),
with ``encoder.json``, a matching small encoder config for ``--encoder-config``.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

KINDS = ("sd15", "sdxl", "flux", "comfy_sd15", "flux2", "chroma", "qwen_image", "z_image")
TINY_OPEN_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}
TINY_ENCODER = {"clip_dim": 64, "tokens_per_image": 50, "dim": 64, "num_queries": 16, "num_heads": 4,
                "cross_depth": 1, "self_depth": 1, "mlp_ratio": 2.0}
IMAGE_SIZE = 32                   # the tiny VAE downsamples by 2: 16 x 16 latents


def vae(latent_channels: int = 4):
    from diffusers import AutoencoderKL
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                         latent_channels=latent_channels, norm_num_groups=8, sample_size=IMAGE_SIZE,
                         scaling_factor=0.5, shift_factor=0.1 if latent_channels == 16 else None)


def sd15_unet():
    """SD1.5's layout: cross-attention in the first down levels, last up levels and the middle."""
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), block_out_channels=(32, 64),
                                cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)


def sdxl_unet():
    """SDXL's layout: no attention in the first level, several transformer layers deeper, text_time
    conditioning (pooled text + six size numbers), linear projections."""
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), block_out_channels=(32, 64),
                                transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4),
                                cross_attention_dim=48, use_linear_projection=True, addition_embed_type="text_time",
                                addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * 6 + 24,
                                norm_num_groups=8)


def flux_transformer(latent_channels: int = 16):
    from diffusers import FluxTransformer2DModel
    return FluxTransformer2DModel(patch_size=1, in_channels=latent_channels * 4, num_layers=2, num_single_layers=2,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=40,
                                  pooled_projection_dim=24, guidance_embeds=True, axes_dims_rope=(4, 6, 6))


def flux2_transformer():
    """FLUX.2's layout (klein's: few double, more single blocks, no guidance input) at width 64, 4 heads of 16."""
    from diffusers import Flux2Transformer2DModel
    return Flux2Transformer2DModel(patch_size=1, in_channels=32, num_layers=1, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=4, joint_attention_dim=40,
                                   axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False)


def flux2_vae():
    """FLUX.2's autoencoder layout (8 latent channels, patchified 2 x 2 to 32), with random batch-norm statistics."""
    from diffusers import AutoencoderKLFlux2
    vae = AutoencoderKLFlux2(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                             latent_channels=8, norm_num_groups=8, sample_size=IMAGE_SIZE)
    vae.bn.running_mean.normal_(0.0, 0.1)
    vae.bn.running_var.uniform_(0.5, 2.0)
    return vae


def chroma_transformer():
    """Chroma's layout (FLUX.1's blocks, modulations from a small approximator) at width 64, 4 heads of 16, with
    the published depth (19 double, 38 single blocks): ComfyUI indexes the approximator's modulations as the
    published model lays them out (344 of them), so only that depth has a ComfyUI twin."""
    from diffusers import ChromaTransformer2DModel
    return ChromaTransformer2DModel(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38,
                                    attention_head_dim=16, num_attention_heads=4, joint_attention_dim=40,
                                    axes_dims_rope=(4, 6, 6), approximator_num_channels=64, approximator_hidden_dim=96,
                                    approximator_layers=2)


def qwen_image_transformer():
    """Qwen-Image's layout at width 64 (2 heads of 32), two blocks, over a 4-channel latent."""
    from diffusers import QwenImageTransformer2DModel
    return QwenImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=4, num_layers=2,
                                       attention_head_dim=32, num_attention_heads=2, joint_attention_dim=40,
                                       axes_dims_rope=(8, 12, 12))


def qwen_image_vae():
    """Qwen-Image's video autoencoder layout, one frame, 4 latent channels with their own mean and std."""
    from diffusers import AutoencoderKLQwenImage
    return AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2], num_res_blocks=1, temperal_downsample=[False],
                                  latents_mean=[0.1, -0.2, 0.3, 0.0], latents_std=[1.5, 0.8, 2.0, 1.1])


def z_image_transformer():
    """Z-Image's layout, two main layers and one refiner of each kind, at width 1056 (8 heads of 132): the
    smallest width with a ComfyUI twin, since below 1024 ComfyUI's timestep embedder narrows its hidden layer
    (diffusers' does not), and the feed-forward's 8/3 x width must be a multiple of 256 (ComfyUI rounds up,
    diffusers does not)."""
    from diffusers import ZImageTransformer2DModel
    return ZImageTransformer2DModel(in_channels=16, dim=1056, n_layers=2, n_refiner_layers=1, n_heads=8, n_kv_heads=8,
                                    cap_feat_dim=40, axes_dims=[36, 48, 48], axes_lens=[64, 32, 32])


def comfy_sd15_unet():
    """The diffusers twin of tests/comfy's small SD1.5-layout UNet (width 320, context 768, one level):
    ComfyUI's input block 1, output blocks 0 and 1, and the middle block have cross-attention."""
    from diffusers import UNet2DConditionModel
    return UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
                                down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                                block_out_channels=(320,), cross_attention_dim=768, attention_head_dim=8)


def text_embeds(kind: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed + 7)
    if kind == "sd15":
        return {"encoder_hidden_states": torch.randn(1, 7, 32, generator=g)}
    if kind == "comfy_sd15":
        return {"encoder_hidden_states": torch.randn(1, 7, 768, generator=g)}
    if kind == "sdxl":
        return {"encoder_hidden_states": torch.randn(1, 7, 48, generator=g), "text_embeds": torch.randn(1, 24, generator=g)}
    if kind in ("flux2", "chroma", "qwen_image", "z_image"):
        return {"encoder_hidden_states": torch.randn(1, 7, 40, generator=g)}
    return {"encoder_hidden_states": torch.randn(1, 7, 40, generator=g), "pooled_projections": torch.randn(1, 24, generator=g)}


def make_model(kind: str, seed: int = 0):
    """(base model, vae) with random weights fixed by ``seed``."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        base = {"sd15": sd15_unet, "sdxl": sdxl_unet, "flux": flux_transformer,
                "comfy_sd15": comfy_sd15_unet, "flux2": flux2_transformer, "qwen_image": qwen_image_transformer,
                "z_image": z_image_transformer, "chroma": chroma_transformer}[kind]()
        autoencoders = {"flux2": flux2_vae, "qwen_image": qwen_image_vae}
        wide = kind in ("flux", "chroma", "z_image")
        autoencoder = autoencoders[kind]() if kind in autoencoders else vae(16 if wide else 4)
    return base.eval(), autoencoder.eval()


def write_model_folder(kind: str, folder, seed: int = 0) -> str:
    from safetensors.torch import save_file
    base, autoencoder = make_model(kind, seed)
    folder = str(folder)
    dit = kind in ("flux", "flux2", "chroma", "qwen_image", "z_image")
    base.save_pretrained(os.path.join(folder, "transformer" if dit else "unet"))
    autoencoder.save_pretrained(os.path.join(folder, "vae"))
    save_file(text_embeds(kind, seed), os.path.join(folder, "text_embeds.safetensors"))
    return folder


def write_smoke_data(folder) -> str:
    import json
    from .synthetic_faces import write_identity_dataset
    os.makedirs(folder, exist_ok=True)
    write_identity_dataset(os.path.join(folder, "identities"), identities=6, photos=8, size=IMAGE_SIZE)
    with open(os.path.join(folder, "tiny_vit.json"), "w") as f:
        json.dump(TINY_OPEN_CLIP, f)
    with open(os.path.join(folder, "encoder.json"), "w") as f:
        json.dump(TINY_ENCODER, f)
    return str(folder)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=(*KINDS, "data"))
    parser.add_argument("folder")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.kind == "data":
        print(write_smoke_data(args.folder))
    else:
        print(write_model_folder(args.kind, args.folder, args.seed))
    return 0


if __name__ == "__main__":
    sys.exit(main())
