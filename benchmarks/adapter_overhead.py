"""Sampling time and peak memory with an identity adapter over without: same model, same run.

Builds ComfyUI's SD1.5 UNet (the real architecture: 16 cross-attention layers; random
weights, so only cost is meaningful), and samples with ComfyUI's own sampler (euler,
CFG, both branches) plain and with an Omni-ID adapter (256 identity tokens of width
1280 on every cross-attention layer), alternating the two. Needs ComfyUI: run it with
the Python that runs ComfyUI, or it re-runs itself with $COMFYUI_PATH's.

    .venv/bin/python benchmarks/adapter_overhead.py            # 512 x 512, 8 steps, 3 repeats
    .venv/bin/python benchmarks/adapter_overhead.py --quick    # 192 x 192, 2 steps, under a minute

Memory: on a GPU the peak of torch.cuda.max_memory_allocated; on the CPU the peak resident
set size of this process, sampled every 2 ms. Last line: RESULT {json}.
"""
from __future__ import annotations

import sd15_harness as harness


def main() -> None:
    args = harness.parse_args(__doc__.splitlines()[0], quick=(192, 2, 2), full=(512, 8, 3),
                              add_arguments=lambda parser: parser.add_argument("--identity-tokens", type=int, default=256))
    size, steps, repeats = args.size, args.steps, args.repeats

    torch = harness.setup_comfyui()
    from omniid.encoders.embeds import IdentityEmbeds
    from omniid.guidance.adapter import AdapterConfig, create_adapter
    from omniid.comfy_host.identity import apply_identity
    from omniid.comfy_host.layers import unet_layers

    model, sample, device = harness.build_sd15(torch, size)
    layers = unet_layers(model)
    adapter = create_adapter(AdapterConfig(family="unet", token_dim=1280, layer_dims=tuple(l.inner_dim for l in layers)),
                             seed=1)
    tokens = torch.randn(args.identity_tokens, 1280, generator=torch.Generator().manual_seed(3))
    embeds = IdentityEmbeds("omni_id", {"tokens": tokens}, {"num_images": 1})
    patched = apply_identity(model, adapter, adapter.identity_tokens(embeds), 1.0, 0.0, 1.0)
    print(f"SD1.5 UNet ({len(layers)} cross-attention layers), {size} x {size}, {steps} euler steps with CFG, "
          f"{args.identity_tokens} identity tokens; device {device}, {torch.get_num_threads()} threads, {harness.attention_backend()}", flush=True)
    result = harness.compare(lambda: sample(model, steps), lambda: sample(patched, steps), repeats,
                             device, names=("plain", "adapter"))
    harness.report(result, 1.10, {"size": size, "steps": steps, "identity_tokens": args.identity_tokens,
                                  "device": str(device), "attention": harness.attention_backend(), "quick": args.quick})


if __name__ == "__main__":
    main()
