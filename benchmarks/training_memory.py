"""Memory per GPU of stage 2 (flow matching) on FLUX.1-dev and SDXL, under DDP and FSDP: an estimate.

How the estimate is made (nothing here downloads or loads real weights):
- parameters: FLUX.1-dev's transformer and SDXL's UNet are built from their published configs
  on the meta device and counted; so are the paper's Omni-ID encoder (CLIP-H width, 256
  queries) and the adapter (one K and one V projection per attention layer);
- frozen base: bf16, 2 bytes a parameter. DDP: all of it on every GPU. FSDP (fully_shard per
  transformer block / UNet resnet and transformer): 1/N of it, plus the largest unit gathered whole twice (the
  one running and the one prefetched);
- trainable part (replicated under both): fp32 weights, gradients and two AdamW moments, 16
  bytes a parameter, plus DDP's gradient buckets (4 bytes a parameter);
- activations: measured on the tiny real-layout configs (tests/support/tiny_diffusers.py),
  as the bytes autograd saves for backward in one training forward (frozen weights
  excluded), at two latent sizes, then fitted per image as a * U1 + b * U2, with U1 = sum over
  blocks of width x tokens and U2 = sum over attention layers of heads x tokens^2 (the
  tiny configs' and the real configs' own sums), and scaled to the real configs at the
  paper's setting: 512 px, effective batch 32 identities x 8 targets = 256 images a step,
  on 8 GPUs with 4 identities (32 images) per GPU per micro-batch, bf16 (half the measured
  fp32 bytes). With gradient checkpointing (diffusers checkpoints each block) the hooks see
  what stays outside the blocks; each block's input (bf16, U1 x 2 bytes) and one block's
  activations while it is recomputed are added. Memory-efficient attention on GPUs does not
  keep the tokens^2 attention probabilities, so that term is shown apart ("math attention").
Not counted: the CUDA context and allocator slack (~1-3 GiB), the VAE and CLIP (their
outputs are cached once per photo).

    python benchmarks/training_memory.py [--gpus 8] [--images-per-gpu 32] [--size 512] [--quick]

Last line: RESULT {json}, GiB per GPU, and the FSDP / DDP ratio measured in the same run.
"""
from __future__ import annotations

import argparse
import json

import torch

import support_path  # noqa: F401  (tests/support as ``support``)

GIB = 1024 ** 3
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
SDXL = dict(sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
            use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816)
FLUX_TEXT_TOKENS, SDXL_TEXT_TOKENS = 512, 77


def real_model(kind: str):
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel
    with torch.device("meta"):
        return FluxTransformer2DModel(**FLUX_DEV) if kind == "flux" else UNet2DConditionModel(**SDXL)


# -- the U1 / U2 sums of a model at a latent size ----------------------------------------------------
def flux_units(model, latent: int, text_tokens: int) -> tuple[float, float]:
    tokens = (latent // 2) ** 2 + text_tokens
    blocks = len(model.transformer_blocks) + len(model.single_transformer_blocks)
    width = model.config.num_attention_heads * model.config.attention_head_dim
    return blocks * width * tokens, blocks * model.config.num_attention_heads * tokens ** 2


def unet_units(model, latent: int) -> tuple[float, float]:
    u1 = u2 = 0.0
    for level, (down, up) in enumerate(zip(model.down_blocks, reversed(model.up_blocks))):
        tokens = (latent // 2 ** level) ** 2
        for block in (down, up):
            width = block.resnets[0].conv2.out_channels
            layers = len(block.resnets)
            for transformer in getattr(block, "attentions", None) or []:
                for tb in transformer.transformer_blocks:
                    layers += 1
                    u2 += 2 * tb.attn1.heads * tokens ** 2          # self- and cross-attention probabilities
            u1 += layers * width * tokens
    tokens = (latent // 2 ** (len(model.down_blocks) - 1)) ** 2
    mid = model.mid_block
    width = mid.resnets[0].conv2.out_channels
    for transformer in mid.attentions:
        for tb in transformer.transformer_blocks:
            u1 += width * tokens
            u2 += 2 * tb.attn1.heads * tokens ** 2
    return u1 + len(mid.resnets) * width * tokens, u2


def largest_layer_units(kind: str, model, latent: int) -> float:
    """width x tokens of the largest single block (a checkpointed unit)."""
    if kind == "flux":
        u1, _ = flux_units(model, latent, FLUX_TEXT_TOKENS)
        return u1 / (len(model.transformer_blocks) + len(model.single_transformer_blocks))
    best = 0.0
    for level, block in enumerate(model.down_blocks):
        best = max(best, block.resnets[0].conv2.out_channels * (latent // 2 ** level) ** 2)
    return best


def units(kind: str, model, latent: int) -> tuple[float, float]:
    return flux_units(model, latent, FLUX_TEXT_TOKENS if kind == "flux" else 0) if kind == "flux" else \
        unet_units(model, latent)


# -- measuring the tiny configs ---------------------------------------------------------------------
def saved_bytes(kind: str, latent: int, checkpointing: bool) -> float:
    """Bytes autograd keeps for backward per image in one training forward of the tiny model."""
    from omniid.diffusers_host.denoiser import DiffusersDenoiserHost
    from omniid.diffusers_host.models import BaseModel
    from support.tiny_diffusers import make_model, text_embeds
    model, vae = make_model(kind)
    model.requires_grad_(False)
    if checkpointing:
        model.enable_gradient_checkpointing()
    host = DiffusersDenoiserHost(BaseModel("flux" if kind == "flux" else "unet", model, vae, text_embeds(kind), {}),
                                 image_size=latent * 2)
    frozen = {p.data_ptr() for p in model.parameters()}
    batch, channels = 2, (16 if kind == "flux" else 4)
    kv = [(torch.randn(batch, 8, layer.inner_dim, requires_grad=True), torch.randn(batch, 8, layer.inner_dim,
                                                                                    requires_grad=True))
          for layer in host.layers]
    seen: dict = {}

    def pack(t):
        if t.data_ptr() not in frozen:
            seen[(t.data_ptr(), tuple(t.shape))] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = host.denoise(torch.randn(batch, channels, latent, latent), torch.tensor([0.5, 0.5]), kv, True)
    out.sum().backward()
    return sum(seen.values()) / batch


def fit(kind: str, checkpointing: bool) -> tuple[float, float]:
    from support.tiny_diffusers import make_model
    model, _ = make_model(kind)
    latents = (16, 32)
    measured = [saved_bytes(kind, n, checkpointing) for n in latents]
    rows = [units_tiny(kind, model, n) for n in latents]
    a = torch.tensor(rows, dtype=torch.float64)
    coef = torch.linalg.solve(a, torch.tensor(measured, dtype=torch.float64))
    return float(coef[0]), float(coef[1])


def units_tiny(kind, model, latent):
    return flux_units(model, latent, 7) if kind == "flux" else unet_units(model, latent)


# -- the table --------------------------------------------------------------------------------------
def trainable_parameters(model) -> int:
    from omniid.diffusers_host.train import flow_adapter_config
    from omniid.encoders.omni_id import EncoderConfig, IdentityEncoder
    from omniid.guidance.adapter import IdentityAdapter
    with torch.device("meta"):
        encoder = IdentityEncoder(EncoderConfig())
        adapter = IdentityAdapter(flow_adapter_config(model, encoder.config.dim))
    return sum(p.numel() for p in encoder.parameters()) + sum(p.numel() for p in adapter.parameters())


def estimate(kind: str, gpus: int, images: int, size: int) -> dict:
    from omniid.diffusers_host.train import shard_units
    model = real_model(kind)
    base = sum(p.numel() for p in model.parameters())
    largest = max(sum(p.numel() for p in unit.parameters()) for unit in shard_units(model))
    trainable = trainable_parameters(model)
    latent = size // 8
    u1, u2 = units(kind, model, latent)
    row = {"base_parameters": base, "trainable_parameters": trainable, "largest_fsdp_unit": largest}
    layers = u1 / largest_layer_units(kind, model, latent)
    for checkpointing in (False, True):
        a, b = fit(kind, checkpointing)
        linear = max(a, 0.0) * u1 * images / 2                 # bf16: half the fp32 bytes measured
        quadratic = max(b, 0.0) * u2 * images / 2
        tag = "checkpointed" if checkpointing else "full"
        if checkpointing:
            # the hooks see what stays outside the checkpointed blocks; add each block's input (bf16)
            # and one block's full activations while it is recomputed
            linear += 2 * u1 * images + row["activations_full_gib"] * GIB / layers
        row[f"activations_{tag}_gib"] = linear / GIB
        row[f"attention_probs_{tag}_gib"] = quadratic / GIB
    fixed_trainable = 16 * trainable + 4 * trainable
    for parallel in ("ddp", "fsdp"):
        weights = 2 * base if parallel == "ddp" else 2 * base / gpus + 2 * 2 * largest
        for tag in ("full", "checkpointed"):
            row[f"{parallel}_{tag}_gib"] = (weights + fixed_trainable) / GIB + row[f"activations_{tag}_gib"]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpus", type=int, default=8)
    parser.add_argument("--images-per-gpu", type=int, default=32, help="identities x targets per GPU per micro-batch")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="the same estimate (it takes well under a minute)")
    args = parser.parse_args()
    torch.manual_seed(0)
    result = {}
    print(f"{args.gpus} GPUs, {args.images_per_gpu} images of {args.size} px per GPU per micro-batch, bf16 base")
    print(f"{'model':<12}{'parallel':<10}{'no checkpointing':>20}{'checkpointing':>16}   (GiB per GPU, estimate)")
    for kind, name in (("flux", "FLUX.1-dev"), ("sdxl", "SDXL")):
        row = estimate(kind, args.gpus, args.images_per_gpu, args.size)
        result[name] = row
        for parallel in ("ddp", "fsdp"):
            print(f"{name:<12}{parallel.upper():<10}{row[f'{parallel}_full_gib']:>20.1f}"
                  f"{row[f'{parallel}_checkpointed_gib']:>16.1f}")
        print(f"{'':<12}base {row['base_parameters'] / 1e9:.2f} B parameters, trainable "
              f"{row['trainable_parameters'] / 1e6:.0f} M; math attention would add "
              f"{row['attention_probs_full_gib']:.1f} GiB; FSDP/DDP "
              f"{row['fsdp_checkpointed_gib'] / row['ddp_checkpointed_gib']:.2f} with checkpointing")
    print("RESULT " + json.dumps(result))


if __name__ == "__main__":
    main()
