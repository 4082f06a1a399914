"""RB-Guidance on DiTs: which block's image tokens to match, measured per block on a FLUX.1-shaped DiT.

For every block b (double blocks, then single blocks) of a FLUX.1-dev-shaped DiT with random weights in the
published layout (ComfyUI's detection; --quick: width 256, 4 double + 8 single blocks, 256 px), two figures:

- correspondence: a latent and the same latent shifted by 3 tokens across and 2 down, each noised with its
  own noise (the reference at t0 = 671, the other at t = 500), features taken at block b as RB-Guidance takes
  them; the share of tokens whose nearest feature (cosine) in the shifted latent is the true one. DIFT
  matching needs features that keep a token's content and place; random weights say nothing of semantics,
  only how much each block keeps of that.
- cost: a guided step's tracked pass to block b plus its backward, over one plain model pass (median of runs).

    .venv/bin/python benchmarks/rb_feature_blocks.py --quick

Last line: RESULT {json} with both figures per block.
"""
from __future__ import annotations

import json
import statistics
import time

import sd15_harness as harness

SHIFT = (2, 3)          # tokens down, across


def main() -> None:
    args = harness.parse_args(__doc__.splitlines()[0], quick=(256, 1, 3), full=(512, 1, 3))
    import support_path  # noqa: F401
    torch = harness.setup_comfyui()
    import torch.nn.functional as F
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.samplers
    from omniid.comfy_host.gradients import gradient_ready, tracked_forward
    from omniid.comfy_host.rb_dit import dit_family, dit_run
    from rb_guidance import FLUX_FULL, FLUX_QUICK
    from support.flux_layout import comfy_flux, flux_state_dict

    shape = FLUX_QUICK if args.quick else FLUX_FULL
    device = mm.get_torch_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    with torch.inference_mode():
        cpu_model = comfy_flux(flux_state_dict(seed=0, dtype=dtype, **{k: v for k, v in shape.items() if k != "axes"}),
                               shape["heads"], shape["axes"], dtype)
    model = gradient_ready(comfy.model_patcher.ModelPatcher(cpu_model.model, load_device=device,
                                                            offload_device=torch.device("cpu")))
    mm.load_models_gpu([model])
    family = dit_family(model)
    counts = family.counts(model.get_model_object("diffusion_model"))
    g = torch.Generator().manual_seed(1)
    cond = [[torch.randn(1, 64, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g),
                                                     "guidance": 3.5}]]
    size = args.size // 8
    z = torch.randn(1, 16, size, size, generator=g)
    shifted = torch.roll(z, (2 * SHIFT[0], 2 * SHIFT[1]), dims=(2, 3))
    noise_a, noise_b = torch.randn(z.shape, generator=g), torch.randn(z.shape, generator=g)
    grid = (size // 2, size // 2)
    rows = torch.arange(grid[0] * grid[1])
    truth = (((rows // grid[1]) + SHIFT[0]) % grid[0]) * grid[1] + ((rows % grid[1]) + SHIFT[1]) % grid[1]
    results = {}

    def timed(fn):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        return statistics.median(times)

    class Probe(comfy.samplers.CFGGuider):
        """Measures every block inside ComfyUI's sampling set-up (conditioning processed, model loaded)."""

        def predict_noise(self, x, timestep, model_options={}, seed=None, *more, **kwargs):
            sampling = self.inner_model.model_sampling
            positive = self.conds["positive"]
            s_ref, s_gen = torch.tensor([0.671], device=x.device), torch.tensor([0.5], device=x.device)
            ref_x = sampling.noise_scaling(s_ref, noise_a.to(x), z.to(x))
            gen_x = sampling.noise_scaling(s_gen, noise_b.to(x), shifted.to(x))

            def call(latent, sigma):
                return lambda options: comfy.samplers.calc_cond_batch(self.inner_model, [positive], latent, sigma,
                                                                      options)[0]

            def features(latent, sigma, block, stop=True):
                return dit_run(model, family, block, 3, latent, model_options, call(latent, sigma), stop)[1]

            with torch.no_grad():
                plain = timed(lambda: call(gen_x, s_gen)(model_options))
            for block in range(1, sum(counts) + 1):
                with torch.no_grad():
                    ref = features(ref_x, s_ref, block)[0].flatten(1).T.float()
                    gen = features(gen_x, s_gen, block)[0].flatten(1).T.float()
                similarity = F.normalize(ref, dim=-1) @ F.normalize(gen, dim=-1).T
                accuracy = float((similarity.argmax(-1).cpu() == truth).float().mean())

                def guided_pass():
                    with tracked_forward():
                        latent = gen_x.clone().requires_grad_(True)
                        torch.autograd.grad(features(latent, s_gen, block, stop=False).float().square().mean(), latent)

                cost = timed(guided_pass) / plain
                kind, index = family.block(block, counts)
                results[block] = {"block": f"{kind} {index}", "correspondence": round(accuracy, 3),
                                  "cost": round(cost, 2)}
                print(f"  block {block:2d} ({kind} {index}): correspondence {accuracy:.3f}, guided pass {cost:.2f} "
                      "x a plain pass", flush=True)
            return super().predict_noise(x, timestep, model_options, seed, *more, **kwargs)

    probe = Probe(model)
    probe.set_conds(cond, cond)
    probe.set_cfg(1.0)
    print(f"FLUX.1-dev-shaped DiT (width {shape['hidden']}, {counts[0]} double + {counts[1]} single blocks, {dtype}), "
          f"{args.size} px; device {device}", flush=True)
    probe.sample(torch.zeros_like(z), z, comfy.samplers.sampler_object("euler"), torch.tensor([0.5, 0.0]),
                 disable_pbar=True, seed=0)
    print("RESULT " + json.dumps({"family": "flux", "blocks": results, "size": args.size, "quick": args.quick,
                                  "device": str(device)}))


if __name__ == "__main__":
    main()
