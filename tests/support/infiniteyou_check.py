"""InfiniteYou in ComfyUI's FLUX against the authors' pipeline, on identical random weights (needs ComfyUI
importable: tests/comfy/infiniteyou_inprocess.py, benchmarks/compat.py).

- a small FLUX.1-dev as diffusers' FluxTransformer2DModel (the authors' pipeline's model) and the same
  weights in ComfyUI's FLUX (support.flux_layout); a small InfuseNet as diffusers' FluxControlNetModel
  (the published layout) and the same state dict in ComfyUI's ``ControlNetFlux``, configured by ComfyUI's
  detection with the sizes the weights fix (as ComfyUI's loader builds it, whose detection fixes FLUX.1's
  width on 0.3.64); the authors' Resampler (their ``pipelines/resampler.py``) and the pack's reading of
  its state dict;
- ``block_check``: every FLUX block's InfuseNet residual from the pack's control object vs the authors'
  InfuseNet call (their arguments: identity tokens as context, guidance 1, the scale) mapped by
  diffusers' block rule;
- ``step_check``: whole denoising runs (two Euler steps) of the authors' ``FluxInfuseNetPipeline.__call__``
  vs ComfyUI's sampler with the pack's conditioning; the control image's VAE encoding is a stand-in on both
  sides (the same latent: ComfyUI encodes with the posterior mean, diffusers samples it).
"""
from __future__ import annotations

import functools
from types import SimpleNamespace

import torch

FLUX = dict(heads=4, head_dim=16, depth=3, single=3, text=40, pooled=32)
NET = dict(depth=2, single=2)
AXES = (4, 6, 6)
LATENT = 8
TEXT = 7
GUIDANCE = 3.5
SHIFT, SCALE = 0.1159, 0.3611         # FLUX's autoencoder latent shift and scale (ComfyUI's latent format)


def pack(x):
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def image_ids(h: int, w: int):
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None]
    return ids.reshape(-1, 3)


@functools.lru_cache(maxsize=None)
def models(seed: int = 0):
    """(diffusers transformer, diffusers InfuseNet, their Resampler, ComfyUI FLUX, ComfyUI InfuseNet control,
    the pack's Resampler)."""
    import comfy.model_detection
    from diffusers import FluxControlNetModel, FluxTransformer2DModel
    from omniid.encoders import infiniteyou as IY
    from .flux_layout import comfy_flux
    from .infiniteyou_reference import TINY, randomise, reference_resampler

    common = dict(patch_size=1, in_channels=64, attention_head_dim=FLUX["head_dim"], num_attention_heads=FLUX["heads"],
                  pooled_projection_dim=FLUX["pooled"], guidance_embeds=True, axes_dims_rope=AXES)
    transformer = randomise(FluxTransformer2DModel(num_layers=FLUX["depth"], num_single_layers=FLUX["single"],
                                                   joint_attention_dim=FLUX["text"], **common), seed + 1)
    infusenet = randomise(FluxControlNetModel(num_layers=NET["depth"], num_single_layers=NET["single"],
                                              joint_attention_dim=TINY["output_dim"], **common), seed + 2)
    resampler, proj_state = reference_resampler(seed + 3)
    state = comfy.model_detection.convert_diffusers_mmdit({k: v.clone() for k, v in transformer.state_dict().items()}, "")
    flux = comfy_flux(state, FLUX["heads"], AXES)
    control = comfy_infusenet({k: v.clone() for k, v in infusenet.state_dict().items()})
    return transformer, infusenet, resampler, flux, control, IY.load_state(proj_state, "tiny_image_proj")


def comfy_infusenet(sd: dict):
    """ComfyUI's ControlNet of a diffusers-layout FLUX ControlNet, built as ``load_controlnet_flux_instantx``
    builds it, with the widths, heads and rotary split taken from the weights."""
    import comfy.controlnet
    import comfy.latent_formats
    import comfy.ldm.flux.controlnet
    import comfy.model_detection
    import comfy.ops

    new_sd = comfy.model_detection.convert_diffusers_mmdit(sd, "")
    config = comfy.model_detection.detect_unet_config(new_sd, "")
    hidden = new_sd["img_in.weight"].shape[0]
    config.update(hidden_size=hidden, num_heads=FLUX["heads"], axes_dim=list(AXES), mlp_ratio=4.0,
                  context_in_dim=new_sd["txt_in.weight"].shape[1], vec_in_dim=new_sd["vector_in.in_layer.weight"].shape[1],
                  guidance_embed="guidance_in.in_layer.weight" in new_sd)
    for k in sd:
        new_sd[k] = sd[k]
    cpu = torch.device("cpu")
    model = comfy.ldm.flux.controlnet.ControlNetFlux(
        latent_input=True, num_union_modes=0, control_latent_channels=new_sd["pos_embed_input.weight"].shape[1] // 4,
        operations=comfy.ops.disable_weight_init, device=cpu, dtype=torch.float32, **config)
    model = comfy.controlnet.controlnet_load_state_dict(model, new_sd)
    return comfy.controlnet.ControlNet(model, compression_ratio=1, latent_format=comfy.latent_formats.Flux(),
                                       load_device=cpu, manual_cast_dtype=None, extra_conds=["y", "guidance"])


class LatentVAE:
    """A VAE stand-in for ComfyUI's ControlNet: the control image encodes to ``latent``."""

    def __init__(self, latent):
        self.latent = latent

    def spacial_compression_encode(self):
        return 8

    def encode(self, pixels):
        return self.latent.clone()


class DiffusersLatentVAE(torch.nn.Module):
    """The same stand-in for the authors' pipeline: ``encode(image).latent_dist.sample()`` is ``latent``."""

    def __init__(self, latent):
        super().__init__()
        self.latent = latent
        self.anchor = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(block_out_channels=[1, 1, 1, 1], shift_factor=SHIFT, scaling_factor=SCALE,
                                      latent_channels=16)

    @property
    def device(self):
        return self.anchor.device

    @property
    def dtype(self):
        return self.anchor.dtype

    def encode(self, image):
        return SimpleNamespace(latent_dist=SimpleNamespace(sample=lambda *a, **k: self.latent.clone()))


def inputs(seed: int):
    g = torch.Generator().manual_seed(seed + 40)
    return SimpleNamespace(noise=torch.randn(1, 16, LATENT, LATENT, generator=g),
                           context=torch.randn(1, TEXT, FLUX["text"], generator=g),
                           pooled=torch.randn(1, FLUX["pooled"], generator=g),
                           control=torch.randn(1, 16, LATENT, LATENT, generator=g) * 2.0)


def block_check(seed: int = 0, scale: float = 0.8, sigma: float = 0.7) -> dict:
    """Max relative difference over FLUX's blocks of the InfuseNet residual each receives, and the tokens'."""
    from omniid.comfy_host.infiniteyou import InfuseNetControl
    from omniid.encoders.infiniteyou import identity_tokens
    from omniid.guidance.infiniteyou import sample_index
    from .infiniteyou_reference import arcface, relative

    transformer, infusenet, resampler, flux, control, projection = models(0)
    data = inputs(seed)
    embeds = arcface(1, seed + 50)
    with torch.no_grad():
        their_tokens = resampler(embeds[:, None])
    tokens = identity_tokens(projection, embeds)
    ours = InfuseNetControl.of(control, tokens).set_cond_hint(torch.zeros(1, 3, 64, 64), scale, (0.0, 1.0),
                                                              vae=LatentVAE(data.control))
    ms = flux.model.model_sampling
    ours.pre_run(flux.model, lambda p: ms.percent_to_sigma(p))
    t = torch.tensor([sigma])
    got = ours.get_control(data.noise, t, {"c_crossattn": data.context, "y": data.pooled,
                                           "guidance": torch.tensor([GUIDANCE])}, 1, {})
    ours.cleanup()
    with torch.no_grad():
        double, single = infusenet(hidden_states=pack(data.noise), controlnet_cond=pack((data.control - SHIFT) * SCALE),
                                   conditioning_scale=scale, timestep=t, guidance=torch.tensor([1.0]),
                                   pooled_projections=data.pooled, encoder_hidden_states=their_tokens,
                                   txt_ids=torch.zeros(their_tokens.shape[1], 3), img_ids=image_ids(LATENT, LATENT),
                                   return_dict=False)
    worst = 0.0
    for key, samples, blocks in (("input", double, FLUX["depth"]), ("output", single, FLUX["single"])):
        if len(got[key]) < blocks:
            return {"difference": float("inf"), "tokens": relative(tokens, their_tokens), "reason": f"{key} short"}
        for i in range(blocks):
            worst = max(worst, relative(got[key][i], samples[sample_index(i, blocks, len(samples))]))
    return {"difference": worst, "tokens": relative(tokens, their_tokens),
            "residual_scale": float(double[0].abs().max() / pack(data.noise).abs().max())}


def step_check(seed: int = 0) -> dict:
    """{"cases": {name: max relative difference of the latent after two Euler steps}, "effect": {name: how much
    InfuseNet changes the authors' result}, "difference", "effect_min"}."""
    import comfy.sample
    import comfy.samplers
    from diffusers import FlowMatchEulerDiscreteScheduler
    from omniid.comfy_host.infiniteyou import InfuseNetControl, with_infusenet
    from omniid.encoders.infiniteyou import identity_tokens
    from .infiniteyou_reference import arcface, reference_module, relative

    transformer, infusenet, resampler, flux, control, projection = models(0)
    pipelines = reference_module("pipelines.pipeline_flux_infusenet")
    data = inputs(seed)
    embeds = arcface(1, seed + 60)
    with torch.no_grad():
        their_tokens = resampler(embeds[:, None])
    tokens = identity_tokens(projection, embeds)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = pipelines.FluxInfuseNetPipeline(scheduler=scheduler, vae=DiffusersLatentVAE(data.control), text_encoder=None,
                                           tokenizer=None, text_encoder_2=None, tokenizer_2=None,
                                           transformer=transformer, controlnet=infusenet)
    pipe.set_progress_bar_config(disable=True)
    start = {}

    def authors(scale, begin, end, latents):
        out = pipe(prompt_embeds=data.context, pooled_prompt_embeds=data.pooled, controlnet_prompt_embeds=their_tokens,
                   control_image=torch.zeros(1, 3, LATENT * 8, LATENT * 8), height=LATENT * 8, width=LATENT * 8,
                   num_inference_steps=2, guidance_scale=GUIDANCE, controlnet_guidance_scale=1.0,
                   controlnet_conditioning_scale=scale, control_guidance_start=begin, control_guidance_end=end,
                   latents=latents, output_type="latent", return_dict=False)[0]
        return out, pipe.scheduler.sigmas.clone()

    _, sigmas = authors(1.0, 0.0, 1.0, pack(data.noise))      # the schedule the pipeline makes
    unscale = flux.model.model_sampling.inverse_noise_scaling(sigmas[-1:], torch.ones(1, 1, 1, 1))

    def comfy_run(scale, begin, end):
        positive = [[data.context, {"pooled_output": data.pooled, "guidance": GUIDANCE}]]
        positive = with_infusenet(positive, InfuseNetControl.of(control, tokens, begin, end),
                                  torch.zeros(1, 3, LATENT * 8, LATENT * 8), scale, LatentVAE(data.control))

        def seen(step, x0, x, total):
            start.setdefault("x", x.clone())
        out = comfy.sample.sample_custom(flux, data.noise, 1.0, comfy.samplers.sampler_object("euler"), sigmas,
                                         positive, positive, torch.zeros(1, 16, LATENT, LATENT), callback=seen,
                                         disable_pbar=True, seed=0)
        return pack(flux.model.process_latent_in(out) / unscale)

    cases, effects = {}, {}
    for name, scale, begin, end in (("scale1_steps0-1", 1.0, 0.0, 1.0), ("scale0.8_start0.5", 0.8, 0.5, 1.0),
                                    ("scale1.2_end0.5", 1.2, 0.0, 0.5)):
        start.clear()
        ours = comfy_run(scale, begin, end)
        expected, _ = authors(scale, begin, end, pack(start["x"]))
        plain, _ = authors(0.0, begin, end, pack(start["x"]))
        cases[name] = relative(ours, expected)
        effects[name] = relative(plain, expected)
    return {"cases": cases, "effect": effects, "difference": max(cases.values()), "effect_min": min(effects.values()),
            "sigmas": [round(float(s), 6) for s in sigmas]}
