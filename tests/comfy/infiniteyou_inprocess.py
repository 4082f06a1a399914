"""InfiniteYou checks that need ComfyUI's FLUX in process: run with the Python that runs ComfyUI.

    python tests/comfy/infiniteyou_inprocess.py --comfyui /opt/ComfyUI

The identity tokens and every FLUX block's InfuseNet residual against the authors' Resampler and InfuseNet
call, and whole denoising runs (two Euler steps, three scale / window cases) of the authors'
``FluxInfuseNetPipeline`` against ComfyUI's sampler with the pack's conditioning (support.infiniteyou_check);
also: the input conditioning untouched, chaining after another ControlNet with both effects present, and
running beside a model patch (PuLID-FLUX's block patches) with both effects present.
Prints one JSON line of facts that tests/comfy/test_infiniteyou.py asserts.
"""
from __future__ import annotations

import json

import comfy_process


def behaviour_facts() -> dict:
    import comfy.sample
    import comfy.samplers
    import torch
    from omniid.comfy_host.infiniteyou import InfuseNetControl, with_infusenet
    from omniid.comfy_host.pulid_flux import apply_pulid_flux
    from omniid.encoders import pulid_flux as P
    from omniid.encoders.infiniteyou import identity_tokens
    from support.infiniteyou_check import FLUX, LATENT, GUIDANCE, LatentVAE, inputs, models, pack
    from support.infiniteyou_reference import arcface, relative
    from support.pulid_reference import condition, reference_pulid

    _, _, _, flux, control, projection = models(0)
    data = inputs(5)
    tokens = identity_tokens(projection, arcface(1, 70))
    three = identity_tokens(projection, arcface(3, 71))
    vae = LatentVAE(data.control)
    hint = torch.zeros(1, 3, LATENT * 8, LATENT * 8)
    sigmas = torch.tensor([1.0, 0.75, 0.5])

    def run(model, positive):
        return comfy.sample.sample_custom(model, data.noise, 1.0, comfy.samplers.sampler_object("euler"), sigmas,
                                          positive, positive, torch.zeros(1, 16, LATENT, LATENT), disable_pbar=True,
                                          seed=0)

    plain_cond = [[data.context, {"pooled_output": data.pooled, "guidance": GUIDANCE}]]
    infused = with_infusenet(plain_cond, InfuseNetControl.of(control, tokens), hint, 1.0, vae)
    plain, full = run(flux, plain_cond), run(flux, infused)
    facts = {"effect": relative(full, plain), "input_untouched": "control" not in plain_cond[0][1],
             "three_photos_vs_one": relative(run(flux, with_infusenet(plain_cond, InfuseNetControl.of(control, three),
                                                                      hint, 1.0, vae)), full),
             "zero_equal": bool(torch.equal(run(flux, with_infusenet(plain_cond, InfuseNetControl.of(control, tokens),
                                                                      hint, 0.0, vae)), plain)),
             "closed_window_equal": bool(torch.equal(run(flux, with_infusenet(
                 plain_cond, InfuseNetControl.of(control, tokens, 0.6, 0.6), hint, 1.0, vae)), plain))}
    # chained after another ControlNet (a second InfuseNet with other tokens stands in): both effects present
    other = with_infusenet(plain_cond, InfuseNetControl.of(control, three), hint, 0.7, vae)
    other_alone = run(flux, other)
    both = run(flux, with_infusenet(other, InfuseNetControl.of(control, tokens), hint, 1.0, vae))
    facts.update(chain_vs_first=relative(both, other_alone), chain_vs_second=relative(both, full))
    # beside a model patch: PuLID-FLUX's block patches on the model, InfuseNet on the conditioning
    _, _, pulid_state = reference_pulid(num_ca=3, flux_hidden=FLUX["heads"] * FLUX["head_dim"], seed=4, ca_scale=3.0)
    pulid = P.load_state(pulid_state, "tiny_pulid_flux")
    cond, uncond = P.identity_tokens(pulid, *condition(photos=1, seed=5))
    patched = apply_pulid_flux(flux, pulid, cond, uncond, 1.0)
    pulid_alone = run(patched, plain_cond)
    both = run(patched, infused)
    facts.update(pulid_effect=relative(pulid_alone, plain), beside_pulid_vs_pulid=relative(both, pulid_alone),
                 beside_pulid_vs_infusenet=relative(both, full), plain_after_equal=bool(torch.equal(run(flux, plain_cond),
                                                                                                   plain)))
    facts["packed_shape"] = list(pack(full).shape)
    return facts


def main() -> None:
    comfy_process.start(threads=1)
    import logging

    logging.getLogger("diffusers").setLevel(logging.ERROR)
    from support.infiniteyou_check import block_check, step_check
    facts = {"block": block_check(0), "step": step_check(0), **behaviour_facts()}
    print(json.dumps(facts))


if __name__ == "__main__":
    main()
