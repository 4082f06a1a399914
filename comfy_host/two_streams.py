"""Infinite-ID on ComfyUI: the identity and text streams in one batched model call.

Two forms of the text stream:
- ``own trajectory`` (the paper, the default): the text stream is the base model's own denoising
  of the prompt, from the same initial noise. An OUTER_SAMPLE wrapper doubles the batch the
  user's sampler samples (identity rows, then text rows, same noise), the DIFFUSION_MODEL wrapper
  orders every model call as [identity rows; text rows] with each identity row paired with the
  text row of the same sample and CFG branch, and only the identity images are returned.
- ``shared latent`` (cheaper): the text stream is re-run on the identity stream's own latent at
  every step (its rows are copies of the identity rows); with zero unconditional identity tokens
  only the conditional rows are repeated.
"""
from __future__ import annotations

from typing import Optional

import comfy.ldm.modules.attention as comfy_attention
import comfy.patcher_extension
import torch

from ..guidance.adapter import IdentityAdapter
from ..guidance.decoupled import COND, UNCOND, BlockWeights, LayerInjection
from ..guidance.infinite_id import (STREAMS_KEY, STYLE_KEY, AdaINSettings, MixedSelfAttention, StreamCrossAttention,
                                    StreamLayout)
from .compat import unet_options_position
from .layers import check_fit, existing_patch, is_flux, model_description, sigma_window, unet_layers
from .options import find_options, with_options

TEXT_STREAMS = ("own trajectory", "shared latent")
TRAJECTORY_KEY = "omni_identity_text_trajectory"


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
    Every batch-sized input (timesteps, context, y, ControlNet residuals, and whatever a later
    ComfyUI adds) gets the text rows too; transformer_options gets the stream layout.
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
        original = find_options(args, kwargs, unet_options_position())
        options = original or {}
        rows = self.text_rows(batch, list(options.get("cond_or_uncond") or []))
        index = torch.tensor(rows, dtype=torch.long)
        options = {**options, STREAMS_KEY: StreamLayout(batch, tuple(rows))}
        args = tuple(a if a is original else _take(a, batch, index) for a in args)
        kwargs = {k: (v if k == "transformer_options" else _take(v, batch, index)) for k, v in kwargs.items()}
        args, kwargs = with_options(args, kwargs, unet_options_position(), options)
        return executor(_take(x, batch, index), *args, **kwargs)[:batch]


def _reorder(value, batch: int, order: torch.Tensor):
    """``value`` with its rows in ``order``, for every batch-sized tensor inside."""
    if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch:
        return value[order.to(value.device)]
    if isinstance(value, dict):
        return {k: _reorder(v, batch, order) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_reorder(v, batch, order) for v in value)
    return value


class TwoTrajectories:
    """DIFFUSION_MODEL wrapper for the text stream's own trajectory.

    The sampled batch holds the identity samples, then as many text samples; ComfyUI stacks the
    CFG branches, so a model call's rows are [branch 0: identity, text; branch 1: identity, text].
    The call runs with rows ordered [identity rows; text rows] (pairs at equal offsets) and the
    output goes back in the sampler's order: both trajectories advance.
    """

    def __call__(self, executor, x, *args, **kwargs):
        batch = x.shape[0]
        original = find_options(args, kwargs, unet_options_position())
        options = original or {}
        branches = list(options.get("cond_or_uncond") or []) or [COND]
        chunk = batch // len(branches)
        half = chunk // 2
        if chunk % 2 or chunk * len(branches) != batch:
            return executor(x, *args, **kwargs)     # not a doubled batch (e.g. another guider's call)
        identity = [b * chunk + i for b in range(len(branches)) for i in range(half)]
        order = torch.tensor(identity + [row + half for row in identity], dtype=torch.long)
        options = {**options, STREAMS_KEY: StreamLayout(batch // 2, tuple(range(batch // 2)))}
        args = tuple(a if a is original else _reorder(a, batch, order) for a in args)
        kwargs = {k: (v if k == "transformer_options" else _reorder(v, batch, order)) for k, v in kwargs.items()}
        args, kwargs = with_options(args, kwargs, unet_options_position(), options)
        out = executor(x[order.to(x.device)], *args, **kwargs)
        return out[torch.argsort(order).to(out.device)]


def sample_text_trajectory(executor, noise, latent_image, sampler, sigmas, denoise_mask=None, *args, **kwargs):
    """OUTER_SAMPLE wrapper: the user's sampler samples the identity batch and, from the same
    noise, the text stream's batch; the identity images are returned."""
    batch = noise.shape[0]

    def doubled(t):
        return torch.cat([t, t]) if torch.is_tensor(t) and t.ndim > 0 and t.shape[0] == batch else t

    args, kwargs = _doubled_latent_shapes(args, kwargs, batch)
    out = executor(doubled(noise), doubled(latent_image), sampler, sigmas, doubled(denoise_mask), *args, **kwargs)
    return out[:batch]


LATENT_SHAPES_POSITION = 3              # after denoise_mask: callback, disable_pbar, seed, latent_shapes


def _doubled_latent_shapes(args: tuple, kwargs: dict, batch: int) -> tuple[tuple, dict]:
    """The latent_shapes argument of ComfyUI releases that pass one (0.33+), describing the doubled batch."""
    positional = "latent_shapes" not in kwargs and len(args) > LATENT_SHAPES_POSITION
    shapes = args[LATENT_SHAPES_POSITION] if positional else kwargs.get("latent_shapes")
    if shapes is None:
        return args, kwargs
    if len(shapes) != 1:
        raise ValueError("Infinite-ID's two streams sample one image latent; this model samples "
                         f"{len(shapes)} packed latents")
    shape = tuple(shapes[0])
    doubled = [type(shapes[0])((2 * shape[0], *shape[1:])) if shape and shape[0] == batch else shapes[0]]
    if positional:
        return (*args[:LATENT_SHAPES_POSITION], doubled, *args[LATENT_SHAPES_POSITION + 1:]), kwargs
    return args, {**kwargs, "latent_shapes": doubled}


def apply_mixed_attention(model, adapter: IdentityAdapter, tokens: dict, weight: float, start_at: float,
                          end_at: float, mask: Optional[torch.Tensor] = None, blocks: BlockWeights = BlockWeights(),
                          text_stream: str = "own trajectory"):
    """A clone running Infinite-ID's two streams: mixed self-attention and merged cross-attention."""
    if text_stream not in TEXT_STREAMS:
        raise ValueError(f"text_stream must be one of {TEXT_STREAMS}, not {text_stream!r}")
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
        patched.set_model_attn1_replace(MixedSelfAttention(attention, base=existing_patch(patched, "attn1", layer.key)),
                                        *layer.key)
        patched.set_model_attn2_replace(
            StreamCrossAttention(attention, injections, base=existing_patch(patched, "attn2", layer.key)), *layer.key)
    wrappers = comfy.patcher_extension.WrappersMP
    patched.remove_wrappers_with_key(wrappers.DIFFUSION_MODEL, STREAMS_KEY)
    patched.remove_wrappers_with_key(wrappers.OUTER_SAMPLE, TRAJECTORY_KEY)
    if text_stream == "own trajectory":
        patched.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, STREAMS_KEY, TwoTrajectories())
        patched.add_wrapper_with_key(wrappers.OUTER_SAMPLE, TRAJECTORY_KEY, sample_text_trajectory)
    else:
        # zero unconditional identity tokens: that branch of the identity stream is the text stream's
        text_uncond = bool(tokens[UNCOND].abs().max() > 0)
        patched.add_wrapper_with_key(wrappers.DIFFUSION_MODEL, STREAMS_KEY, TwoStreams(text_uncond))
    return patched


def has_two_streams(model) -> bool:
    return bool(model.get_wrappers(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, STREAMS_KEY))


def set_adain(model, settings: AdaINSettings):
    """A clone whose identity stream is AdaIN-aligned to the text stream with ``settings``."""
    if not has_two_streams(model):
        raise ValueError("model: AdaIN-mean aligns the identity stream to the text stream of Infinite-ID: connect this "
                         "node after 'Mixed Attention (OmniIdentity)'")
    patched = model.clone()
    patched.model_options["transformer_options"][STYLE_KEY] = settings
    return patched
