"""RB-Guidance on DiTs: which block's image tokens to match, measured per block (FLUX.1, Qwen-Image, Z-Image).

For every block b (FLUX.1: double blocks, then single blocks; Qwen-Image: its MM-DiT blocks; Z-Image: its main
layers) of a DiT with random weights in the family's published layout (ComfyUI's detection), two figures:

- correspondence: a latent and the same latent shifted by 3 tokens across and 2 down, each noised with its
  own noise (the reference at t0 = 671, the other at t = 500), features taken at block b as RB-Guidance takes
  them; the share of tokens whose nearest feature (cosine) in the shifted latent is the true one. DIFT
  matching needs features that keep a token's content and place; random weights say nothing of semantics,
  only how much each block keeps of that.
- cost: a guided step's tracked pass to block b plus its backward, over one plain model pass (median of runs).

    .venv/bin/python benchmarks/rb_feature_blocks.py --quick                        # FLUX.1: width 256, 4 + 8 blocks
    .venv/bin/python benchmarks/rb_feature_blocks.py --quick --family qwen_image    # width 128, 12 blocks
    .venv/bin/python benchmarks/rb_feature_blocks.py --quick --family z_image       # width 1056, 8 main layers

(--quick: 256 px.) The last lines name the deepest block that keeps at least 80 % of the first block's
correspondence, and its share of the depth; then RESULT {json} with both figures per block.
"""
from __future__ import annotations

import json
import statistics
import time

import sd15_harness as harness

SHIFT = (2, 3)          # tokens down, across


KEEP = 0.8              # the default's rule: the deepest block keeping this share of the first block's correspondence


def family_argument(parser) -> None:
    parser.add_argument("--family", choices=("flux", "qwen_image", "z_image"), default="flux")


def fan_in_weights(state: dict, torch) -> dict:
    """FLUX's benchmark weights' rule on another layout (support.flux_layout.flux_state_dict): matrices ~ N(0,
    1/fan_in), norm scales 1, biases 0, seeded; diffusers' own initialisation leaves these DiTs' blocks near the
    identity (correspondence flat over depth), which says nothing of the blocks."""
    generator = torch.Generator().manual_seed(0)
    out = {}
    for key, value in state.items():
        if value.ndim >= 2:
            out[key] = torch.randn(value.shape, generator=generator) * value.shape[1] ** -0.5
        else:
            out[key] = torch.ones(value.shape) if key.endswith(".weight") else torch.zeros(value.shape)
    return out


def build(family: str, quick: bool, dtype, torch, g):
    """(ComfyUI model, conditioning drawn from ``g``, the latent's leading dimensions, description) for ``family``
    with random weights."""
    if family == "flux":
        from rb_guidance import FLUX_FULL, FLUX_QUICK
        from support.flux_layout import comfy_flux, flux_state_dict
        shape = FLUX_QUICK if quick else FLUX_FULL
        model = comfy_flux(flux_state_dict(seed=0, dtype=dtype, **{k: v for k, v in shape.items() if k != "axes"}),
                           shape["heads"], shape["axes"], dtype)
        cond = [[torch.randn(1, 64, 4096, generator=g), {"pooled_output": torch.randn(1, 768, generator=g),
                                                         "guidance": 3.5}]]
        return model, cond, (1, 16), f"FLUX.1-dev-shaped DiT (width {shape['hidden']})"
    torch.manual_seed(0)
    if family == "qwen_image":
        from diffusers import QwenImageTransformer2DModel
        from support.qwen_image_layout import comfy_qwen_image
        sizes = (dict(num_layers=12, attention_head_dim=32, num_attention_heads=4, joint_attention_dim=64,
                      axes_dims_rope=(8, 12, 12)) if quick else
                 dict(num_layers=60, attention_head_dim=128, num_attention_heads=24, joint_attention_dim=3584,
                      axes_dims_rope=(16, 56, 56)))
        transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, **sizes)
        model = comfy_qwen_image(fan_in_weights(transformer.state_dict(), torch), transformer.config, dtype)
        width, shape = transformer.config.num_attention_heads * transformer.config.attention_head_dim, (1, 16, 1)
    else:
        from diffusers import ZImageTransformer2DModel
        from support.z_image_layout import comfy_z_image
        sizes = (dict(dim=1056, n_layers=8, n_refiner_layers=1, n_heads=8, n_kv_heads=8, cap_feat_dim=64,
                      axes_dims=[36, 48, 48], axes_lens=[256, 64, 64]) if quick else
                 dict(dim=3840, n_layers=30, n_refiner_layers=2, n_heads=30, n_kv_heads=30, cap_feat_dim=2560,
                      axes_dims=[32, 48, 48], axes_lens=[1536, 512, 512]))
        transformer = ZImageTransformer2DModel(in_channels=16, **sizes)
        model = comfy_z_image(fan_in_weights(transformer.state_dict(), torch), transformer.config, dtype)
        width, shape = transformer.config.dim, (1, 16)
    text = transformer.config.joint_attention_dim if family == "qwen_image" else transformer.config.cap_feat_dim
    names = {"qwen_image": "Qwen-Image", "z_image": "Z-Image"}
    return model, [[torch.randn(1, 64, text, generator=g), {}]], shape, f"{names[family]}-shaped DiT (width {width})"


def main() -> None:
    args = harness.parse_args(__doc__.splitlines()[0], quick=(256, 1, 3), full=(512, 1, 3),
                              add_arguments=family_argument)
    import support_path  # noqa: F401
    torch = harness.setup_comfyui()
    import torch.nn.functional as F
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.samplers
    from omniid.comfy_host.gradients import gradient_ready, tracked_forward
    from omniid.comfy_host.rb_dit import dit_family, dit_run

    device = mm.get_torch_device()
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        cpu_model, cond, lead, description = build(args.family, args.quick, dtype, torch, g)
    model = gradient_ready(comfy.model_patcher.ModelPatcher(cpu_model.model, load_device=device,
                                                            offload_device=torch.device("cpu")))
    mm.load_models_gpu([model])
    family = dit_family(model)
    counts = family.counts(model.get_model_object("diffusion_model"))
    size = args.size // 8
    z = torch.randn(*lead, size, size, generator=g)
    shifted = torch.roll(z, (2 * SHIFT[0], 2 * SHIFT[1]), dims=(-2, -1))
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
    print(f"{description}, {family.describe(counts)}, {dtype}, {args.size} px; device {device}", flush=True)
    probe.sample(torch.zeros_like(z), z, comfy.samplers.sampler_object("euler"), torch.tensor([0.5, 0.0]),
                 disable_pbar=True, seed=0)
    first = results[1]["correspondence"]
    keeps = max(block for block, row in results.items() if row["correspondence"] >= KEEP * first)
    print(f"deepest block keeping {KEEP:.0%} of block 1's correspondence: {keeps} of {sum(counts)} "
          f"({results[keeps]['block']}), at {keeps / sum(counts):.2f} of the depth")
    print("RESULT " + json.dumps({"family": args.family, "blocks": results, "size": args.size, "quick": args.quick,
                                  "device": str(device), "keeps": keeps, "depth": sum(counts)}))


if __name__ == "__main__":
    main()
