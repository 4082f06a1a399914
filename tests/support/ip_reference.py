"""Whole-model checks of the IP-Adapter formats: the pack's injection into ComfyUI's models against
the reference implementations, on identical random weights.

- h94 (SD1.5 and SDXL layouts): diffusers' UNet2DConditionModel with the checkpoint loaded by
  diffusers' own reader, against ComfyUI's UNetModel holding the same weights, patched by the pack
  (attn2 replace patches);
- XLabs v1 / v2: diffusers' FluxTransformer2DModel with the checkpoint loaded by diffusers' own
  XLabs reader (FluxIPAdapterAttnProcessor), against ComfyUI's FLUX patched by the pack;
- InstantX: diffusers' FluxTransformer2DModel with ``InstantXProcessor`` below, a re-implementation
  of the authors' published IPAFluxAttnProcessor2_0 and MLPProjModel (diffusers has no InstantX
  adapter), against ComfyUI's FLUX patched by the pack.
Each compares the model's prediction (noise for the UNets, velocity for FLUX) of one call on a
CFG batch (conditional and unconditional rows) with a weight, and with a mask (a test-side
multiplication of the identity term for the FLUX references, which have no masks), and reports
how much the identity changes the reference's prediction, so that equality is not vacuous.
Needs ComfyUI importable (run in process).
"""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from . import ip_layouts as L

CASES = ((0.7, False), (1.3, True))          # (weight, masked); masks use one identity photo


def relative(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return float((ours.double() - reference.double()).abs().max() / reference.double().abs().max())


# ----------------------------------------------------------------------------- InstantX reference
class MLPProjModel(torch.nn.Module):
    """InstantX's image projection: Linear, GELU, Linear to T tokens, LayerNorm."""

    def __init__(self, state: dict):
        super().__init__()
        pooled, hidden = state["proj.0.weight"].shape[1], state["proj.0.weight"].shape[0]
        self.width = state["norm.weight"].shape[0]
        self.num_tokens = state["proj.2.weight"].shape[0] // self.width
        self.proj = torch.nn.Sequential(torch.nn.Linear(pooled, hidden), torch.nn.GELU(),
                                        torch.nn.Linear(hidden, self.width * self.num_tokens))
        self.norm = torch.nn.LayerNorm(self.width)
        self.load_state_dict({k: v.float() for k, v in state.items()})

    def forward(self, pooled):
        return self.norm(self.proj(pooled).reshape(-1, self.num_tokens, self.width))


class InstantXProcessor(torch.nn.Module):
    """IPAFluxAttnProcessor2_0 as InstantX published it, on diffusers' FluxAttention: the identity
    queried with the normalised queries before the rotary embedding, keys and values RMS-normalised
    per head (eps 1e-5, no weight), ``scale`` times the result added to the attention output before
    the output projection: image tokens in double blocks, every token in single blocks."""

    def __init__(self, to_k: torch.Tensor, to_v: torch.Tensor, head_dim: int, scale: float):
        super().__init__()
        from diffusers.models.normalization import RMSNorm
        self.to_k_ip = torch.nn.Linear(to_k.shape[1], to_k.shape[0], bias=False)
        self.to_v_ip = torch.nn.Linear(to_v.shape[1], to_v.shape[0], bias=False)
        self.to_k_ip.weight.data.copy_(to_k.float())
        self.to_v_ip.weight.data.copy_(to_v.float())
        self.norm_added_k = RMSNorm(head_dim, eps=1e-5, elementwise_affine=False)
        self.norm_added_v = RMSNorm(head_dim, eps=1e-5, elementwise_affine=False)
        self.scale, self.token_mask = scale, None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 ip_hidden_states=None):
        from diffusers.models.embeddings import apply_rotary_emb
        b, heads = hidden_states.shape[0], attn.heads

        def split(x):
            return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

        query, key, value = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.to_v(hidden_states))
        query, key = attn.norm_q(query), attn.norm_k(key)
        ip_key = self.norm_added_k(split(self.to_k_ip(ip_hidden_states)))
        ip_value = self.norm_added_v(split(self.to_v_ip(ip_hidden_states)))
        ip = F.scaled_dot_product_attention(query, ip_key, ip_value).transpose(1, 2).reshape(b, -1, query.shape[1] * query.shape[-1])
        if self.token_mask is not None:
            ip = ip * self.token_mask
        if encoder_hidden_states is not None:
            eq = attn.norm_added_q(split(attn.add_q_proj(encoder_hidden_states)))
            ek = attn.norm_added_k(split(attn.add_k_proj(encoder_hidden_states)))
            query, key = torch.cat([eq, query], 2), torch.cat([ek, key], 2)
            value = torch.cat([split(attn.add_v_proj(encoder_hidden_states)), value], 2)
        if image_rotary_emb is not None:
            query, key = apply_rotary_emb(query, image_rotary_emb), apply_rotary_emb(key, image_rotary_emb)
        out = F.scaled_dot_product_attention(query, key, value).transpose(1, 2).reshape(b, -1, heads * query.shape[-1])
        if encoder_hidden_states is None:
            return out + self.scale * ip
        text = encoder_hidden_states.shape[1]
        image = attn.to_out[1](attn.to_out[0](out[:, text:] + self.scale * ip))
        return image, attn.to_add_out(out[:, :text])


def masked_xlabs_processors(transformer, token_mask):
    """diffusers' XLabs processors with the identity term multiplied by ``token_mask`` (test side)."""
    from diffusers.models.transformers.transformer_flux import FluxIPAdapterAttnProcessor

    class Masked(FluxIPAdapterAttnProcessor):
        def __call__(self, *args, **kwargs):
            out = super().__call__(*args, **kwargs)
            return (out[0], out[1], out[2] * token_mask) if isinstance(out, tuple) and len(out) == 3 else out

    for proc in transformer.attn_processors.values():
        if isinstance(proc, FluxIPAdapterAttnProcessor):
            proc.__class__ = Masked


# ----------------------------------------------------------------------------- ComfyUI side
def comfy_model(config_class, config: dict, state: dict):
    import comfy.model_patcher
    model_config = config_class(dict(config))
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    missing, unexpected = base.diffusion_model.load_state_dict(state, strict=False)
    assert not missing and not unexpected, (missing[:4], unexpected[:4])
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


def comfy_prediction(patched, x: torch.Tensor, sigma: torch.Tensor, **conds) -> torch.Tensor:
    """The prediction of one call of the patched model on a [cond, uncond] batch, as ComfyUI's sampler
    makes it: (x - denoised) / sigma, the noise (UNet) or velocity (FLUX) the network output."""
    import comfy.patcher_extension
    options = dict(patched.model_options["transformer_options"])
    options["wrappers"] = comfy.patcher_extension.merge_nested_dicts(dict(options.get("wrappers", {})),
                                                                     patched.wrappers, copy_dict1=True)
    options.update(cond_or_uncond=[0, 1], sigmas=sigma)
    with torch.no_grad():
        denoised = patched.model.apply_model(x, sigma, transformer_options=options, **conds)
    return (x - denoised) / sigma.view(-1, *[1] * (x.ndim - 1))


@functools.lru_cache(maxsize=None)
def unet_pair(layout: str, single_level: bool):
    """(diffusers UNet, ComfyUI ModelPatcher) with the same weights; built once per layout (each check
    loads its adapter into the diffusers model anew, and patches clones of the ComfyUI one)."""
    import comfy.supported_models
    import comfy.utils
    unet = L.diffusers_unet(layout, single_level=single_level)
    config = L.comfy_unet_config(layout, single_level)
    names = comfy.utils.unet_to_diffusers(config)
    state = {names[k]: v.clone() for k, v in unet.state_dict().items()}
    return unet, comfy_model(comfy.supported_models.SD15, config, state)


def h94_check(kind: str, layout: str, single_level: bool = False, seed: int = 0) -> dict:
    """{"difference": largest relative difference of the CFG batch's prediction over the cases (a
    weight; on the single-level UNet also a mask), "effect": relative change the identity makes}."""
    from omniid.comfy_host.identity import apply_identity
    from omniid.guidance.adapter_files import load_adapter
    from safetensors.torch import save_file
    unet, model = unet_pair(layout, single_level)
    nested = L.h94_checkpoint(kind, L.LAYOUT_CONTEXT[layout], L.unet_cross_attention_dims(unet), seed)
    with tempfile.TemporaryDirectory() as folder:
        save_file(L.flat(nested), str(Path(folder) / "adapter.safetensors"))
        adapter = load_adapter(str(Path(folder) / "adapter.safetensors"))
    L.load_h94_into_diffusers(unet, nested)
    projection = unet.encoder_hid_proj.image_projection_layers[0]
    g = torch.Generator().manual_seed(seed + 100)
    sigma = torch.tensor([2.5, 2.5])
    t = model.model.model_sampling.timestep(sigma).float()
    x = torch.randn(1, 4, 16, 16, generator=g).expand(2, -1, -1, -1).contiguous()
    text = torch.randn(2, 3, L.LAYOUT_CONTEXT[layout], generator=g)
    worst, effect = 0.0, None
    for weight, masked in CASES if single_level else CASES[:1]:
        embeds = _h94_embeds(1 if masked else 2, g)
        mask = torch.rand(1, 16, 16, generator=g) if masked else None
        patched = apply_identity(model, adapter, adapter.identity_tokens(embeds, 0.8), weight, 0.0, 1.0, mask=mask)
        ours = comfy_prediction(patched, x, sigma, c_crossattn=text)
        rows, clip_rows = _h94_rows(kind, embeds, 0.8, projection)

        def reference(scale):
            for proc in unet.attn_processors.values():
                if hasattr(proc, "to_k_ip"):
                    proc.scale = [scale]
            with torch.no_grad():
                if clip_rows is not None:
                    projection.clip_embeds = clip_rows
                return unet(x / (sigma[:, None, None, None] ** 2 + 1) ** 0.5, t, encoder_hidden_states=text,
                            added_cond_kwargs={"image_embeds": [rows]},
                            cross_attention_kwargs={"ip_adapter_masks": [mask[None]]} if masked else None).sample

        expected = reference(weight)
        worst = max(worst, relative(ours, expected))
        if effect is None:
            effect = relative(reference(0.0), expected)
    return {"difference": worst, "effect": effect}


def _h94_embeds(images: int, g):
    from omniid.encoders.embeds import IdentityEmbeds
    return IdentityEmbeds("arcface_clip", {
        "clip": torch.randn(images, L.CLIP_TOKENS, L.CLIP_WIDTH, generator=g),
        "clip_uncond": torch.randn(1, L.CLIP_TOKENS, L.CLIP_WIDTH, generator=g),
        "arcface": torch.randn(images, L.ID_WIDTH, generator=g),
        "pooled": torch.randn(images, L.POOLED_WIDTH, generator=g),
        "pooled_uncond": torch.randn(1, L.POOLED_WIDTH, generator=g)}, {"num_images": images})


def _h94_rows(kind: str, embeds, shortcut: float, projection):
    """diffusers' image_embeds for a [cond, uncond] batch (the unconditional input once per photo,
    as diffusers' pipelines repeat it), and FaceID Plus's CLIP rows."""
    t = embeds.tensors
    n = t["clip"].shape[0]
    if kind in ("plus", "plus_face", "full_face"):
        return torch.stack([t["clip"], t["clip_uncond"].expand(n, -1, -1)]), None
    if kind == "base":
        return torch.stack([t["pooled"], t["pooled_uncond"].expand(n, -1)]), None
    rows = torch.stack([t["arcface"], torch.zeros_like(t["arcface"])])
    if kind == "faceid":
        return rows, None
    projection.shortcut, projection.shortcut_scale = True, shortcut
    return rows, torch.stack([t["clip"], t["clip_uncond"].expand(n, -1, -1)])
