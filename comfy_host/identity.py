"""Identity injection on ComfyUI models, through ModelPatcher's public extension points only.

UNets (SD1.5, SDXL): an attn2 replace patch per cross-attention layer of a clone.
FLUX: a ``patches_replace["dit"]`` patch per double/single block that marks the block (its
injections, its kind and the rotary embedding it was given) in a copy of transformer_options
and installs an ``optimized_attention_override``; the override adds the identity terms of
that block's joint attention (``guidance.flux_identity``), and terms the adapter adds to the
image stream after the block (XLabs) are added by the block patch when the block returns.
A DIFFUSION_MODEL wrapper records the text length and latent size per model call.
Nothing global is changed: the original model, and every other clone, stay as they were.
"""
from __future__ import annotations

from typing import Optional

import comfy.ldm.modules.attention as comfy_attention
import comfy.patcher_extension
import torch

from ..guidance.adapter import IdentityAdapter
from ..guidance.decoupled import BlockWeights, DecoupledAttention, LayerInjection, layer_injections
from ..guidance.flux_identity import identity_terms
from .attention import OVERRIDE_KEY, heads_first
from .compat import comfyui_version, flux_options_position, options_position_of
from .layers import adapter_layers, check_fit, dit_family, existing_patch, patch_size, sigma_window
from .options import find_options

FLUX_STATE = "omni_identity_flux"          # per model call: text length, latent size
FLUX_BLOCK = "omni_identity_flux_block"    # per block: the injections to add
FLUX_BLOCK_CALL = "omni_identity_flux_block_call"   # per block call: kind, rotary embedding, residual terms
INJECT_MODES = ("both", "double", "single")


def apply_identity(model, adapter: IdentityAdapter, tokens: dict, weight: float, start_at: float, end_at: float,
                   mask: Optional[torch.Tensor] = None, blocks: BlockWeights = BlockWeights(),
                   inject: str = "both", weight_mode: str = "output"):
    """A clone of ``model`` with the adapter's identity injected; ``model`` is untouched."""
    layers = adapter_layers(model, adapter)
    check_fit(adapter, model, layers)
    sigma_start, sigma_end = sigma_window(model, start_at, end_at)
    patched = model.clone()
    family = dit_family(model)
    dit = family is not None
    tokens_side = patch_size(model) if dit else 2
    for layer, injection in layer_injections(adapter, layers, tokens, weight, sigma_start, sigma_end, mask, blocks,
                                             inject, weight_mode, flux=dit):
        if dit:
            add_dit_injection(patched, family, layer, injection, tokens_side)
        else:
            add_unet_injection(patched, layer.key, injection)
    if dit:
        track_flux_calls(patched)
    return patched


def applied_masks(model) -> list[torch.Tensor]:
    """The attn_masks of the identities already applied to ``model`` (one per adapter application)."""
    masks = {}
    for kind in ("attn2", "dit"):
        for patch in model.model_options["transformer_options"].get("patches_replace", {}).get(kind, {}).values():
            for injection in getattr(patch, "injections", ()):
                if injection.mask is not None:
                    masks[id(injection.mask)] = injection.mask
    return list(masks.values())


def overlap_with_applied(model, mask: Optional[torch.Tensor]) -> float:
    """The largest overlap (share of the smaller region) between ``mask`` and an identity region already applied."""
    if mask is None:
        return 0.0
    import torch.nn.functional as F
    from ..encoders.face.regions import overlap
    share = 0.0
    for other in applied_masks(model):
        resized = F.interpolate(other[:1, None].float(), size=tuple(mask.shape[-2:]), mode="bilinear")[0, 0]
        share = max(share, overlap(mask[0].float(), resized))
    return share


def add_unet_injection(model, key: tuple, injection: LayerInjection) -> None:
    existing = existing_patch(model, "attn2", key)
    if isinstance(existing, DecoupledAttention):
        patch = existing.with_injection(injection)
    else:   # no patch yet, or another pack's: keep it as the text attention
        patch = DecoupledAttention(comfy_attention.optimized_attention, [injection], base=existing)
    model.set_model_attn2_replace(patch, *key)


def add_dit_injection(model, family, layer, injection: LayerInjection, tokens_side: int) -> None:
    """One layer's identity on a DiT clone, through the patch point its family offers: the layer's block patch
    (FLUX.1, FLUX.2, Chroma, Qwen-Image), or the attention override by layer number (Z-Image). The model needs
    ``track_flux_calls`` as well (once)."""
    if family.block_patches:
        add_flux_injection(model, layer.key, injection, tokens_side)
    else:
        add_indexed_injection(model, layer.number, injection, tokens_side)


# -- FLUX -----------------------------------------------------------------------------
def track_flux_calls(model) -> None:
    """Install (once) the wrapper that tells the FLUX attention override each call's sizes."""
    model.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, FLUX_STATE)
    model.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, FLUX_STATE, record_flux_call)


def record_flux_call(executor, x, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: remember the text length and latent size of this call, and check after it
    that ComfyUI ran the pack's block patches and their attention override (a release that stopped
    honouring either would otherwise drop the identity silently)."""
    owner = getattr(executor, "class_obj", None)
    options = kwargs.get("transformer_options")
    if not isinstance(options, dict):
        position = options_position_of(type(owner)) if isinstance(owner, torch.nn.Module) else flux_options_position()
        options = find_options(args, kwargs, position)
    context = args[1] if len(args) > 1 else kwargs.get("context")
    state = None
    if options is not None and torch.is_tensor(context):
        txt_len = int(context.shape[1])
        multiple = getattr(owner, "pad_tokens_multiple", None)       # Z-Image pads its caption to a multiple
        if isinstance(multiple, int) and multiple > 0:
            txt_len = -(-txt_len // multiple) * multiple
        state = {"txt_len": txt_len, "latent_hw": tuple(x.shape[-2:]), "blocks": 0, "attention": 0}
        options[FLUX_STATE] = state
        options.pop("block_index", None)         # layers are numbered afresh by this call's forward
    out = executor(x, *args, **kwargs)
    if state is not None:
        check_injection_points(state, options)
    return out


def check_injection_points(state: dict, options: dict) -> None:
    if isinstance(options.get(OVERRIDE_KEY), LayerIndexOverride):
        if state.get("indexed", 0) == 0:
            raise InjectionPointMissing(f"ComfyUI {comfyui_version()} ran the model's layers without marking them "
                                        "(transformer_options block_index) in the attention override the pack sets: "
                                        "the identity cannot be injected on this release")
        return
    expected = any(isinstance(patch, FluxBlockPatch)
                   for patch in options.get("patches_replace", {}).get("dit", {}).values())
    if not expected:
        return
    if state["blocks"] == 0:
        raise InjectionPointMissing(f"ComfyUI {comfyui_version()} did not call the pack's FLUX block patches "
                                    "(patches_replace['dit']): the identity cannot be injected on this release")
    if state["attention"] == 0:
        raise InjectionPointMissing(f"ComfyUI {comfyui_version()} ran FLUX's blocks without the attention override "
                                    "the pack sets (transformer_options['optimized_attention_override']): the "
                                    "identity cannot be injected on this release")


class InjectionPointMissing(RuntimeError):
    """This ComfyUI no longer calls a patch point the pack injects through."""


class FluxBlockPatch:
    """dit replace patch: runs the block with our attention override switched on for it, then
    adds the identity terms that go to the image stream after the block.

    Extra arguments a later ComfyUI may pass go on to a previous patch (which has this same
    interface); ComfyUI's own ``original_block`` takes the block arguments only."""

    def __init__(self, injections: tuple[LayerInjection, ...], previous=None, kind: str = "double",
                 patch_size: int = 2):
        self.injections = injections
        self.previous = previous
        self.kind = kind
        self.patch_size = patch_size          # latent pixels per image token along a side (FLUX.2: 1)

    def with_injection(self, injection: LayerInjection) -> "FluxBlockPatch":
        return FluxBlockPatch((*self.injections, injection), self.previous, self.kind, self.patch_size)

    def __deepcopy__(self, memo) -> "FluxBlockPatch":
        return FluxBlockPatch(self.injections, self.previous, self.kind, self.patch_size)

    def to(self, device) -> "FluxBlockPatch":
        return FluxBlockPatch(tuple(i.to(device) for i in self.injections), self.previous, self.kind, self.patch_size)

    def __call__(self, args: dict, extra: dict, *more, **kwargs) -> dict:
        options = dict(args.get("transformer_options") or {})
        if isinstance(options.get(FLUX_STATE), dict):
            options[FLUX_STATE]["blocks"] = options[FLUX_STATE].get("blocks", 0) + 1
        options[FLUX_BLOCK] = self.injections
        call = {"kind": self.kind, "pe": args.get("pe"), "residual": None, "patch_size": self.patch_size}
        options[FLUX_BLOCK_CALL] = call
        previous_override = options.get("optimized_attention_override")
        options["optimized_attention_override"] = FluxAttentionOverride(previous_override)
        args = {**args, "transformer_options": options}
        if self.previous is not None:
            out = self.previous(args, extra, *more, **kwargs)
        else:
            out = extra["original_block"](args)
        residual = call["residual"]
        if residual is not None and isinstance(out, dict) and torch.is_tensor(out.get("img")):
            img = out["img"]
            count = residual.shape[1]
            out = {**out, "img": torch.cat([img[:, :count] + residual.to(img.dtype), img[:, count:]], dim=1)}
        return out


class FluxAttentionOverride:
    def __init__(self, previous=None):
        self.previous = previous

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        if self.previous is not None:
            out = self.previous(func, q, k, v, heads, *args, **kwargs)
        else:
            out = func(q, k, v, heads, *args, **kwargs)
        options = kwargs.get("transformer_options") or {}
        injections = options.get(FLUX_BLOCK)
        state = options.get(FLUX_STATE)
        qk = heads_first(q, k, heads, kwargs.get("skip_reshape", False))
        if not injections or not isinstance(state, dict) or qk is None:
            return out            # uncounted: check_injection_points then says the identity was not injected
        q = qk[0]
        state["attention"] = state.get("attention", 0) + 1
        call = options.get(FLUX_BLOCK_CALL) or {"kind": "double", "pe": None, "residual": None}
        out, residual = identity_terms(out, q, call.get("pe"), state["txt_len"], call.get("kind", "double"),
                                       injections, func, options.get("cond_or_uncond") or (), state["latent_hw"],
                                       options.get("sigmas"), call.get("patch_size", 2))
        if residual is not None:
            call["residual"] = residual if call.get("residual") is None else call["residual"] + residual
        return out


def add_flux_injection(model, key: tuple, injection: LayerInjection, patch_size: int = 2) -> None:
    existing = existing_patch(model, "dit", key)
    if isinstance(existing, FluxBlockPatch):
        patch = existing.with_injection(injection)
    else:
        patch = FluxBlockPatch((injection,), previous=existing, kind="double" if key[0] == "double_block" else "single",
                               patch_size=patch_size)
    model.set_model_patch_replace(patch, "dit", key[0], key[1])


# -- DiTs without block patches (Z-Image) --------------------------------------------------
class LayerIndexOverride:
    """``optimized_attention_override`` for a DiT whose forward offers no block patches but marks each main
    layer in transformer_options (``block_type`` "double", ``block_index`` i) before it runs: adds the
    identity terms of layer i to that attention's output; every other attention call (the refiners, another
    model's) runs as it would have, through any override installed before."""

    def __init__(self, injections: dict, previous=None, patch_size: int = 2):
        self.injections, self.previous, self.patch_size = injections, previous, patch_size

    def with_injection(self, index: int, injection: LayerInjection) -> "LayerIndexOverride":
        merged = {**self.injections, index: (*self.injections.get(index, ()), injection)}
        return LayerIndexOverride(merged, self.previous, self.patch_size)

    def __deepcopy__(self, memo) -> "LayerIndexOverride":
        return LayerIndexOverride(self.injections, self.previous, self.patch_size)

    def to(self, device) -> "LayerIndexOverride":
        moved = {i: tuple(j.to(device) for j in injections) for i, injections in self.injections.items()}
        return LayerIndexOverride(moved, self.previous, self.patch_size)

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        if self.previous is not None:
            out = self.previous(func, q, k, v, heads, *args, **kwargs)
        else:
            out = func(q, k, v, heads, *args, **kwargs)
        options = kwargs.get("transformer_options") or {}
        state, index = options.get(FLUX_STATE), options.get("block_index")
        if not isinstance(state, dict) or options.get("block_type") != "double" or index is None or q.ndim != 4:
            return out
        state["indexed"] = state.get("indexed", 0) + 1
        injections = self.injections.get(index)
        if not injections:
            return out
        out, _ = identity_terms(out, q, None, state["txt_len"], "double", injections, func,
                                options.get("cond_or_uncond") or (), state["latent_hw"], options.get("sigmas"),
                                self.patch_size)
        return out


def add_indexed_injection(model, index: int, injection: LayerInjection, patch_size: int = 2) -> None:
    options = model.model_options["transformer_options"]
    existing = options.get(OVERRIDE_KEY)
    if isinstance(existing, LayerIndexOverride):
        override = existing.with_injection(index, injection)
    else:
        override = LayerIndexOverride({index: (injection,)}, previous=existing, patch_size=patch_size)
    options[OVERRIDE_KEY] = override
