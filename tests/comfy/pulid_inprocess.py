"""PuLID-FLUX checks that need ComfyUI's FLUX in process: run with the Python that runs ComfyUI.

    python tests/comfy/pulid_inprocess.py --comfyui /opt/ComfyUI

One whole denoising step (Euler, from sigma 0.8 to 0.6) of a small FLUX.1-dev: the authors' Flux model
(their ``flux/`` package from the vendored archive) with their PerceiverAttentionCA modules and IDFormer
tokens, stepped by their own ``flux.sampling.denoise``, against ComfyUI's FLUX built from the same
weights through ComfyUI's detection (support.flux_layout), patched by the pack (block patches on a
clone) and stepped by ComfyUI's own sampler. Two cases: the guidance-distilled path (cfg 1, the
authors' default) and true CFG (cfg 2: the negative prompt with the unconditional identity tokens).
Also: weight 0 and a zero mask leave sampling bit-identical, the sigma window, several photos, and
running beside an XLabs FLUX IP-Adapter with both effects present.
Prints one JSON line of facts that tests/comfy/test_pulid_flux.py asserts (benchmarks/compat.py prints
the ``pulid_flux`` row from the same function).
"""
from __future__ import annotations

import json
from pathlib import Path

import comfy_process

def behaviour_facts() -> dict:
    """Weight 0, masks, the sigma window, several photos, XLabs alongside: on the same small FLUX."""
    import tempfile

    import comfy.sample
    import torch
    from omniid.comfy_host.identity import apply_identity
    from omniid.comfy_host.pulid_flux import PuLIDBlockPatch, apply_pulid_flux
    from omniid.encoders import pulid_flux as P
    from omniid.encoders.embeds import IdentityEmbeds
    from omniid.guidance.adapter_files import load_adapter
    from safetensors.torch import save_file
    from support import ip_layouts
    from support.flux_layout import comfy_flux
    from support.pulid_flux_check import AXES, LATENT, LAYOUT, TEXT, flux_weights
    from support.pulid_reference import condition, reference_pulid

    model = comfy_flux(flux_weights(3), LAYOUT["heads"], AXES)
    _, _, pulid_state = reference_pulid(num_ca=4, flux_hidden=LAYOUT["hidden"], seed=4, ca_scale=3.0)
    pulid = P.load_state(pulid_state, "tiny_pulid_flux")
    cond, uncond = P.identity_tokens(pulid, *condition(photos=1, seed=5))
    three, _ = P.identity_tokens(pulid, *condition(photos=3, seed=6))
    g = torch.Generator().manual_seed(7)
    context = torch.randn(1, TEXT, LAYOUT["context"], generator=g)
    pooled = torch.randn(1, LAYOUT["vec"], generator=g)
    positive = [[context, {"pooled_output": pooled, "guidance": 3.5}]]
    negative = [[torch.zeros_like(context), {"pooled_output": torch.zeros_like(pooled), "guidance": 3.5}]]
    latent = torch.zeros(1, 16, LATENT, LATENT)
    noise = torch.randn(latent.shape, generator=g)

    def run(m, cfg=2.0):
        return comfy.sample.sample(m, noise, 3, cfg, "euler", "simple", positive, negative, latent,
                                   disable_pbar=True, seed=1)

    def differs(a, b):
        return float((a - b).abs().max() / b.abs().max())

    plain = run(model)
    full = run(apply_pulid_flux(model, pulid, cond, uncond, 1.0))
    facts = {
        "effect": differs(full, plain),
        "zero_equal": bool(torch.equal(run(apply_pulid_flux(model, pulid, cond, uncond, 0.0)), plain)),
        "masked_out_equal": bool(torch.equal(run(apply_pulid_flux(model, pulid, cond, uncond, 1.0,
                                                                  mask=torch.zeros(1, 64, 64))), plain)),
        "half_mask_vs_full": differs(run(apply_pulid_flux(model, pulid, cond, uncond, 1.0,
                                                          mask=torch.cat([torch.ones(1, 32, 64), torch.zeros(1, 32, 64)], 1))), full),
        "window_closed_equal": bool(torch.equal(run(apply_pulid_flux(model, pulid, cond, uncond, 1.0, 0.99, 1.0)),
                                                plain)),
        "late_window_vs_full": differs(run(apply_pulid_flux(model, pulid, cond, uncond, 1.0, 0.5, 1.0)), full),
        "three_photos_vs_one": differs(run(apply_pulid_flux(model, pulid, three, uncond, 1.0)), full),
        "patched_keys": sorted(k for k, v in apply_pulid_flux(model, pulid, cond, uncond)
                               .model_options["transformer_options"]["patches_replace"]["dit"].items()
                               if isinstance(v, PuLIDBlockPatch)),
    }
    # ComfyUI moves patches to the model's weight dtype too (float8 for fp8 FLUX files): the modules keep theirs
    patch = apply_pulid_flux(model, pulid, cond, uncond).model_options["transformer_options"]["patches_replace"][
        "dit"][("double_block", 0)]
    patch.to(torch.float8_e4m3fn)
    moved = patch.to(torch.device("cpu"))
    facts["dtype_kept"] = bool(isinstance(moved, PuLIDBlockPatch) and all(
        p.dtype == torch.float32 for p in pulid.parameters()))
    # beside an XLabs FLUX IP-Adapter (the pack's existing adapter path), in either order
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "xlabs.safetensors"
        save_file(ip_layouts.xlabs_checkpoint("xlabs_v1", LAYOUT["hidden"], LAYOUT["depth"], seed=8),
                  str(path))
        adapter = load_adapter(str(path))
    embeds = IdentityEmbeds("clip", {"pooled": torch.randn(1, ip_layouts.POOLED_WIDTH, generator=g),
                                     "pooled_uncond": torch.zeros(1, ip_layouts.POOLED_WIDTH)}, {"num_images": 1})
    tokens = adapter.identity_tokens(embeds)
    xlabs = apply_identity(model, adapter, tokens, 5.0, 0.0, 1.0)
    xlabs_alone = run(xlabs)
    both = run(apply_pulid_flux(xlabs, pulid, cond, uncond, 1.0))
    both_reversed = run(apply_identity(apply_pulid_flux(model, pulid, cond, uncond, 1.0), adapter, tokens, 5.0,
                                       0.0, 1.0))
    facts.update(xlabs_effect=differs(xlabs_alone, plain), both_vs_xlabs=differs(both, xlabs_alone),
                 both_vs_pulid=differs(both, full), reversed_vs_xlabs=differs(both_reversed, xlabs_alone),
                 reversed_vs_pulid=differs(both_reversed, full),
                 plain_after_equal=bool(torch.equal(run(model), plain)))
    facts.update(two_people_facts(model, pulid, cond, three, uncond))
    try:
        apply_pulid_flux(comfy_flux(flux_weights(3) | {}, LAYOUT["heads"], AXES), P.load_state(
            reference_pulid(num_ca=3, flux_hidden=LAYOUT["hidden"], seed=4)[2], "three_modules"), cond, uncond)
        facts["wrong_fit"] = ""
    except P.PuLIDFileError as exc:
        facts["wrong_fit"] = str(exc)
    return facts


def two_people_facts(model, pulid, first, second, uncond) -> dict:
    """Two people in one image: two chained Apply nodes, each with its own identity and a mask over its half.
    One block patch holds both; a block's image tokens get person one's residual on the left half and person
    two's on the right, each computed by hand from the module (no cross-talk), on the cond and uncond rows."""
    import torch
    from omniid.comfy_host.pulid_flux import PULID_STATE, apply_pulid_flux
    from support.pulid_flux_check import LATENT, LAYOUT

    size = 64
    left = torch.zeros(1, size, size)
    left[..., : size // 2] = 1.0
    right = 1.0 - left
    both = apply_pulid_flux(apply_pulid_flux(model, pulid, first, uncond, 1.0, mask=left),
                            pulid, second, uncond, 0.7, mask=right)
    patch = both.model_options["transformer_options"]["patches_replace"]["dit"][("double_block", 2)]
    grid = LATENT // 2
    g = torch.Generator().manual_seed(11)
    img = torch.randn(2, grid * grid, LAYOUT["hidden"], generator=g)
    txt = torch.randn(2, 5, LAYOUT["hidden"], generator=g)
    options = {PULID_STATE: {"txt_len": 5, "latent_hw": (LATENT, LATENT), "blocks": 0},
               "cond_or_uncond": [0, 1], "sigmas": torch.tensor([0.5, 0.5])}
    out = patch({"img": img, "txt": txt, "transformer_options": options},
                {"original_block": lambda args: {"img": args["img"], "txt": args["txt"]}})
    module = pulid.pulid_ca[1]                               # the module of double block 2
    on_left = (torch.arange(grid * grid) % grid < grid // 2).float()[None, :, None]
    with torch.no_grad():
        expected = torch.cat([
            img[:1] + on_left * module(first, img[:1]) + 0.7 * (1 - on_left) * module(second, img[:1]),
            img[1:] + on_left * module(uncond, img[1:]) + 0.7 * (1 - on_left) * module(uncond, img[1:])])
    return {"two_people_injections": len(patch.injections),
            "two_people_block_difference": float((out["img"] - expected).abs().max() / expected.abs().max()),
            "two_people_txt_untouched": bool(torch.equal(out["txt"], txt)),
            "two_people_people_differ": float((module(first, img[:1]) - module(second, img[:1])).abs().max())}


def main() -> None:
    comfy_process.start(threads=1)
    from support.pulid_flux_check import step_check
    facts = {"step": step_check(0), **behaviour_facts()}
    print(json.dumps(facts))


if __name__ == "__main__":
    main()
