"""Largest relative difference of the pack's IP-Adapter formats to their reference implementations.

For every format, a random checkpoint in the authors' key layout and dtype is read by the pack and
injected into ComfyUI's model (patches on a clone), and the same weights run in the reference:
diffusers' UNet2DConditionModel with h94's adapter loaded by diffusers' own reader (SD1.5 and
SDXL layouts), diffusers' FluxTransformer2DModel with XLabs' adapter loaded by diffusers' own
reader, and, for InstantX (which diffusers lacks), diffusers' FluxTransformer2DModel with the
re-implementation of InstantX's published processor in tests/support/ip_reference.py. ``pulid_flux``:
one whole Euler step (cfg 1 and true CFG 2) of a small FLUX.1-dev, the authors' Flux model with their
PuLID modules (ToTheBeginning/PuLID, the vendored archive) against ComfyUI's FLUX with the pack's
PuLID-FLUX block patches (tests/support/pulid_flux_check.py); its figure is of the stepped latent.
``infiniteyou``: the identity tokens, every FLUX block's InfuseNet residual and two whole Euler steps (three
scale / step-window cases) of the authors' FluxInfuseNetPipeline (bytedance/InfiniteYou, the vendored archive)
against ComfyUI's sampler with the pack's InfuseNet conditioning (tests/support/infiniteyou_check.py); the worst
of the three. One model
call on a CFG batch (conditional and unconditional rows, different identities), with a weight;
the FLUX formats and (full run) the h94 formats on a single-level UNet also with a mask.

Figure per format: max |ours - reference| / max |reference| of the model's prediction (noise or
velocity), worst case over the runs; "effect" is the same measure between the reference with and
without the identity (how much there was to get right). Needs ComfyUI: run it with the Python
that runs ComfyUI, or it re-runs itself with $COMFYUI_PATH's.

    .venv/bin/python benchmarks/compat.py            # 3 seeds, masked UNet runs too
    .venv/bin/python benchmarks/compat.py --quick    # 1 seed, under a minute

Last line: RESULT {"formats": {"<format>": <max relative difference>, ...}, ...}.
"""
from __future__ import annotations

import argparse
import json
import time

import sd15_harness as harness
import support_path  # noqa: F401  (tests/support importable as ``support``)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one seed, no masked UNet runs (under a minute)")
    args = parser.parse_args()
    harness.ensure_comfyui()
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import logging

    import torch
    logging.getLogger("diffusers").setLevel(logging.ERROR)
    from diffusers.utils import logging as diffusers_logging
    diffusers_logging.set_verbosity_error()
    from support import ip_layouts as layouts
    from support.ip_reference import h94_check
    from support.ip_reference_flux import flux_check
    from support.infiniteyou_check import block_check as infiniteyou_block_check
    from support.infiniteyou_check import step_check as infiniteyou_step_check
    from support.pulid_flux_check import step_check as pulid_step_check

    torch.set_num_threads(1)       # tiny models: one thread is fastest (threads only contend on a shared CPU)
    seeds = (0,) if args.quick else (0, 1, 2)
    start = time.time()
    formats, effects = {}, {}

    def record(name: str, result: dict) -> None:
        formats[name] = max(formats.get(name, 0.0), result["difference"])
        effects[name] = min(effects.get(name, float("inf")), result["effect"])

    for seed in seeds:
        for kind in layouts.H94_KINDS:
            for layout in layouts.LAYOUTS:
                record(f"h94_{kind}_{layout}", h94_check(kind, layout, seed=seed))
            if not args.quick:
                record(f"h94_{kind}_sd15", h94_check(kind, "sd15", single_level=True, seed=seed))
        for kind in layouts.FLUX_KINDS:
            record(kind, flux_check(kind, seed=seed))
        pulid = pulid_step_check(seed)        # one whole denoising step against the authors' Flux with PuLID
        record("pulid_flux", {"difference": pulid["difference"], "effect": pulid["effect_min"]})
        block, runs = infiniteyou_block_check(seed), infiniteyou_step_check(seed)    # against the authors' pipeline
        record("infiniteyou", {"difference": max(block["difference"], block["tokens"], runs["difference"]),
                               "effect": runs["effect_min"]})
    for name in formats:
        print(f"{name:28s} max relative difference {formats[name]:.2e}   identity effect {effects[name]:.3f}",
              flush=True)
    seconds = time.time() - start
    print(f"{len(formats)} formats, {len(seeds)} seed(s), {seconds:.1f} s", flush=True)
    print("RESULT " + json.dumps({"formats": formats, "identity_effect": effects, "seeds": len(seeds),
                                  "masked_unet_runs": not args.quick, "seconds": round(seconds, 1),
                                  "quick": args.quick}))


if __name__ == "__main__":
    main()
