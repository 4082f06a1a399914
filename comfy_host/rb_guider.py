"""OmniPortrait's RB-Guidance as a ComfyUI GUIDER (any sampler, any scheduler).

The guider is ComfyUI's CFGGuider plus, while t <= u T, the gradient of E = p / (1 + S) on
z_t. Diffusion features and attention maps come from ComfyUI's public extension points:
an ``output_block_patch`` captures the chosen up-block's input (the forward stops there:
nothing after it is needed for the gradient) and the pack's attention override records
attention maps at 1/4 of the latent's resolution (16 x 16 for SD1.5 at 512 px).
Gradients: ComfyUI loads weights as inference tensors, so the guider runs on a clone from
``gradients.gradient_ready``; the tracked forward runs outside inference mode.
"""
from __future__ import annotations

import math
from typing import Optional

import comfy.model_management
import comfy.samplers
import torch

from ..encoders.finite import require_finite
from ..guidance.attention_capture import AttentionMaps
from ..guidance.decoupled import token_grid
from ..guidance.rb_guidance import (LatentScales, RBSettings, apply_guidance, generation_mask, grid_for,
                                    guidance_gradient, mask_to_latent, resize_mask)
from .attention import record_attention
from .gradients import tracked_forward
from .rb_dit import StopForward, dit_family, dit_run

ATTENTION_FACTOR = 4      # attention maps at latent / 4: the paper's 16 x 16 for SD1.5 at 512 px
MAX_ATTENTION_TOKENS = 1024   # self-attention maps are N x N: finer grids are not recorded
UNET_FEATURE_BLOCK = 6    # the input of SD's output block 6 (after SD1.5's second up-block)


class FeatureCapture:
    """output_block_patch: keep the input of output block ``block`` (the DIFT features).

    ``stop``: end the forward there (nothing after it is needed). Otherwise the forward goes
    on detached from the graph, so only the path to the features is kept for the backward.
    """

    def __init__(self, block: int, stop: bool):
        self.block = block
        self.stop = stop
        self.features: Optional[torch.Tensor] = None

    def __call__(self, h, hsp, transformer_options, *args, **kwargs):
        kind, index = tuple(transformer_options.get("block", ("", -1)))[:2]
        if kind != "output" or index < self.block:
            return h, hsp
        if index == self.block:
            self.features = h
            if self.stop:
                raise StopForward
        return h.detach(), hsp.detach()


def latent_scales(model_sampling, sigma: torch.Tensor, like: torch.Tensor) -> LatentScales:
    """The paper's z_t and eps in terms of ComfyUI's sampling variable x, read off the model's own
    model_sampling (both maps are linear): z_t = calculate_input(sigma, x) and
    x = noise_scaling(sigma, eps, x0) = a x0 + b eps. Holds for epsilon, v and flow models alike."""
    ones, zeros = torch.ones_like(like), torch.zeros_like(like)
    rows = like.shape[0]

    def per_row(t):
        return t.reshape(rows, -1)[:, 0]

    sigma = sigma.to(like).expand(rows) if sigma.numel() == 1 else sigma.to(like)
    input_scale = per_row(model_sampling.calculate_input(sigma, ones))
    a = per_row(model_sampling.noise_scaling(sigma, zeros.clone(), ones.clone()))
    b = per_row(model_sampling.noise_scaling(sigma, ones.clone(), zeros.clone()))
    return LatentScales(input_scale, b / a)


def is_flow(model_sampling) -> bool:
    """Flow matching (x = (1 - sigma) x0 + sigma eps; FLUX, SD3, ...): the model's time is sigma itself."""
    import comfy.model_sampling
    return isinstance(model_sampling, comfy.model_sampling.CONST)


def training_timestep(model_sampling, sigma: torch.Tensor) -> float:
    """The paper's t (0 = clean ... 1000 = noise) at ``sigma``: a discrete model's timestep, or 1000 sigma for a
    flow model (whose own timestep may be sigma itself, as FLUX's is)."""
    if is_flow(model_sampling):
        return 1000.0 * float(sigma.reshape(-1)[0])
    return float(model_sampling.timestep(sigma).reshape(-1)[0])


def reference_sigma(model_sampling, t0: int, like: torch.Tensor) -> torch.Tensor:
    """The sigma of the paper's t0: t0 / 1000 on a flow model, the discrete schedule's sigma(t0) otherwise."""
    if is_flow(model_sampling):
        return torch.tensor([t0 / 1000.0], device=like.device, dtype=like.dtype)
    return model_sampling.sigma(torch.tensor([float(t0)], device=like.device)).to(like.dtype)


class RBGuider(comfy.samplers.CFGGuider):
    def __init__(self, model_patcher, settings: RBSettings, reference_latent: torch.Tensor,
                 reference_mask: Optional[torch.Tensor], generation_mask: Optional[torch.Tensor],
                 feature_block: int, subject_token: Optional[int], seed: int):
        """``feature_block`` 0: the model family's default (SD: output block 6; DiTs: ``rb_dit.FAMILIES``).
        ``subject_token``: the subject's index in the text stream, or None (on SD, 0, the start token, is none)."""
        super().__init__(model_patcher)
        self.family = dit_family(model_patcher)
        self.settings = settings
        self.reference_latent = reference_latent
        self.reference_mask_image = reference_mask
        self.generation_mask_image = generation_mask
        if feature_block <= 0:
            feature_block = (UNET_FEATURE_BLOCK if self.family is None
                             else self.family.default_block(self.family.counts(model_patcher.get_model_object(
                                 "diffusion_model"))))
        self.feature_block = feature_block
        self.subject_token = subject_token
        self.seed = seed
        self.reference = None
        self.reference_passes = 0
        self.guided_steps = 0
        self.last_score: Optional[torch.Tensor] = None

    def inner_sample(self, *args, **kwargs):
        self.reference = None                   # new run: new reference features
        return super().inner_sample(*args, **kwargs)

    # -- one UNet pass with captures ---------------------------------------------------------
    def _run(self, x: torch.Tensor, sigma: torch.Tensor, model_options: dict, cond, stop: bool):
        """(prediction or None when stopped, features (B, C, h, w), (grid, cross map, self maps))."""
        if self.family is not None:
            return dit_run(self.model_patcher, self.family, self.feature_block, self.subject_token, x, model_options,
                           lambda options: comfy.samplers.calc_cond_batch(self.inner_model, [cond], x, sigma,
                                                                          options)[0], stop,
                           record=not stop and self.generation_mask_image is None)
        target = math.prod(grid_for(tuple(x.shape[-2:]), ATTENTION_FACTOR))
        features = FeatureCapture(self.feature_block, stop)
        attention = AttentionMaps(token=self.subject_token if self.subject_token else None, keep_self=True,
                                  max_tokens=MAX_ATTENTION_TOKENS)
        transformer = dict(model_options.get("transformer_options", {}))
        if not stop and self.generation_mask_image is None:     # nothing reads the maps otherwise
            transformer = record_attention(transformer, attention)
        patches = dict(transformer.get("patches", {}))
        patches["output_block_patch"] = list(patches.get("output_block_patch", [])) + [features]
        transformer["patches"] = patches
        options = {**model_options, "transformer_options": transformer}
        prediction = None
        try:
            prediction = comfy.samplers.calc_cond_batch(self.inner_model, [cond], x, sigma, options)[0]
        except StopForward:
            pass
        if features.features is None:
            raise ValueError(f"feature_block {self.feature_block} is past this model's output blocks")
        batch = x.shape[0]
        feats = features.features[:batch]
        tokens = attention.nearest(target)
        if tokens is None:
            return prediction, feats, (None, None, None)
        cross, self_maps = attention.cross_map(tokens), attention.self_map(tokens)
        return prediction, feats, (token_grid(tokens, *x.shape[-2:]), None if cross is None else cross[:batch],
                                   None if self_maps is None else self_maps[:batch])

    def _reference(self, model_options: dict, like: torch.Tensor):
        """Reference features and masks: (flat (Nr, C), mask (Nr,)), or one pair per reference face."""
        sampling = self.inner_model.model_sampling
        z = self.inner_model.process_latent_in(self.reference_latent.to(like.device, like.dtype))
        sigma0 = reference_sigma(sampling, self.settings.t0, like)
        noise = torch.randn(z.shape, generator=torch.Generator().manual_seed(self.seed)).to(z)
        with torch.no_grad():           # the model's own noise scaling: z + sigma n (SD), (1 - sigma) z + sigma n (flow)
            _, feats, _ = self._run(sampling.noise_scaling(sigma0, noise, z), sigma0, model_options,
                                    self.conds["positive"], stop=True)
        grid = tuple(feats.shape[-2:])
        pairs = []
        for i in range(z.shape[0]):
            flat = feats[i].flatten(1).transpose(0, 1)                                    # (Nr, C)
            if self.reference_mask_image is not None:
                mask = resize_mask(self.reference_mask_image[i:i + 1].to(flat.device), grid)[0]
            else:
                mask = torch.ones(flat.shape[0], dtype=torch.bool, device=flat.device)
            pairs.append((flat.detach(), mask))
        self.reference_passes += 1
        if len(pairs) == 1:
            return pairs[0]
        return [f for f, _ in pairs], [m for _, m in pairs]

    def _generation_mask(self, feats, attention, ref_feats, ref_mask):
        grid, batch = tuple(feats.shape[-2:]), feats.shape[0]
        if self.generation_mask_image is not None:
            mask = resize_mask(self.generation_mask_image.to(feats.device), grid)
            if isinstance(ref_feats, list):                          # one mask per reference face
                return [m[None].expand(batch, -1) for m in mask]
            return mask.expand(batch, -1) if mask.shape[0] == 1 else mask
        return generation_mask(feats, *attention, ref_feats, ref_mask, self.settings)

    # -- the guidance ------------------------------------------------------------------------
    def predict_noise(self, x, timestep, model_options={}, seed=None, *args, **kwargs):
        sampling = self.inner_model.model_sampling
        if not self.settings.active(training_timestep(sampling, timestep)):
            return super().predict_noise(x, timestep, model_options, seed, *args, **kwargs)
        comfy.model_management.throw_exception_if_processing_interrupted()
        return self._guided(x, timestep, model_options)

    def _guided(self, x, timestep, model_options):
        """CFG whose conditional pass is the tracked one, plus the energy gradient.

        Mirrors ComfyUI's sampling_function (pre-CFG hooks, cfg_function with its post-CFG
        hooks), with the conditional branch evaluated once, with the graph to the features.
        """
        cond, uncond = self.conds.get("positive"), self.conds.get("negative")
        latent_hw = tuple(x.shape[-2:])
        with tracked_forward():
            x_tracked, sigma = x.clone(), timestep.clone()
            if self.reference is None:
                self.reference = self._reference(model_options, x_tracked)
            ref_feats, ref_mask = self.reference
            state = {}

            def features_fn(z):
                prediction, feats, attention = self._run(z, sigma, model_options, cond, stop=False)
                state["cond"], state["grid"] = prediction.detach(), tuple(feats.shape[-2:])
                return feats.flatten(2).transpose(1, 2), self._generation_mask(feats, attention, ref_feats, ref_mask)

            grad, score, _ = guidance_gradient(
                x_tracked, features_fn, ref_feats, ref_mask, self.settings.strength,
                latent_mask=lambda m: mask_to_latent(m, state["grid"], latent_hw).reshape(  # (B, 1, [1,] H, W):
                    m.shape[0], *([1] * (x.ndim - 3)), *latent_hw))                        # Qwen-Image's frame axis
        cfg1 = math.isclose(self.cfg, 1.0) and not model_options.get("disable_cfg1_optimization", False)
        uncond_ = None if cfg1 else uncond
        # as ComfyUI's sampling_function: at cfg 1 the unconditional prediction is calc_cond_batch's zeros
        uncond_pred = comfy.samplers.calc_cond_batch(self.inner_model, [uncond_], x, timestep, model_options)[0]
        out = [state["cond"].to(x.dtype), uncond_pred]
        for fn in model_options.get("sampler_pre_cfg_function", []):
            out = fn({"conds": [cond, uncond_], "conds_out": out, "cond_scale": self.cfg, "timestep": timestep,
                      "input": x, "sigma": timestep, "model": self.inner_model, "model_options": model_options})
        denoised = comfy.samplers.cfg_function(self.inner_model, out[0], out[1], self.cfg, x, timestep,
                                               model_options=model_options, cond=cond, uncond=uncond_)
        self.guided_steps += 1
        self.last_score = score
        scales = latent_scales(self.inner_model.model_sampling, timestep, denoised)
        require_finite(grad, f"RB-Guidance's energy gradient at sigma {float(timestep.reshape(-1)[0]):.4g}")
        return apply_guidance(denoised, grad.to(denoised.device), scales)
