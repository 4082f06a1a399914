"""Identity injection on ComfyUI models, through ModelPatcher's public extension points only.

UNets (SD1.5, SDXL): an attn2 replace patch per cross-attention layer of a clone.
FLUX: a ``patches_replace["dit"]`` patch per double/single block that marks the block
in a copy of transformer_options and installs an ``optimized_attention_override``; the
override adds the identity term to the image tokens of that block's joint attention.
A DIFFUSION_MODEL wrapper records the text length and latent size per model call.
Nothing global is changed: the original model, and every other clone, stay as they were.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import comfy.ldm.modules.attention as comfy_attention
import comfy.patcher_extension
import torch
from comfy.ldm.modules.attention import SpatialTransformer

from ..guidance.adapter import AdapterFitError, IdentityAdapter
from ..guidance.decoupled import (COND, UNCOND, BlockWeights, DecoupledAttention, LayerInjection,
                                  add_identity_to_joint_attention)
from ..guidance.infinite_id import (STREAMS_KEY, STYLE_KEY, AdaINSettings, MixedSelfAttention,
                                    StreamCrossAttention, StreamLayout)

FLUX_STATE = "omni_identity_flux"          # per model call: text length, latent size
FLUX_BLOCK = "omni_identity_flux_block"    # per block: the injections to add
INJECT_MODES = ("both", "double", "single")


@dataclass(frozen=True)
class HostLayer:
    key: tuple                 # ComfyUI's patch key
    group: str                 # input / middle / output / double / single
    number: int                # block number within its group
    inner_dim: int


def diffusion_model(model):
    return model.get_model_object("diffusion_model")


def is_flux(model) -> bool:
    dm = diffusion_model(model)
    return hasattr(dm, "double_blocks") and hasattr(dm, "single_blocks")


def model_description(model) -> str:
    return f"{type(model.model).__name__} ({type(diffusion_model(model)).__name__})"


def unet_layers(model) -> list[HostLayer]:
    """Cross-attention layers in diffusers' processor order: down, up, then middle blocks."""
    dm = diffusion_model(model)
    layers = []
    for group, blocks in (("input", dm.input_blocks), ("output", dm.output_blocks), ("middle", [dm.middle_block])):
        for number, block in enumerate(blocks):
            for module in block:
                if isinstance(module, SpatialTransformer):
                    for index, tb in enumerate(module.transformer_blocks):
                        if getattr(tb, "attn2", None) is not None:
                            layers.append(HostLayer((group, number, index), group, number, tb.attn2.to_q.out_features))
    return layers


def flux_layers(model) -> list[HostLayer]:
    dm = diffusion_model(model)
    return ([HostLayer(("double_block", i), "double", i, dm.hidden_size) for i in range(len(dm.double_blocks))]
            + [HostLayer(("single_block", i), "single", i, dm.hidden_size) for i in range(len(dm.single_blocks))])


def host_layers(model) -> list[HostLayer]:
    return flux_layers(model) if is_flux(model) else unet_layers(model)


def check_fit(adapter: IdentityAdapter, model, layers: list[HostLayer]) -> None:
    family = "flux" if is_flux(model) else "unet"
    dims = [layer.inner_dim for layer in layers]
    if adapter.config.family != family or tuple(dims) != adapter.config.layer_dims:
        raise AdapterFitError(
            f"adapter '{adapter.name}' ({adapter.config.describe()}, layer widths "
            f"{_summary(adapter.config.layer_dims)}) does not fit the model {model_description(model)}, which has "
            f"{len(dims)} {family} attention layers of widths {_summary(dims)}. Use an adapter made for this base model.")


def fit_summary(adapter: IdentityAdapter, embeds, model) -> str:
    """The three things that must fit, one line each, for error messages."""
    try:
        layers = host_layers(model)
        model_line = (f"{model_description(model)}: {len(layers)} {'flux' if is_flux(model) else 'unet'} "
                      f"attention layers of widths {_summary([layer.inner_dim for layer in layers])}")
    except Exception:   # a model this pack cannot inject into at all
        model_line = f"{model_description(model)}: no UNet cross-attention or FLUX blocks found"
    return (f"  adapter: '{adapter.name}', {adapter.config.describe()}, layer widths "
            f"{_summary(adapter.config.layer_dims)}\n  embeds: {embeds.describe()}\n  model: {model_line}")


def _summary(dims) -> str:
    dims = list(dims)
    return str(dims) if len(dims) <= 8 else f"[{', '.join(map(str, dims[:6]))}, ... {len(dims)} in all]"


def sigma_window(model, start_at: float, end_at: float) -> tuple[float, float]:
    sampling = model.get_model_object("model_sampling")
    return sampling.percent_to_sigma(start_at), sampling.percent_to_sigma(end_at)


def apply_identity(model, adapter: IdentityAdapter, tokens: dict, weight: float, start_at: float, end_at: float,
                   mask: Optional[torch.Tensor] = None, blocks: BlockWeights = BlockWeights(),
                   inject: str = "both"):
    """A clone of ``model`` with the adapter's identity injected; ``model`` is untouched."""
    layers = host_layers(model)
    check_fit(adapter, model, layers)
    sigma_start, sigma_end = sigma_window(model, start_at, end_at)
    patched = model.clone()
    flux = is_flux(model)
    for index, layer in enumerate(layers):
        if flux and inject != "both" and layer.group != inject:
            continue
        layer_weight = weight * blocks.weight(layer.group, layer.number)
        if layer_weight == 0.0:
            continue
        keys, values = adapter.layer_kv(index, tokens)
        injection = LayerInjection(keys, values, layer_weight, sigma_start, sigma_end, mask)
        if flux:
            _add_flux_injection(patched, layer.key, injection)
        else:
            _add_unet_injection(patched, layer.key, injection)
    if flux:
        patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, FLUX_STATE)
        patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, FLUX_STATE,
                                     record_flux_call)
    return patched


def _existing_patch(model, kind: str, key: tuple):
    return model.model_options["transformer_options"].get("patches_replace", {}).get(kind, {}).get(key)


def _add_unet_injection(model, key: tuple, injection: LayerInjection) -> None:
    existing = _existing_patch(model, "attn2", key)
    if isinstance(existing, DecoupledAttention):
        patch = existing.with_injection(injection)
    else:   # no patch yet, or another pack's: keep it as the text attention
        patch = DecoupledAttention(comfy_attention.optimized_attention, [injection], base=existing)
    model.set_model_attn2_replace(patch, *key)


# -- FLUX -----------------------------------------------------------------------------
def record_flux_call(executor, x, timestep, context, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: remember the text length and latent size of this call."""
    # executor arguments after context: y, guidance, ref_latents, control, transformer_options
    options = args[4] if len(args) > 4 else kwargs.get("transformer_options")
    if isinstance(options, dict):
        options[FLUX_STATE] = {"txt_len": int(context.shape[1]), "latent_hw": tuple(x.shape[-2:])}
    return executor(x, timestep, context, *args, **kwargs)


class FluxBlockPatch:
    """dit replace patch: runs the block with our attention override switched on for it."""

    def __init__(self, injections: tuple[LayerInjection, ...], previous=None):
        self.injections = injections
        self.previous = previous

    def with_injection(self, injection: LayerInjection) -> "FluxBlockPatch":
        return FluxBlockPatch((*self.injections, injection), self.previous)

    def __deepcopy__(self, memo) -> "FluxBlockPatch":
        return FluxBlockPatch(self.injections, self.previous)

    def to(self, device) -> "FluxBlockPatch":
        return FluxBlockPatch(tuple(i.to(device) for i in self.injections), self.previous)

    def __call__(self, args: dict, extra: dict) -> dict:
        options = dict(args.get("transformer_options") or {})
        options[FLUX_BLOCK] = self.injections
        previous_override = options.get("optimized_attention_override")
        options["optimized_attention_override"] = FluxAttentionOverride(previous_override)
        args = {**args, "transformer_options": options}
        if self.previous is not None:
            return self.previous(args, extra)
        return extra["original_block"](args)


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
        if not injections or state is None or q.ndim != 4:
            return out
        for injection in injections:
            if injection.active(options.get("sigmas")):
                out = add_identity_to_joint_attention(out, q, state["txt_len"], injection, func,
                                                      options.get("cond_or_uncond") or (), state["latent_hw"])
        return out


def _add_flux_injection(model, key: tuple, injection: LayerInjection) -> None:
    existing = _existing_patch(model, "dit", key)
    if isinstance(existing, FluxBlockPatch):
        patch = existing.with_injection(injection)
    else:
        patch = FluxBlockPatch((injection,), previous=existing)
    model.set_model_patch_replace(patch, "dit", key[0], key[1])


# -- Infinite-ID: two streams in one batched call ---------------------------------------
def _take(value, batch: int, index: torch.Tensor):
    """``value`` with ``value[index]`` appended along the batch, for every batch-sized tensor inside."""
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch:
        return torch.cat([value, value[index.to(value.device)]])
    if isinstance(value, dict):
        return {k: _take(v, batch, index) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_take(v, batch, index) for v in value)
    return value


class TwoStreams:
    """DIFFUSION_MODEL wrapper: the identity stream's rows plus the text stream's rows in one
    call; the identity rows' output is returned.

    The text stream repeats every row (``text_uncond``), or only the conditional rows when the
    identity's unconditional branch equals the text stream's (zero unconditional tokens).
    Executor arguments after x: timesteps, context, y, control, transformer_options; every
    batch-sized input (timesteps, context, y, ControlNet residuals) gets the text rows too.
    """

    def __init__(self, text_uncond: bool):
        self.text_uncond = text_uncond

    def text_rows(self, batch: int, cond_or_uncond: list) -> list[int]:
        branches = cond_or_uncond or [COND]
        chunk = batch // len(branches)
        return [c * chunk + i for c, branch in enumerate(branches) for i in range(chunk)
                if self.text_uncond or branch != UNCOND]

    def __call__(self, executor, x, *args, **kwargs):
        batch = x.shape[0]
        args = list(args)
        positional = len(args) > 4
        options = args[4] if positional else kwargs.get("transformer_options", {})
        rows = self.text_rows(batch, list(options.get("cond_or_uncond") or []))
        index = torch.tensor(rows, dtype=torch.long)
        options = {**options, STREAMS_KEY: StreamLayout(batch, tuple(rows))}
        if positional:
            args = [_take(a, batch, index) for a in args[:4]] + [options] + args[5:]
        else:
            args = [_take(a, batch, index) for a in args]
            kwargs["transformer_options"] = options
        kwargs = {k: (v if k == "transformer_options" else _take(v, batch, index)) for k, v in kwargs.items()}
        return executor(_take(x, batch, index), *args, **kwargs)[:batch]


def apply_mixed_attention(model, adapter: IdentityAdapter, tokens: dict, weight: float, start_at: float,
                          end_at: float, mask: Optional[torch.Tensor] = None, blocks: BlockWeights = BlockWeights()):
    """A clone running Infinite-ID's two streams: mixed self-attention and merged cross-attention."""
    if is_flux(model):
        raise ValueError("Mixed attention (Infinite-ID) works on UNet models (SD1.5, SDXL); this model is "
                         f"{model_description(model)}")
    layers = unet_layers(model)
    check_fit(adapter, model, layers)
    sigma_start, sigma_end = sigma_window(model, start_at, end_at)
    patched = model.clone()
    for index, layer in enumerate(layers):
        layer_weight = weight * blocks.weight(layer.group, layer.number)
        injections = []
        if layer_weight != 0.0:
            keys, values = adapter.layer_kv(index, tokens)
            injections.append(LayerInjection(keys, values, layer_weight, sigma_start, sigma_end, mask))
        attention = comfy_attention.optimized_attention
        patched.set_model_attn1_replace(MixedSelfAttention(attention, base=_existing_patch(patched, "attn1", layer.key)),
                                        *layer.key)
        patched.set_model_attn2_replace(
            StreamCrossAttention(attention, injections, base=_existing_patch(patched, "attn2", layer.key)), *layer.key)
    # zero unconditional identity tokens: that branch of the identity stream is the text stream's
    text_uncond = bool(tokens[UNCOND].abs().max() > 0)
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, STREAMS_KEY)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, STREAMS_KEY,
                                 TwoStreams(text_uncond))
    return patched


def has_two_streams(model) -> bool:
    return bool(model.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, STREAMS_KEY))


def set_adain(model, settings: AdaINSettings):
    """A clone whose identity stream is AdaIN-aligned to the text stream with ``settings``."""
    if not has_two_streams(model):
        raise ValueError("AdaIN-mean aligns the identity stream to the text stream of Infinite-ID: connect this "
                         "node after 'Mixed Attention (OmniIdentity)'")
    patched = model.clone()
    patched.model_options["transformer_options"][STYLE_KEY] = settings
    return patched


def gradient_ready(model):
    """A clone whose every diffusion-model layer uses a fresh copy of its weights.

    ComfyUI runs nodes in inference mode, so the loaded weights are inference tensors that
    autograd cannot save; with a weight function set, ComfyUI casts a copy per call, and a
    copy made outside inference mode is an ordinary tensor. Gradients then flow through
    the frozen model to its inputs and to patches (RB-Guidance, adapter training)."""
    patched = model.clone()
    for key in model.model_state_dict():
        if key.startswith("diffusion_model.") and key.endswith((".weight", ".bias")):
            patched.add_weight_wrapper(key, _fresh_copy)
    return patched


def _fresh_copy(weight):
    # ComfyUI's cast copies a weight as soon as a weight function is set; the copy made
    # outside inference mode is an ordinary tensor autograd can save.
    return weight
