"""Identity injection on diffusers models, with the ComfyUI host's semantics.

``apply_identity(model, adapter, tokens, weight, ...)`` installs the pack's processors on the
adapter's layers (stacking on identities already applied, as the ComfyUI host stacks patches):
the same layer weights (weight x block multiplier, ``BlockWeights`` in ComfyUI's block names),
the same masks and ``weight_mode``, and the same sigma window (``sigma_start`` >= sigma >=
``sigma_end``; in ComfyUI the node turns start_at/end_at into these with the model's schedule;
``denoiser.unet_sigma_window`` (SD1.5/SDXL) and ``denoiser.flux_sigma_window`` give the same sigmas).
diffusers gives processors no sigma: ``identity_call(model, sigmas=..., cond_or_uncond=...)``
says them for the calls inside it (without it, every window is open and the whole batch is
conditional). Qwen-Image's calls give the generated image's size in ``img_shapes``, which is read
from each call: -Edit's reference tokens after the generated image's take no identity, as in ComfyUI.
``remove_identity`` puts diffusers' default processors back.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Optional

import torch

from ..guidance.decoupled import BlockWeights, DecoupledAttention, layer_injections, sdpa_attention
from .layers import PATCH_SIZE, adapter_layers, check_fit, host_layers, is_dit, is_flux, model_family
from .processors import CallState, FluxIdentityProcessor, UNetIdentityProcessor

STATE_ATTR = "_omni_identity_state"
HOOK_ATTR = "_omni_identity_hooks"


def call_state(model) -> CallState:
    """The model's CallState, created (with the hooks that record each call's sizes) on first use."""
    state = getattr(model, STATE_ATTR, None)
    if state is None:
        state = CallState(patch_size=PATCH_SIZE.get(model_family(model), 2))
        object.__setattr__(model, STATE_ATTR, state)
        hooks = [model.register_forward_pre_hook(_record_call, with_kwargs=True)]
        if is_flux(model):
            for block in model.transformer_blocks:
                hooks.append(block.register_forward_hook(_add_residual, with_kwargs=True))
        object.__setattr__(model, HOOK_ATTR, hooks)
    return state


def _record_call(model, args, kwargs):
    state: CallState = getattr(model, STATE_ATTR)
    sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
    if is_dit(model):
        context = args[1] if len(args) > 1 else kwargs.get("encoder_hidden_states")
        state.txt_len = int(context.shape[1]) if torch.is_tensor(context) and context.ndim == 3 else None
        generated = _generated_grid(kwargs.get("img_shapes"))
        if generated is not None and torch.is_tensor(sample):
            side = state.patch_size
            state.latent_shape = (sample.shape[0], model.config.out_channels, generated[0] * side, generated[1] * side)
    elif torch.is_tensor(sample) and sample.ndim == 4:
        state.latent_shape = tuple(sample.shape)
    state.residuals.clear()


def _generated_grid(img_shapes) -> Optional[tuple[int, int]]:
    """Qwen-Image: the generated image's token grid (rows, columns) from the call's ``img_shapes``, whose first
    entry per sample is the generated image's (frames, rows, columns) and the others -Edit's references'
    (whose tokens follow the generated image's and take no identity); None for anything else."""
    if not isinstance(img_shapes, (list, tuple)) or not img_shapes:
        return None
    first = img_shapes[0]
    if isinstance(first, list):           # per sample: [generated, reference, ...]
        first = first[0] if first else None
    if not isinstance(first, tuple) or len(first) != 3 or int(first[0]) != 1:
        return None                       # several frames or layers: no single generated grid
    return int(first[1]), int(first[2])


def _add_residual(block, args, kwargs, output):
    """FLUX double block (XLabs adapters): the identity term that goes to the image stream after the block."""
    for model_state in _states_of(block):
        residual = model_state.residuals.pop(id(block.attn), None)
        if residual is not None:
            context, image = output
            count = residual.shape[1]
            image = torch.cat([image[:, :count] + residual.to(image.dtype), image[:, count:]], dim=1)
            return context, image
    return output


def _states_of(block):
    processor = getattr(block.attn, "processor", None)
    return [processor.state] if isinstance(processor, FluxIdentityProcessor) else []


@contextmanager
def identity_call(model, sigmas: Optional[torch.Tensor] = None, cond_or_uncond=(),
                  latent_shape: Optional[tuple] = None):
    """The sigma, the batch's cond/uncond chunks and (FLUX, for masks) the latent's (B, C, H, W) of
    the calls inside; ComfyUI gives its patches the same in transformer_options."""
    state = call_state(model)
    saved = (state.sigmas, state.cond_or_uncond, state.latent_shape)
    state.sigmas = None if sigmas is None else torch.as_tensor(sigmas).reshape(-1)
    state.cond_or_uncond = tuple(cond_or_uncond)
    if latent_shape is not None:
        state.latent_shape = tuple(latent_shape)
    try:
        yield state
    finally:
        state.sigmas, state.cond_or_uncond, state.latent_shape = saved


def set_layer_injections(model, layer, injections, identity_only: bool = False) -> None:
    """Install (or replace) the identity processor of one layer with exactly ``injections``."""
    from ..guidance.decoupled import IdentityOnlyAttention
    state = call_state(model)
    current = layer.attention.processor
    if layer.group in ("double", "single"):
        base = current.base if isinstance(current, FluxIdentityProcessor) else current
        processor = layer.processor or FluxIdentityProcessor
        layer.attention.set_processor(processor(injections, state, layer.group, id(layer.attention), base))
        return
    kind = IdentityOnlyAttention if identity_only else DecoupledAttention
    patch = kind(sdpa_attention, injections)
    if isinstance(current, UNetIdentityProcessor):
        current.patch = patch
    else:
        layer.attention.set_processor(UNetIdentityProcessor(patch, state))


def current_injections(layer) -> tuple:
    processor = layer.attention.processor
    if isinstance(processor, FluxIdentityProcessor):
        return processor.injections
    if isinstance(processor, UNetIdentityProcessor):
        return processor.patch.injections
    return ()


def apply_identity(model, adapter, tokens: dict, weight: float = 1.0, sigma_start: float = math.inf,
                   sigma_end: float = 0.0, mask: Optional[torch.Tensor] = None,
                   blocks: BlockWeights = BlockWeights(), inject: str = "both", weight_mode: str = "output"):
    """Inject the identity ``tokens`` (``adapter.identity_tokens(embeds)``) into ``model`` (in place,
    as diffusers' IP-Adapters do; ``remove_identity`` undoes it). Returns the model."""
    layers = adapter_layers(model, adapter)
    check_fit(adapter, model, layers)
    for layer, injection in layer_injections(adapter, layers, tokens, weight, sigma_start, sigma_end, mask, blocks,
                                             inject, weight_mode, flux=is_dit(model)):
        set_layer_injections(model, layer, (*current_injections(layer), injection))
    return model


def remove_identity(model) -> None:
    """diffusers' default processors back on every layer the pack patched."""
    for layer in host_layers(model):
        processor = layer.attention.processor
        if isinstance(processor, FluxIdentityProcessor):
            layer.attention.set_processor(processor.base)
        elif isinstance(processor, UNetIdentityProcessor):
            from diffusers.models.attention_processor import AttnProcessor2_0
            layer.attention.set_processor(AttnProcessor2_0())
