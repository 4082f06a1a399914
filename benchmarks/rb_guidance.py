"""RB-Guidance: full-schedule sampling time and peak memory over plain CFG, same model, same run.

ComfyUI's SD1.5 UNet (random weights) sampled by ComfyUI's euler sampler through two guiders:
ComfyUI's CFGGuider, and the RB-Guidance guider with the paper's settings and masks (p = 8.5,
u = 0.6, t0 = 671, DIFT features at output block 6, the generated face's mask from the subject
token's cross-attention refined by self-attention at 1/4 of the latent, the reference's face mask
given). In the guided steps (t <= 0.6 T) each step's conditional pass is the tracked one (weight
copies, attention maps) plus its backward to the latent. Goals: ratio <= 1.5, memory <= 1.6.
Needs ComfyUI (re-runs itself with the Python setup recorded for it).

    .venv/bin/python benchmarks/rb_guidance.py            # 512 x 512, 10 steps, 2 repeats
    .venv/bin/python benchmarks/rb_guidance.py --quick    # 128 x 128, 4 steps, under a minute

Last line: RESULT {json}.
"""
from __future__ import annotations

import sd15_harness as harness


def main() -> None:
    args = harness.parse_args(__doc__.splitlines()[0], quick=(128, 4, 1), full=(512, 10, 2),
                              add_arguments=None)
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


if __name__ == "__main__":
    main()
