"""Infinite-ID mixed attention: sampling time and peak memory over plain sampling, same model, same run.

ComfyUI's SD1.5 UNet (random weights) sampled with ComfyUI's sampler (euler, CFG) plain and
with Mixed Attention + AdaIN-mean (identity and text streams in one batched call; the
identity stream's self-attention also attends to the text stream's keys/values; a
256-token identity adapter on every cross-attention layer), in both forms of the text
stream: its own trajectory (the paper; the sampler carries a second latent, every row of
both streams runs: 2.0 is the floor) and the shared latent (the text stream re-run on the
identity latent; with the adapter's zero unconditional tokens only its conditional rows
run: 1.5 is the floor). Goal for each: <= 2.05. Needs ComfyUI (re-runs itself with the
Python setup recorded for it).

    .venv/bin/python benchmarks/mixed_attention.py            # 512 x 512, 8 steps, 3 repeats
    .venv/bin/python benchmarks/mixed_attention.py --quick    # 192 x 192, 2 steps, under a minute
    .venv/bin/python benchmarks/mixed_attention.py --floor    # also plain sampling of two latents (4 rows):
                                                              # the two-forward floor, measured, same run
    .venv/bin/python benchmarks/mixed_attention.py --flops    # no timing: the FLOPs of one step of plain
                                                              # sampling, two latents and the own trajectory

Last line: RESULT {json}.
"""
from __future__ import annotations

import sd15_harness as harness


def add_arguments(parser) -> None:
    parser.add_argument("--floor", action="store_true",
                        help="also time plain sampling of two latents: two full forward passes per step")
    parser.add_argument("--flops", action="store_true",
                        help="count the FLOPs of one sampling step of each form instead of timing")


def count_flops(torch, runs: dict) -> None:
    """FLOPs of one sampling step of each run (torch's FlopCounterMode; ComfyUI's CPU attention op
    counted with torch's own SDPA formula), and their ratio to the first."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = (
            lambda q, k, v, *args, out_shape=None, **kwargs: sdpa_flop(q, k, v))
    first = None
    for name, run in runs.items():
        counter = FlopCounterMode(display=False, custom_mapping=mapping)
        with counter:
            run()
        counts = counter.get_flop_counts()["Global"]
        total = sum(counts.values())
        attention = sum(v for k, v in counts.items() if "scaled_dot_product" in str(k))
        first = first or total
        print(f"  {name}: {total / 1e12:.4f} TFLOP per step ({total / first:.4f} x plain), attention "
              f"{attention / 1e12:.4f} TFLOP ({attention / total:.1%})", flush=True)


def main() -> None:
    args = harness.parse_args(__doc__.splitlines()[0], quick=(192, 2, 2), full=(512, 8, 3),
                              add_arguments=add_arguments)
    size, steps, repeats = args.size, args.steps, args.repeats

    torch = harness.setup_comfyui()
    from omniid.encoders.embeds import IdentityEmbeds
    from omniid.guidance.adapter import AdapterConfig, create_adapter
    from omniid.guidance.infinite_id import AdaINSettings
    from omniid.comfy_host.layers import unet_layers
    from omniid.comfy_host.two_streams import apply_mixed_attention, set_adain

    model, sample, device = harness.build_sd15(torch, size)
    layers = unet_layers(model)
    adapter = create_adapter(AdapterConfig(family="unet", token_dim=1280, layer_dims=tuple(l.inner_dim for l in layers)),
                             seed=1)
    tokens = torch.randn(256, 1280, generator=torch.Generator().manual_seed(3))
    embeds = IdentityEmbeds("omni_id", {"tokens": tokens}, {"num_images": 1})
    forms = {form: set_adain(apply_mixed_attention(model, adapter, adapter.identity_tokens(embeds), 1.0, 0.0, 1.0,
                                                   text_stream=form), AdaINSettings(1.0))
             for form in ("own trajectory", "shared latent")}
    print(f"SD1.5 UNet ({len(layers)} transformer blocks), {size} x {size}, {steps} euler steps with CFG; "
          f"plain vs Mixed Attention + AdaIN-mean; device {device}, {torch.get_num_threads()} threads, "
          f"{harness.attention_backend()}", flush=True)
    import comfy.sample
    inputs = sample.inputs
    noise2, latent2 = (torch.cat([inputs[name]] * 2) for name in ("noise", "latent"))

    def two_latents(n: int):
        """Plain sampling of two latents: the own trajectory's four rows per call, plain attention."""
        return comfy.sample.sample(model, noise2, n, 5.0, "euler", "normal", inputs["positive"], inputs["negative"],
                                   latent2, disable_pbar=True, seed=2)

    if args.flops:
        count_flops(torch, {"plain": lambda: sample(model, 1), "two latents (the floor)": lambda: two_latents(1),
                            **{form: (lambda m=m: sample(m, 1)) for form, m in forms.items()}})
        return
    results = {}
    for form, two_streams in forms.items():
        print(f"text stream: {form}", flush=True)
        results[form] = harness.compare(lambda: sample(model, steps), lambda m=two_streams: sample(m, steps),
                                        repeats, device, names=("plain", "mixed"))
        print(f"  {form}: time ratio {results[form]['ratio']:.3f}, peak memory ratio "
              f"{results[form]['peak_mem_ratio']:.3f} (goal <= 2.05)", flush=True)
    floor = {}
    if args.floor:
        print("floor: plain sampling of two latents (the own trajectory's rows, plain attention)", flush=True)
        measured = harness.compare(lambda: sample(model, steps), lambda: two_latents(steps), repeats, device,
                                   names=("plain", "floor"))
        print(f"  floor: time ratio {measured['ratio']:.3f}; own trajectory / floor "
              f"{results['own trajectory']['ratio'] / measured['ratio']:.3f}", flush=True)
        floor = {"floor_ratio": measured["ratio"],
                 "own_over_floor": results["own trajectory"]["ratio"] / measured["ratio"]}
    own, shared = results["own trajectory"], results["shared latent"]
    harness.report(own, 2.05, {**floor, "shared_latent_ratio": shared["ratio"],
                               "shared_latent_peak_mem_ratio": shared["peak_mem_ratio"], "size": size,
                               "steps": steps, "device": str(device), "attention": harness.attention_backend(),
                               "quick": args.quick})


if __name__ == "__main__":
    main()
