"""RB-Guidance: full-schedule sampling time and peak memory over plain CFG, same model, same run.

--family sd15 (the default):

ComfyUI's SD1.5 UNet (random weights) sampled by ComfyUI's euler sampler through two guiders:
ComfyUI's CFGGuider, and the RB-Guidance guider with the paper's settings and masks (p = 8.5,
u = 0.6, t0 = 671, DIFT features at output block 6, the generated face's mask from the subject
token's cross-attention refined by self-attention at 1/4 of the latent, the reference's face mask
given). In the guided steps (t <= 0.6 T) each step's conditional pass is the tracked one (graph to
the feature block, attention maps) plus its backward to the latent. Goals: ratio <= 1.5, memory <= 1.6.

--family flux: a FLUX.1-dev-shaped DiT (random weights in FLUX.1's published layout, configured by
ComfyUI's detection; full size: width 3072, 24 heads, 19 double + 38 single blocks, bfloat16 on a GPU;
--quick: width 256, 4 heads, 4 double + 8 single blocks; --double-blocks N: full width with N double and
2N single blocks, the full model's block shapes and proportions (the default feature block, the last
double one, sits at the same share of the forward) where the full 12B model does not fit in memory) sampled by euler at cfg 1 with FLUX's
guidance embedding, as FLUX.1 dev is sampled (one model pass per plain step), through ComfyUI's
CFGGuider and through RB-Guidance with the paper's settings (features at the family's default block,
the subject mask from the joint attention, the reference's face mask given). Goals: time <= 1.5,
memory <= 1.3.
Needs ComfyUI (re-runs itself with the Python setup recorded for it).

    .venv/bin/python benchmarks/rb_guidance.py            # 512 x 512, 10 steps, 2 repeats
    .venv/bin/python benchmarks/rb_guidance.py --quick    # 128 x 128, 4 steps, under a minute
    .venv/bin/python benchmarks/rb_guidance.py --family flux           # 512 x 512, 10 steps, 2 repeats
    .venv/bin/python benchmarks/rb_guidance.py --family flux --quick   # 256 x 256, 8 steps, 3 repeats
    .venv/bin/python benchmarks/rb_guidance.py --family flux --double-blocks 1   # full width, 1 + 2 blocks

Last line: RESULT {json}.
"""
from __future__ import annotations

import sd15_harness as harness

FLUX_FULL = dict(hidden=3072, heads=24, depth=19, single=38, axes=(16, 56, 56))
FLUX_QUICK = dict(hidden=256, heads=4, depth=4, single=8, axes=(8, 28, 28))


def family_argument(parser) -> None:
    parser.add_argument("--family", choices=("sd15", "flux"), default="sd15", help="the model to sample")
    parser.add_argument("--double-blocks", type=int,
                        help="flux at full width with this many double blocks and twice as many single ones "
                             "(FLUX.1 has 19 and 38): the full-size model's per-block cost where it does not fit")


def main() -> None:
    import argparse
    pre = argparse.ArgumentParser(add_help=False)
    family_argument(pre)
    family = pre.parse_known_args()[0].family
    quick, full = ((256, 8, 3), (512, 10, 2)) if family == "flux" else ((128, 4, 1), (512, 10, 2))
    args = harness.parse_args(__doc__.splitlines()[0], quick=quick, full=full, add_arguments=family_argument)
    if args.family == "flux":
        return flux(args)
    size, steps, repeats = args.size, args.steps, args.repeats

    torch = harness.setup_comfyui()
    import comfy.samplers
    from omniid.guidance.rb_guidance import RBSettings
    from omniid.comfy_host.gradients import gradient_ready
    from omniid.comfy_host.rb_guider import RBGuider

    model, sample, device = harness.build_sd15(torch, size)
    inputs = sample.inputs
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "normal", steps)
    sampler = comfy.samplers.sampler_object("euler")
    latent = inputs["latent"]
    reference = torch.randn(1, 4, size // 8, size // 8, generator=torch.Generator().manual_seed(4)) * 0.5
    face = torch.zeros(1, size, size)
    face[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0

    def guided(guider):
        guider.set_conds(inputs["positive"], inputs["negative"])
        guider.set_cfg(5.0)
        return lambda: guider.sample(inputs["noise"], latent, sampler, sigmas, disable_pbar=True, seed=2)

    cfg = guided(comfy.samplers.CFGGuider(model))
    rb_guider = RBGuider(gradient_ready(model), RBSettings(), reference, face, None, feature_block=6,
                         subject_token=5, seed=0)
    rb = guided(rb_guider)
    guided_steps = sum(1 for s in sigmas[:-1] if float(sampling.timestep(s)) <= 600.0)
    print(f"SD1.5 UNet, {size} x {size}, {steps} euler steps with CFG ({guided_steps} guided); device {device}, "
          f"{torch.get_num_threads()} threads, {harness.attention_backend()}", flush=True)
    result = harness.compare(cfg, rb, repeats, device, names=("cfg", "rb"))
    harness.report(result, 1.5, {"memory_goal": 1.6, "size": size, "steps": steps, "guided_steps": guided_steps,
                                 "device": str(device), "attention": harness.attention_backend(),
                                 "quick": args.quick})


def flux(args) -> None:
    import support_path  # noqa: F401  (tests/support: the FLUX.1 layout)
    torch = harness.setup_comfyui()
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.samplers
    from omniid.comfy_host.gradients import gradient_ready
    from omniid.comfy_host.rb_guider import RBGuider
    from omniid.guidance.rb_guidance import RBSettings
    from support.flux_layout import comfy_flux, flux_state_dict

    shape = dict(FLUX_QUICK if args.quick else FLUX_FULL)
    if args.double_blocks:
        shape.update(depth=args.double_blocks, single=2 * args.double_blocks)
    size, steps, repeats = args.size, args.steps, args.repeats
    device = mm.get_torch_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    layout = {k: v for k, v in shape.items() if k != "axes"}
    with torch.inference_mode():                                   # as ComfyUI's loaders run
        cpu_model = comfy_flux(flux_state_dict(seed=0, dtype=dtype, **layout), shape["heads"], shape["axes"], dtype)
    model = comfy.model_patcher.ModelPatcher(cpu_model.model, load_device=device, offload_device=torch.device("cpu"))
    g = torch.Generator().manual_seed(1)
    positive = [[torch.randn(1, 256, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g),
                                                          "guidance": 3.5}]]
    latent = torch.zeros(1, 16, size // 8, size // 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(2))
    reference = torch.randn(latent.shape, generator=torch.Generator().manual_seed(4))
    face = torch.zeros(1, size, size)
    face[:, size // 4: 3 * size // 4, size // 4: 3 * size // 4] = 1.0
    sampling = model.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, "simple", steps)
    sampler = comfy.samplers.sampler_object("euler")

    def guided(guider):
        guider.set_conds(positive, positive)
        guider.set_cfg(1.0)
        return lambda: guider.sample(noise, latent, sampler, sigmas, disable_pbar=True, seed=2)

    rb_guider = RBGuider(gradient_ready(model), RBSettings(), reference, face, None, feature_block=0,
                         subject_token=5, seed=0)
    guided_steps = sum(1 for s in sigmas[:-1] if 1000.0 * float(s) <= 600.0)
    print(f"FLUX.1-dev-shaped DiT (width {shape['hidden']}, {shape['depth']} double + {shape['single']} single "
          f"blocks, {dtype}), {size} x {size}, {steps} euler steps at cfg 1 ({guided_steps} guided), features at "
          f"block {rb_guider.feature_block}; device {device}, {torch.get_num_threads()} threads, "
          f"{harness.attention_backend()}", flush=True)
    result = harness.compare(guided(comfy.samplers.CFGGuider(model)), guided(rb_guider), repeats, device,
                             names=("cfg", "rb"))
    harness.report(result, 1.5, {"family": "flux", "memory_goal": 1.3, "size": size, "steps": steps,
                                 "width": shape["hidden"], "double_blocks": shape["depth"],
                                 "single_blocks": shape["single"],
                                 "guided_steps": guided_steps, "feature_block": rb_guider.feature_block,
                                 "device": str(device), "attention": harness.attention_backend(),
                                 "quick": args.quick})


if __name__ == "__main__":
    main()
