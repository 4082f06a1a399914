"""One whole denoising step of a small FLUX.1-dev with PuLID: the authors' Flux model (their ``flux/``
package from the vendored archive) with their PerceiverAttentionCA modules and IDFormer tokens, stepped
by their own ``flux.sampling.denoise``, against ComfyUI's FLUX built from the same weights through
ComfyUI's detection (support.flux_layout), patched by the pack (block patches on a clone) and stepped
by ComfyUI's own sampler (Euler, sigma 0.8 -> 0.6). Two cases: the guidance-distilled path (cfg 1, the
authors' default) and true CFG (cfg 2: the negative prompt with the unconditional identity tokens).

Needs ComfyUI importable (tests/comfy/pulid_inprocess.py, benchmarks/compat.py).
"""
from __future__ import annotations

# FLUX.1-dev layout, small: 3 double blocks and 5 single ones, so that the authors' intervals
# (every 2nd double block, every 4th single block) pick blocks 0 and 2, and 0 and 4: four modules
LAYOUT = dict(hidden=64, heads=4, depth=3, single=5, context=48, vec=32, guidance=True, mlp_ratio=2.0)
AXES = (4, 6, 6)
LATENT = 8
TEXT = 7
SIGMAS = (0.8, 0.6)


def pack(x):
    b, c, h, w = x.shape
    return x.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, (h // 2) * (w // 2), c * 4)


def image_ids(h: int, w: int):
    import torch
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None]
    return ids.reshape(1, -1, 3)


def flux_weights(seed: int):
    """FLUX.1-layout weights with every norm scale and bias random too."""
    import torch
    from .flux_layout import flux_state_dict
    state = flux_state_dict(seed=seed, dtype=torch.float32, **LAYOUT)
    g = torch.Generator().manual_seed(seed + 1)
    for key, value in state.items():
        if value.ndim == 1:
            state[key] = (1.0 if key.endswith(".scale") else 0.0) + 0.1 * torch.randn(value.shape, generator=g)
    return state


def authors_flux(state: dict):
    import torch
    from .pulid_reference import reference_module
    fm = reference_module("flux.model")
    params = fm.FluxParams(in_channels=64, vec_in_dim=LAYOUT["vec"], context_in_dim=LAYOUT["context"],
                           hidden_size=LAYOUT["hidden"], mlp_ratio=LAYOUT["mlp_ratio"], num_heads=LAYOUT["heads"],
                           depth=LAYOUT["depth"], depth_single_blocks=LAYOUT["single"], axes_dim=list(AXES),
                           theta=10_000, qkv_bias=True, guidance_embed=True)
    model = fm.Flux(params)
    model.load_state_dict({k: v.clone() for k, v in state.items()}, strict=True)
    return model.eval().to(torch.float32)


def step_check(seed: int = 0) -> dict:
    """{"cases": {name: max relative difference of the stepped latent}, "effect": {name: relative change the
    identity makes to the authors' step}, "difference": the worst case}."""
    import comfy.sample
    import comfy.samplers
    import torch
    from omniid.comfy_host.pulid_flux import apply_pulid_flux
    from omniid.encoders import pulid_flux as P
    from .flux_layout import comfy_flux
    from .pulid_reference import condition, reference_module, reference_pulid, relative

    torch.manual_seed(seed)
    state = flux_weights(seed + 10)
    theirs = authors_flux(state)
    model = comfy_flux(state, LAYOUT["heads"], AXES)
    encoder, cas, pulid_state = reference_pulid(num_ca=4, flux_hidden=LAYOUT["hidden"], seed=seed + 20, ca_scale=3.0)
    theirs.pulid_ca = cas
    pulid = P.load_state(pulid_state, "tiny_pulid_flux")
    id_cond, hidden = condition(photos=1, seed=seed + 30)
    with torch.no_grad():
        their_id = encoder(id_cond, hidden)
        their_uncond = encoder(torch.zeros_like(id_cond), [torch.zeros_like(h) for h in hidden])
    cond, uncond = P.identity_tokens(pulid, id_cond, hidden)
    sampling = reference_module("flux.sampling")

    g = torch.Generator().manual_seed(seed + 40)
    noise = torch.randn(1, 16, LATENT, LATENT, generator=g)
    context, negative_context = torch.randn(1, TEXT, LAYOUT["context"], generator=g), torch.randn(1, TEXT, LAYOUT["context"], generator=g)
    pooled, negative_pooled = torch.randn(1, LAYOUT["vec"], generator=g), torch.randn(1, LAYOUT["vec"], generator=g)
    guidance = 3.5
    positive = [[context, {"pooled_output": pooled, "guidance": guidance}]]
    negative = [[negative_context, {"pooled_output": negative_pooled, "guidance": guidance}]]
    latent = torch.zeros(1, 16, LATENT, LATENT)
    sigmas = torch.tensor(SIGMAS)
    start = {}
    # what ComfyUI's sampler does after the last step, undone: its latent scaling and (where a release
    # has it) the flow models' inverse noise scaling
    unscale = model.model.model_sampling.inverse_noise_scaling(sigmas[-1:], torch.ones(1, 1, 1, 1))

    def comfy_step(m, cfg: float):
        def seen(step, x0, x, total):
            start.setdefault("x", x.clone())
        out = comfy.sample.sample_custom(m, noise, cfg, comfy.samplers.sampler_object("euler"), sigmas, positive,
                                         negative, latent, callback=seen, disable_pbar=True, seed=0)
        return pack(model.model.process_latent_in(out) / unscale)

    def authors_step(weight: float, cfg: float, use_id: bool = True):
        x = pack(start["x"])              # the latent ComfyUI's sampler started from (noise at sigma 0.8)
        with torch.no_grad():
            return sampling.denoise(theirs, img=x, img_ids=image_ids(LATENT, LATENT), txt=context,
                                    txt_ids=torch.zeros(1, TEXT, 3), vec=pooled, timesteps=list(SIGMAS),
                                    guidance=guidance, id_weight=weight, id=their_id if use_id else None,
                                    start_step=0, uncond_id=their_uncond if use_id else None, true_cfg=cfg,
                                    timestep_to_start_cfg=0, neg_txt=negative_context,
                                    neg_txt_ids=torch.zeros(1, TEXT, 3), neg_vec=negative_pooled)

    cases, effects = {}, {}
    for name, weight, cfg in (("distilled_w1", 1.0, 1.0), ("true_cfg2_w0.8", 0.8, 2.0)):
        ours = comfy_step(apply_pulid_flux(model, pulid, cond, uncond, weight), cfg)
        expected = authors_step(weight, cfg)
        cases[name] = relative(ours, expected)
        effects[name] = relative(authors_step(weight, cfg, use_id=False), expected)
    return {"cases": cases, "effect": effects, "difference": max(cases.values()), "effect_min": min(effects.values())}
