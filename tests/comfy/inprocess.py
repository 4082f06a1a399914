"""Checks that need ComfyUI's model classes in process: run with the Python that runs ComfyUI.

    python tests/comfy/inprocess.py --comfyui /opt/ComfyUI

- FLUX: ComfyUI's FLUX model, small random FLUX.1-layout weights loaded through ComfyUI's
  detection (support.flux_layout), sampled with ComfyUI's own sampler (CFG, so both branches run), plain and with
  identity adapters;
- UNet layouts: the cross-attention layers the adapter host finds in the real SD1.5 and
  SDXL UNets (built on the meta device), which h94 checkpoints number 1, 3, 5, ...
- Infinite-ID's two streams on a small SD1.5-layout UNet: with zero unconditional identity
  tokens, the reduced batch (text stream on the conditional rows only) samples the same
  latents as the full one.
- RB-Guidance's guider on that UNet: p = 0 reproduces ComfyUI's CFGGuider bit-exactly; with
  p > 0 the guided steps are exactly those with t <= u T, and the reference features are
  computed once per sampling run.
Prints one JSON line of facts that tests/comfy/test_inprocess.py asserts.
"""
from __future__ import annotations

import json

import comfy_process

# a FLUX.1 schnell-layout model, small: built from weights through ComfyUI's detection (support.flux_layout)
FLUX_LAYOUT = dict(hidden=64, heads=4, depth=2, single=2, context=48, vec=32, guidance=False, mlp_ratio=2.0)
FLUX_AXES = (4, 6, 6)


SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2, 2],
                 channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
                 transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0], transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
                 transformer_depth_middle=1, context_dim=768, use_linear_in_transformer=False, legacy=False)
SDXL_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[2, 2, 2], channel_mult=[1, 2, 4],
                 num_head_channels=64, use_spatial_transformer=True, transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
                 context_dim=2048, use_linear_in_transformer=True, legacy=False, adm_in_channels=2816,
                 num_classes="sequential")


SMALL_SD15_UNET = dict(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
                       channel_mult=[1], num_heads=8, use_spatial_transformer=True, transformer_depth=[1],
                       transformer_depth_output=[1, 1], transformer_depth_middle=1, context_dim=768,
                       use_linear_in_transformer=False, legacy=False, adm_in_channels=None,
                       use_temporal_attention=False, use_temporal_resblock=False, use_checkpoint=False)


class MetaUNet:
    """A stand-in ModelPatcher holding a full-size UNet on the meta device (no memory used)."""

    def __init__(self, config):
        import torch
        import comfy.ops
        from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
        with torch.device("meta"):
            self.unet = UNetModel(**config, operations=comfy.ops.disable_weight_init)

    def get_model_object(self, name):
        return self.unet


def small_sd15(torch, seed: int):
    import comfy.model_patcher
    import comfy.supported_models
    config = comfy.supported_models.SD15(dict(SMALL_SD15_UNET))
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in base.diffusion_model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu), generator


def rb_facts(torch) -> dict:
    import comfy.samplers
    from omniid.guidance.rb_guidance import RBSettings
    from omniid.comfy_host.gradients import gradient_ready
    from omniid.comfy_host.rb_guider import RBGuider, latent_scales
    model, generator = small_sd15(torch, 8)
    positive = [[torch.randn(1, 5, 768, generator=generator), {}]]
    negative = [[torch.randn(1, 5, 768, generator=generator), {}]]
    latent = torch.zeros(1, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(9))
    reference = torch.randn(1, 4, 8, 8, generator=generator)
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", 6)
    sampler = comfy.samplers.sampler_object("euler")

    predictions = {}

    def run(guider):
        guider.set_conds(positive, negative)
        guider.set_cfg(5.0)
        steps = predictions[id(guider)] = []
        return guider.sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=9,
                             callback=lambda step, x0, x, total: steps.append(x0.clone()))

    def rb(strength):
        return RBGuider(gradient_ready(model), RBSettings(strength=strength), reference, None, None,
                        feature_block=1, subject_token=2, seed=0)

    cfg = comfy.samplers.CFGGuider(model)
    plain = run(cfg)
    off = run(rb(0.0))
    guider = rb(8.5)
    guided = run(guider)
    # per step, is the guided x0 prediction the plain one bit for bit (True before the window opens)
    same_prediction = [bool(torch.equal(a, b)) for a, b in zip(predictions[id(cfg)], predictions[id(guider)])]
    # at the first guided step x is still plain's, and E = p / (1 + S): the push on x0 is linear in p
    doubled = rb(17.0)
    run(doubled)
    first = same_prediction.index(False) if False in same_prediction else len(same_prediction) - 1
    push = predictions[id(guider)][first] - predictions[id(cfg)][first]
    push_doubled = predictions[id(doubled)][first] - predictions[id(cfg)][first]
    passes_after_first, steps_after_first = guider.reference_passes, guider.guided_steps
    run(guider)
    expected_steps = sum(1 for s in sigmas[:-1] if float(sampling.timestep(s)) <= 600.0)
    # the paper's z_t and eps read off each kind of model_sampling: SD's epsilon (and v), and FLUX's flow
    import comfy.model_sampling
    sigma = torch.tensor([1.7, 0.4])
    eps_scales = latent_scales(sampling, sigma, torch.zeros(2, 4, 2, 2))
    flow = type("Flow", (comfy.model_sampling.ModelSamplingFlux, comfy.model_sampling.CONST), {})()
    flow_scales = latent_scales(flow, torch.tensor([0.3]), torch.zeros(1, 16, 2, 2))
    scales = {"eps_input": eps_scales.input_scale.tolist(), "eps_x0_per_eps": eps_scales.x0_per_eps.tolist(),
              "eps_expected_input": (1 / (1 + sigma ** 2).sqrt()).tolist(), "eps_expected_x0": sigma.tolist(),
              "flow_input": flow_scales.input_scale.tolist(), "flow_x0_per_eps": flow_scales.x0_per_eps.tolist()}
    return {"p0_equal": bool(torch.equal(off, plain)), "guided_vs_plain": float((guided - plain).abs().max()),
            "scales": scales,
            "finite": bool(torch.isfinite(guided).all()), "reference_passes": [passes_after_first,
                                                                               guider.reference_passes],
            "guided_steps": steps_after_first, "expected_steps": expected_steps, "steps": len(sigmas) - 1,
            "same_prediction": same_prediction,
            "push": float(push.abs().max()), "x0_scale": float(predictions[id(cfg)][first].abs().max()),
            "push_doubled_vs_twice": float((push_doubled - 2 * push).abs().max()),
            "score": float(guider.last_score.mean()) if guider.last_score is not None else None}


def two_stream_facts(torch, comfy, apply_mixed_attention, unet_layers, TwoStreams, streams_key, create_adapter,
                     AdapterConfig, IdentityEmbeds) -> dict:
    import comfy.model_patcher
    import comfy.patcher_extension
    import comfy.sample
    import comfy.supported_models
    config = comfy.supported_models.SD15(dict(SMALL_SD15_UNET))
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    generator = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for param in base.diffusion_model.parameters():
            param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    cpu = torch.device("cpu")
    model = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)
    layers = unet_layers(model)
    adapter = create_adapter(AdapterConfig(family="unet", token_dim=32, layer_dims=tuple(l.inner_dim for l in layers)),
                             seed=6)
    embeds = IdentityEmbeds("omni_id", {"tokens": torch.randn(6, 32, generator=generator)}, {"num_images": 1})
    tokens = adapter.identity_tokens(embeds)
    reduced = apply_mixed_attention(model, adapter, tokens, 1.0, 0.0, 1.0, text_stream="shared latent")
    full = reduced.clone()
    full.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, streams_key)
    full.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, streams_key, TwoStreams(True))
    positive = [[torch.randn(1, 5, 768, generator=generator), {}]]
    negative = [[torch.randn(1, 5, 768, generator=generator), {}]]
    latent = torch.zeros(2, 4, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(7))

    def run(m):
        return comfy.sample.sample(m, noise, 3, 4.0, "euler", "normal", positive, negative, latent,
                                   disable_pbar=True, seed=7)

    plain, a, b = run(model), run(reduced), run(full)
    # the paper's form: the text stream is its own trajectory, from the same noise, sampled beside the identity
    own = apply_mixed_attention(model, adapter, tokens, 1.0, 0.0, 1.0)
    sampled = []

    def capture(executor, *args, **kwargs):        # inside the pack's OUTER_SAMPLE wrapper: sees both streams
        sampled.append(executor(*args, **kwargs))
        return sampled[-1]

    own.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "test_capture", capture)
    identity = run(own)
    both = sampled[-1]
    return {"reduced_vs_full": float((a - b).abs().max()), "mixed_vs_plain": float((a - plain).abs().max()),
            "scale": float(plain.abs().max()),
            "own_batch": [int(identity.shape[0]), int(both.shape[0])],
            "own_identity_rows_returned": bool(torch.equal(identity, both[:2])),
            "own_text_vs_plain": float((both[2:] - plain).abs().max()),
            "own_vs_shared": float((identity - a).abs().max())}


def token_cache_facts(torch) -> dict:
    """Photos' tokens stay cached while their CLIP vision model lives and go with it."""
    import gc
    from omniid.comfy_host import clip_vision as host

    class Reloaded:                                   # what ComfyUI's loader returns after an unload
        def encode_image(self, images, crop=True):
            tokens = images.mean((1, 2))[:, None, :].repeat(1, 5, 1)
            return {"penultimate_hidden_states": tokens, "last_hidden_state": tokens, "image_embeds": tokens[:, 0]}

    photos = torch.rand(3, 16, 16, 3, generator=torch.Generator().manual_seed(7))
    before = len(host.TOKEN_CACHE)
    first, second = host.ClipVision(Reloaded()), host.ClipVision(Reloaded())
    _, encoded_first = first.cached_tokens(photos)
    _, encoded_again = first.cached_tokens(photos)
    second.cached_tokens(photos[:1])
    held = len(host.TOKEN_CACHE) - before
    del first
    gc.collect()
    return {"encoded": [encoded_first, encoded_again], "held": held,
            "after_first_dies": len(host.TOKEN_CACHE) - before}


def missing_injection_point_errors(torch, patched, FluxBlockPatch, record_flux_call) -> list[str]:
    """What a FLUX model call says when ComfyUI skipped the block patches, or their attention override."""
    options = {"patches_replace": patched.model_options["transformer_options"]["patches_replace"]}
    x, context = torch.zeros(1, 16, 4, 4), torch.zeros(1, 3, 48)
    patch = next(iter(options["patches_replace"]["dit"].values()))
    errors = []

    def no_blocks(x, *args, **kwargs):
        return x

    def blocks_without_override(x, timestep, context, *args, transformer_options=None, **kwargs):
        patch({"img": x, "txt": context, "transformer_options": transformer_options},
              {"original_block": lambda args: {"img": args["img"], "txt": args["txt"]}})
        return x

    for executor in (no_blocks, blocks_without_override):
        try:
            record_flux_call(executor, x, torch.ones(1), context, transformer_options=dict(options))
            errors.append("")
        except RuntimeError as exc:
            errors.append(str(exc))
    return errors


def main() -> None:
    comfy_process.start()
    import torch
    import comfy
    import comfy.model_patcher
    import comfy.sample
    import comfy.supported_models

    from omniid.encoders.embeds import IdentityEmbeds
    from omniid.guidance.adapter import AdapterConfig, create_adapter
    from omniid.guidance.decoupled import BlockWeights
    from omniid.comfy_host.identity import FluxBlockPatch, apply_identity, record_flux_call
    from omniid.comfy_host.layers import flux_layers, unet_layers
    from omniid.comfy_host.two_streams import TwoStreams, apply_mixed_attention
    from omniid.guidance.infinite_id import STREAMS_KEY

    from support.flux_layout import comfy_flux, flux_state_dict

    torch.manual_seed(0)
    model = comfy_flux(flux_state_dict(seed=1, dtype=torch.float32, **FLUX_LAYOUT), FLUX_LAYOUT["heads"], FLUX_AXES)
    generator = torch.Generator().manual_seed(1)

    layers = flux_layers(model)
    adapter = create_adapter(AdapterConfig(family="flux", token_dim=16, layer_dims=tuple(l.inner_dim for l in layers)),
                             seed=2, name="tiny_flux_adapter")
    other = create_adapter(adapter.config, seed=3, name="second_flux_adapter")
    with torch.no_grad():
        for layer in (*adapter.layers, *other.layers):
            layer.to_v.weight.mul_(20.0)          # a visible effect from random weights in few steps
    embeds = IdentityEmbeds("omni_id", {"tokens": torch.randn(8, 16, generator=generator)}, {"num_images": 1})
    tokens, tokens2 = adapter.identity_tokens(embeds), other.identity_tokens(embeds)
    context = torch.randn(1, 7, 48, generator=generator)
    pooled = torch.randn(1, 32, generator=generator)
    positive = [[context, {"pooled_output": pooled}]]
    negative = [[torch.zeros_like(context), {"pooled_output": torch.zeros_like(pooled)}]]
    latent = torch.zeros(1, 16, 10, 14)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(4))

    def run(m):
        return comfy.sample.sample(m, noise, 3, 2.0, "euler", "simple", positive, negative, latent,
                                   disable_pbar=True, seed=4)

    def patched(weight=1.0, **options):
        return apply_identity(model, adapter, tokens, weight, 0.0, 1.0, **options)

    plain = run(model)
    both = run(patched())
    zero = run(patched(0.0))
    double = run(patched(inject="double"))
    single = run(patched(inject="single"))
    masked_out = run(patched(mask=torch.zeros(1, 80, 112)))
    no_blocks = run(patched(blocks=BlockWeights.parse("all=0")))
    chained = run(apply_identity(patched(), other, tokens2, 1.0, 0.0, 1.0))
    second_alone = run(apply_identity(model, other, tokens2, 1.0, 0.0, 1.0))
    reversed_chain = run(apply_identity(apply_identity(model, other, tokens2, 1.0, 0.0, 1.0), adapter, tokens, 1.0,
                                        0.0, 1.0))
    halves = run(apply_identity(patched(0.5), adapter, tokens, 0.5, 0.0, 1.0))
    plain_after = run(model)
    missing_points = missing_injection_point_errors(torch, patched(), FluxBlockPatch, record_flux_call)

    def differs(a, b):
        return float((a - b).abs().max())

    facts = {
        "layers": [list(l.key) for l in layers],
        "both_vs_plain": differs(both, plain),
        "zero_equal": bool(torch.equal(zero, plain)),
        "double_vs_plain": differs(double, plain),
        "single_vs_plain": differs(single, plain),
        "double_vs_single": differs(double, single),
        "masked_out_equal": bool(torch.equal(masked_out, plain)),
        "no_blocks_equal": bool(torch.equal(no_blocks, plain)),
        "chained_vs_first": differs(chained, both),
        "chained_vs_second": differs(chained, second_alone),
        "chained_vs_reversed": differs(chained, reversed_chain),
        "halves_vs_both": differs(halves, both),
        "scale": float(plain.abs().max()),
        "plain_after_equal": bool(torch.equal(plain_after, plain)),
        "missing_points": missing_points,
        "finite": bool(torch.isfinite(both).all()),
        "unet_layers": {name: [l.inner_dim for l in unet_layers(MetaUNet(config))]
                        for name, config in (("sd15", SD15_UNET), ("sdxl", SDXL_UNET))},
        "two_streams": two_stream_facts(torch, comfy, apply_mixed_attention, unet_layers, TwoStreams, STREAMS_KEY,
                                        create_adapter, AdapterConfig, IdentityEmbeds),
        "rb_guidance": rb_facts(torch),
        "token_cache": token_cache_facts(torch),
    }
    print(json.dumps(facts))


if __name__ == "__main__":
    main()
