"""Random IP-Adapter checkpoints in the exact published key layouts and dtypes, and small
diffusers models of the SD1.5, SDXL and FLUX layouts to check them against.

The layouts are spelled out here from the authors' module definitions, independently of the
pack's loader:
- h94 (tencent-ailab/IP-Adapter): ``image_proj`` of Resampler (Plus, Plus-Face), MLPProjModel
  (Full-Face), MLPProjModelFaceId (FaceID, plus its LoRA keys under ``ip_adapter``),
  ProjPlusModel (FaceID Plus v2), ImageProjModel (base); ``ip_adapter.{1,3,5,...}.to_k_ip/to_v_ip``;
  float16, safetensors (``.bin``: the same two sections, pickled as plain tensors);
- XLabs (x-flux, flux-ip-adapter v1/v2): ``ip_adapter_proj_model.{proj,norm}`` (ImageProjModel)
  and ``double_blocks.N.processor.ip_adapter_double_stream_{k,v}_proj`` with biases; bfloat16;
- InstantX (FLUX.1-dev-IP-Adapter ip-adapter.bin): ``image_proj`` of MLPProjModel
  (``proj.0``, ``proj.2``, ``norm``) and ``ip_adapter.{0..}.to_k_ip/to_v_ip`` without biases,
  double blocks then single blocks; float16, a pickled dict of plain tensors.
Sizes are small, with the relations diffusers' converters assume (Resampler depth 4, feed-
forward 4x, 64-wide heads; FaceID hidden width twice the ArcFace width; XLabs v2 = 16 x 4096).
"""
from __future__ import annotations

import torch

H94_KINDS = ("plus", "plus_face", "full_face", "faceid", "faceid_plusv2", "base")
FLUX_KINDS = ("xlabs_v1", "xlabs_v2", "instantx")
LAYOUTS = ("sd15", "sdxl")
CLIP_TOKENS, CLIP_WIDTH, ID_WIDTH, POOLED_WIDTH = 5, 48, 32, 40
LAYOUT_CONTEXT = {"sd15": 64, "sdxl": 128}             # the UNet's cross-attention (and IP token) width
FLUX_TOKEN_WIDTH = {"xlabs_v1": 48, "xlabs_v2": 4096, "instantx": 64}
FLUX_TOKENS = {"xlabs_v1": 4, "xlabs_v2": 16, "instantx": 128}
FLUX = dict(hidden=64, heads=4, depth=2, single=2, axes=(4, 6, 6), pooled_text=32)


class Random:
    """Seeded random tensors in the published dtypes."""

    def __init__(self, seed: int, dtype=torch.float16):
        self.generator = torch.Generator().manual_seed(seed)
        self.dtype = dtype

    def weight(self, out_dim: int, in_dim: int) -> torch.Tensor:
        return (torch.randn(out_dim, in_dim, generator=self.generator) * in_dim ** -0.5).to(self.dtype)

    def bias(self, dim: int, scale: float = 0.1) -> torch.Tensor:
        return (torch.randn(dim, generator=self.generator) * scale).to(self.dtype)

    def norm(self, prefix: str, dim: int) -> dict:
        return {f"{prefix}.weight": (1 + self.bias(dim).float()).to(self.dtype), f"{prefix}.bias": self.bias(dim)}

    def linear(self, prefix: str, out_dim: int, in_dim: int, bias: bool = True) -> dict:
        out = {f"{prefix}.weight": self.weight(out_dim, in_dim)}
        if bias:
            out[f"{prefix}.bias"] = self.bias(out_dim)
        return out


def perceiver(r: Random, prefix: str, dim: int, depth: int, embedding_dim: int, output_dim: int) -> dict:
    """h94's Resampler / FacePerceiverResampler body: proj_in, layers (PerceiverAttention + FeedForward
    with 64-wide heads and 4x width), proj_out, norm_out."""
    state = {**r.linear(f"{prefix}proj_in", dim, embedding_dim), **r.linear(f"{prefix}proj_out", output_dim, dim),
             **r.norm(f"{prefix}norm_out", output_dim)}
    for i in range(depth):
        layer = f"{prefix}layers.{i}"
        state.update({**r.norm(f"{layer}.0.norm1", dim), **r.norm(f"{layer}.0.norm2", dim),
                      **r.linear(f"{layer}.0.to_q", dim, dim, bias=False),
                      **r.linear(f"{layer}.0.to_kv", 2 * dim, dim, bias=False),
                      **r.linear(f"{layer}.0.to_out", dim, dim, bias=False), **r.norm(f"{layer}.1.0", dim),
                      **r.linear(f"{layer}.1.1", 4 * dim, dim, bias=False),
                      **r.linear(f"{layer}.1.3", dim, 4 * dim, bias=False)})
    return state


def h94_image_proj(kind: str, token_dim: int, r: Random, clip_width: int = CLIP_WIDTH, resampler: int = 0,
                   queries: int = 0) -> dict:
    if kind in ("plus", "plus_face"):
        dim = resampler or (64 if token_dim == 64 else 128)   # SDXL Plus: resampler width != token width
        queries = queries or (8 if kind == "plus" else 4)
        latents = (torch.randn(1, queries, dim, generator=r.generator) / dim ** 0.5).to(r.dtype)
        return {"latents": latents, **perceiver(r, "", dim, 4, clip_width, token_dim)}
    if kind == "full_face":
        return {**r.linear("proj.0", clip_width, clip_width), **r.linear("proj.2", token_dim, clip_width),
                **r.norm("proj.3", token_dim)}
    if kind == "faceid":
        return {**r.linear("proj.0", 2 * ID_WIDTH, ID_WIDTH), **r.linear("proj.2", 4 * token_dim, 2 * ID_WIDTH),
                **r.norm("norm", token_dim)}
    if kind == "faceid_plusv2":
        return {**r.linear("proj.0", 2 * ID_WIDTH, ID_WIDTH), **r.linear("proj.2", 4 * token_dim, 2 * ID_WIDTH),
                **r.norm("norm", token_dim), **perceiver(r, "perceiver_resampler.", token_dim, 4, CLIP_WIDTH, token_dim)}
    if kind == "base":
        return {**r.linear("proj", 4 * token_dim, POOLED_WIDTH), **r.norm("norm", token_dim)}
    raise ValueError(kind)


def h94_checkpoint(kind: str, token_dim: int, layer_dims: list[int], seed: int, **sizes) -> dict:
    """{"image_proj": {...}, "ip_adapter": {...}} as h94's files hold them (float16). ``sizes``:
    clip_width, resampler, queries of the image projection (small by default; h94's Plus-Face SD1.5:
    clip_width=1280, resampler=768, queries=16 with token_dim=768)."""
    r = Random(seed)
    ip_adapter = {}
    for i, dim in enumerate(layer_dims):
        ip_adapter[f"{2 * i + 1}.to_k_ip.weight"] = r.weight(dim, token_dim)
        ip_adapter[f"{2 * i + 1}.to_v_ip.weight"] = r.weight(dim, token_dim)
        if kind == "faceid":       # FaceID files carry the LoRA of their attention layers too
            ip_adapter[f"{2 * i}.to_q_lora.down.weight"] = r.weight(4, dim)
            ip_adapter[f"{2 * i}.to_q_lora.up.weight"] = r.weight(dim, 4)
    return {"image_proj": h94_image_proj(kind, token_dim, r, **sizes), "ip_adapter": ip_adapter}


def flat(nested: dict) -> dict:
    """The .safetensors layout of a two-section checkpoint: ``image_proj.*``, ``ip_adapter.*``."""
    return {f"{section}.{k}": v.contiguous() for section, part in nested.items() for k, v in part.items()}


def xlabs_checkpoint(kind: str, hidden: int, double_blocks: int, seed: int, width: int = 0,
                     pooled: int = POOLED_WIDTH) -> dict:
    """XLabs' flux-ip-adapter (v1) / -v2 layout (bfloat16, flat keys); ``width``: the token width
    (4096 in XLabs' files), ``pooled``: the image embedding's width (768, CLIP-L)."""
    r = Random(seed, torch.bfloat16)
    width, tokens = width or FLUX_TOKEN_WIDTH[kind], FLUX_TOKENS[kind]
    state = {**r.linear("ip_adapter_proj_model.proj", tokens * width, pooled),
             **r.norm("ip_adapter_proj_model.norm", width)}
    for i in range(double_blocks):
        for kv in ("k", "v"):
            state.update(r.linear(f"double_blocks.{i}.processor.ip_adapter_double_stream_{kv}_proj", hidden, width))
    return state


def instantx_checkpoint(hidden: int, blocks: int, seed: int) -> dict:
    """InstantX's ip-adapter.bin layout ({"image_proj", "ip_adapter"}, float16)."""
    r = Random(seed)
    width, tokens = FLUX_TOKEN_WIDTH["instantx"], FLUX_TOKENS["instantx"]
    image_proj = {**r.linear("proj.0", 2 * POOLED_WIDTH, POOLED_WIDTH),
                  **r.linear("proj.2", tokens * width, 2 * POOLED_WIDTH), **r.norm("norm", width)}
    ip_adapter = {f"{i}.to_{kv}_ip.weight": r.weight(hidden, width) for i in range(blocks) for kv in ("k", "v")}
    return {"image_proj": image_proj, "ip_adapter": ip_adapter}


# ----------------------------------------------------------------------------- diffusers models
def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                param.copy_(torch.randn(param.shape, generator=generator) * param[0].numel() ** -0.5)
            else:
                centre = 1.0 if "norm" in name and name.endswith("weight") else 0.0
                param.copy_(centre + torch.randn(param.shape, generator=generator) * 0.1)
    return module.eval()


def diffusers_unet(layout: str, seed: int = 1, single_level: bool = False):
    """A small UNet2DConditionModel of the SD1.5 layout (attention in the first levels, depth 1,
    conv projections) or the SDXL one (no attention in the first level, depth 2, linear
    projections); ``single_level``: every attention layer at the latent's resolution."""
    from diffusers import UNet2DConditionModel
    common = dict(sample_size=16, in_channels=4, out_channels=4, layers_per_block=1, norm_num_groups=32,
                  cross_attention_dim=LAYOUT_CONTEXT[layout])
    if single_level:
        unet = UNet2DConditionModel(block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                                    up_block_types=("CrossAttnUpBlock2D",), attention_head_dim=8, **common)
    elif layout == "sd15":
        unet = UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), attention_head_dim=8, **common)
    else:
        unet = UNet2DConditionModel(block_out_channels=(32, 64), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                    up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(4, 8),
                                    transformer_layers_per_block=(1, 2), use_linear_projection=True, **common)
    return randomise(unet, seed)


def comfy_unet_config(layout: str, single_level: bool = False) -> dict:
    """ComfyUI's UNetModel config of ``diffusers_unet`` (same module tree, ComfyUI's key names). ComfyUI's
    SD1.5 model class sets 8 heads (num_heads=8, num_head_channels=-1), so the diffusers models use 8
    heads wherever they attend."""
    common = dict(image_size=16, in_channels=4, out_channels=4, model_channels=32, use_spatial_transformer=True,
                  context_dim=LAYOUT_CONTEXT[layout], legacy=False, adm_in_channels=None,
                  use_temporal_attention=False, use_temporal_resblock=False, use_checkpoint=False)
    if single_level:
        return dict(num_res_blocks=[1], channel_mult=[1], num_heads=8, transformer_depth=[1],
                    transformer_depth_output=[1, 1], transformer_depth_middle=1, use_linear_in_transformer=False,
                    **common)
    if layout == "sd15":
        return dict(num_res_blocks=[1, 1], channel_mult=[1, 2], num_heads=8, transformer_depth=[1, 0],
                    transformer_depth_output=[1, 1, 0, 0], transformer_depth_middle=1,
                    use_linear_in_transformer=False, **common)
    return dict(num_res_blocks=[1, 1], channel_mult=[1, 2], num_heads=8, transformer_depth=[0, 2],
                transformer_depth_output=[0, 0, 2, 2], transformer_depth_middle=2, use_linear_in_transformer=True,
                **common)


def unet_cross_attention_dims(unet) -> list[int]:
    """Widths of the cross-attention layers in diffusers' processor order (h94's numbering)."""
    modules = dict(unet.named_modules())
    return [modules[name[:-len(".processor")]].to_q.out_features for name in unet.attn_processors
            if name.endswith("attn2.processor")]


def diffusers_flux(joint_dim: int, seed: int = 1):
    from diffusers import FluxTransformer2DModel
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=FLUX["depth"],
                                   num_single_layers=FLUX["single"], attention_head_dim=FLUX["hidden"] // FLUX["heads"],
                                   num_attention_heads=FLUX["heads"], joint_attention_dim=joint_dim,
                                   pooled_projection_dim=FLUX["pooled_text"], guidance_embeds=True,
                                   axes_dims_rope=FLUX["axes"])
    return randomise(model, seed)


def load_h94_into_diffusers(unet, nested: dict):
    """diffusers' own h94 reader (UNet2DConditionLoadersMixin._load_ip_adapter_weights)."""
    unet._load_ip_adapter_weights([{section: {k: v.float() for k, v in part.items()}
                                    for section, part in nested.items()}], low_cpu_mem_usage=False)
    return unet


def load_xlabs_into_diffusers(transformer, folder, filename: str):
    """diffusers' own XLabs reader: FluxIPAdapterMixin.load_ip_adapter on the safetensors file."""
    from diffusers.loaders import FluxIPAdapterMixin

    class Host(FluxIPAdapterMixin):
        pass

    host = Host()
    host.transformer = transformer
    host.load_ip_adapter(str(folder), weight_name=filename, image_encoder_pretrained_model_name_or_path=None)
    return transformer


def random_clip_vision_l(seed: int = 0) -> dict:
    """A CLIP ViT-L/14 vision tower with projection (openai/clip-vit-large-patch14's layout, the encoder of
    XLabs' adapters) at full size, random float16 weights: ComfyUI picks vision configs by layer count."""
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection
    config = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              patch_size=14, image_size=224, projection_dim=768)
    with torch.device("meta"):
        shapes = {k: v.shape for k, v in CLIPVisionModelWithProjection(config).state_dict().items()
                  if not k.endswith("position_ids")}
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for key, shape in shapes.items():
        if "layer_norm" in key or "layrnorm" in key or "layernorm" in key:
            value = torch.ones(shape) if key.endswith("weight") else torch.zeros(shape)
        elif len(shape) >= 2:
            std = 0.02 if "embedding.weight" in key and "patch" not in key else (torch.Size(shape[1:]).numel()) ** -0.5
            value = torch.randn(shape, generator=generator) * std
        else:
            value = torch.randn(shape, generator=generator) * 0.02 if "class_embedding" in key else torch.zeros(shape)
        state[key] = value.to(torch.float16)
    return state
