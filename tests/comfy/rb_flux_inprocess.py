"""RB-Guidance on FLUX.1 (dev and Kontext) and Chroma in process: run with the Python that runs ComfyUI.

    python tests/comfy/rb_flux_inprocess.py --comfyui PATH

A tiny FLUX.1 dev model (random weights in the published layout, configured by ComfyUI's detection,
loaded in inference mode as ComfyUI's loaders do), sampled by ComfyUI's euler sampler:
- strength 0 samples ComfyUI's CFGGuider's latents bit for bit, on FLUX.1 dev (cfg 1, FLUX's own) and on
  Kontext (a reference latent in the conditioning, cfg 2 so both branches run);
- the push: a toy block 0 (a block patch placed before the guider's, as another pack's would be) makes
  the features toy(img_in(patchify(z_t))); at the first guided step, the guided x0 minus the plain x0
  equals -sigma / (1 - sigma) times the masked gradient of E = p / (1 + S) written out here by hand
  (the flow model's own noise scaling for the reference at t0, the paper's matching);
- the guided steps are those with t = 1000 sigma <= u T; with Kontext the features and the attention
  maps cover the generated image's tokens only, and the subject map is recorded;
- Chroma (a tiny diffusers ChromaTransformer2DModel at the published depth in ComfyUI's Chroma): its own
  family entry, strength 0 bit for bit, strength 8.5 moves the latent.
Prints one JSON line of facts that tests/comfy/test_rb_flux.py asserts.
"""
from __future__ import annotations

import json

import comfy_process

FLUX_DEV = dict(hidden=64, heads=4, depth=2, single=2, context=48, vec=32, guidance=True, mlp_ratio=2.0)
FLUX_AXES = (4, 6, 6)


class StreamLength:
    """dit replace patch before the guider's at the feature block: how many tokens the image stream has."""

    def __init__(self):
        self.lengths = []

    def __deepcopy__(self, memo):           # some releases deep-copy model options: keep one record
        return self

    def __call__(self, args, extra, *more, **kwargs):
        self.lengths.append(int(args["img"].shape[1]))
        return extra["original_block"](args)


class ToyBlock:
    """dit replace patch standing in for block 0: a toy function of the image tokens."""

    def __call__(self, args, extra, *more, **kwargs):
        import torch
        img = args["img"]
        return {**{k: v for k, v in args.items() if k in ("txt",)}, "img": torch.tanh(img) * 1.5 + 0.5 * img}


def facts(torch) -> dict:
    import comfy.samplers
    from omniid.comfy_host.gradients import gradient_ready
    from omniid.comfy_host.rb_guider import RBGuider
    from omniid.guidance.rb_guidance import RBSettings
    from support.flux_layout import comfy_flux, flux_state_dict

    with torch.inference_mode():                                   # as ComfyUI's loaders run
        model = comfy_flux(flux_state_dict(seed=11, dtype=torch.float32, **FLUX_DEV), FLUX_DEV["heads"], FLUX_AXES)
    g = torch.Generator().manual_seed(12)
    context, pooled = torch.randn(1, 6, 48, generator=g), torch.randn(1, 32, generator=g)
    positive = [[context, {"pooled_output": pooled, "guidance": 3.5}]]
    negative = [[torch.randn(1, 6, 48, generator=g), {"pooled_output": torch.randn(1, 32, generator=g),
                                                      "guidance": 3.5}]]
    latent = torch.zeros(1, 16, 8, 8)
    noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(13))
    reference = torch.randn(1, 16, 8, 8, generator=g)
    sigmas = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.0])                 # 4 steps, the last 2 guided (sigma <= 0.6)
    sampler = comfy.samplers.sampler_object("euler")
    predictions = {}

    def run(guider, pos, neg, cfg, channels=16):
        guider.set_conds(pos, neg)
        guider.set_cfg(cfg)
        steps = predictions[id(guider)] = []
        start, start_noise = (latent, noise) if channels == 16 else (torch.zeros(1, channels, 8, 8), torch.randn(
            1, channels, 8, 8, generator=torch.Generator().manual_seed(13)))
        return guider.sample(start_noise, start, sampler, sigmas, disable_pbar=True, seed=13,
                             callback=lambda step, x0, x, total: steps.append(x0.clone()))

    def rb(m, strength, mask=None, block=0, channels=16):
        ref = reference if channels == 16 else torch.randn(1, channels, 8, 8, generator=torch.Generator().manual_seed(16))
        return RBGuider(gradient_ready(m), RBSettings(strength=strength), ref, None, mask, feature_block=block,
                        subject_token=3, seed=0)

    out = {"sigmas": [float(s) for s in sigmas]}
    # strength 0 is ComfyUI's CFGGuider, bit for bit: FLUX.1 dev at cfg 1, and Kontext at cfg 2
    kontext_pos = [[context, {**positive[0][1], "reference_latents": [torch.randn(1, 16, 8, 8, generator=g)]}]]
    out["p0_equal_dev"] = bool(torch.equal(run(rb(model, 0.0), positive, negative, 1.0),
                                           run(comfy.samplers.CFGGuider(model), positive, negative, 1.0)))
    out["p0_equal_kontext"] = bool(torch.equal(run(rb(model, 0.0), kontext_pos, negative, 2.0),
                                               run(comfy.samplers.CFGGuider(model), kontext_pos, negative, 2.0)))

    # Kontext guided with the paper's attention mask: what the captures saw
    seen = {}
    spied = model.clone()
    lengths = StreamLength()
    spied.set_model_patch_replace(lengths, "dit", "double_block", 1)
    guider = rb(spied, 8.5)
    capture_run = guider._run

    def spying(x, sigma, options, cond, stop):
        result = capture_run(x, sigma, options, cond, stop)
        grid, cross, self_maps = result[2]
        if stop:                                  # the reference pass: features only, no attention maps
            seen.setdefault("reference_maps", [grid, cross, self_maps] == [None, None, None])
            return result
        seen.setdefault("features", list(result[1].shape))
        seen.setdefault("attention", [list(grid), list(cross.shape), list(self_maps.shape),
                                      float(self_maps.sum(-1).sub(1).abs().max())])
        return result

    guider._run = spying
    guided = run(guider, kontext_pos, negative, 2.0)
    out["kontext"] = {"image_stream_tokens": sorted(set(lengths.lengths)),"finite": bool(torch.isfinite(guided).all()), "guided_steps": guider.guided_steps,
                      "reference_passes": guider.reference_passes, "feature_block": guider.feature_block, **seen}
    out["expected_guided_steps"] = sum(1 for s in sigmas[:-1] if 1000.0 * float(s) <= 600.0)

    # the push against a hand computation, on a toy block 0 (the features: toy(img_in(patchify(z_t))))
    toy = model.clone()
    toy.set_model_patch_replace(ToyBlock(), "dit", "double_block", 0)
    face = torch.zeros(1, 64, 64)
    face[:, 16:48, 0:48] = 1.0                                        # token grid 4 x 4: rows 1-2, columns 0-2
    plain = comfy.samplers.CFGGuider(toy)
    run(plain, positive, negative, 1.0)
    guided = rb(toy, 8.5, mask=face, block=1)
    run(guided, positive, negative, 1.0)
    first = next(i for i, s in enumerate(sigmas[:-1]) if 1000.0 * float(s) <= 600.0)
    push = predictions[id(guided)][first] - predictions[id(plain)][first]
    out["before_window_equal"] = all(torch.equal(a, b) for a, b in zip(predictions[id(guided)][:first],
                                                                        predictions[id(plain)][:first]))
    out["hand"] = hand_push(torch, model, reference, noise, sigmas, first, face, predictions[id(plain)], push)

    out["flux2"] = flux2_facts(torch, run, rb, g)
    out["subject_words"] = subject_words()

    # Chroma (FLUX.1's blocks, modulations from an approximator), through ComfyUI's detection
    from support.chroma_layout import bfl_state_dict, comfy_chroma
    from support.tiny_diffusers import chroma_transformer
    torch.manual_seed(14)
    transformer = chroma_transformer()
    try:
        with torch.inference_mode():
            chroma = comfy_chroma(bfl_state_dict(transformer.state_dict()), transformer.config)
    except ValueError as exc:                # a release whose Chroma fixes the published width's heads
        out["chroma"] = {"built": False, "reason": str(exc)}
        return out
    # ComfyUI 0.3.64's Chroma reads a pooled output as FLUX.1 does (its model ignores it); later releases' do not
    text = tuple([[torch.randn(1, 6, 40, generator=g), {"pooled_output": torch.zeros(1, 768)}]] for _ in range(2))
    plain = run(comfy.samplers.CFGGuider(chroma), *text, 2.0)
    off = run(rb(chroma, 0.0), *text, 2.0)
    guided = rb(chroma, 8.5)
    moved = run(guided, *text, 2.0)
    out["chroma"] = {"built": True, "p0_equal": bool(torch.equal(plain, off)), "family": guided.family.name,
                     "feature_block": guided.feature_block, "guided_steps": guided.guided_steps,
                     "moved": float((moved - plain).abs().max() / plain.abs().max()),
                     "finite": bool(torch.isfinite(moved).all())}
    return out


def flux2_facts(torch, run, rb, g) -> dict:
    """FLUX.2 (klein's layout, patch size 1) through ComfyUI's detection: its own family entry."""
    import comfy.samplers
    from support.flux2_layout import bfl_state_dict, comfy_flux2
    from support.tiny_diffusers import flux2_transformer
    torch.manual_seed(15)
    transformer = flux2_transformer()
    try:
        with torch.inference_mode():
            model = comfy_flux2(bfl_state_dict(transformer.state_dict()), transformer.config.num_attention_heads,
                                transformer.config.axes_dims_rope)
    except ValueError as exc:                # a release without FLUX.2
        return {"built": False, "reason": str(exc)}
    text = [[torch.randn(1, 6, 40, generator=g), {}]], [[torch.randn(1, 6, 40, generator=g), {}]]
    channels = transformer.config.in_channels                        # patch size 1
    plain = run(comfy.samplers.CFGGuider(model), *text, 2.0, channels)
    off = run(rb(model, 0.0, channels=channels), *text, 2.0, channels)
    guided = rb(model, 8.5, channels=channels)
    moved = run(guided, *text, 2.0, channels)
    return {"built": True, "p0_equal": bool(torch.equal(plain, off)), "family": guided.family.name,
            "feature_block": guided.feature_block, "guided_steps": guided.guided_steps,
            "moved": float((moved - plain).abs().max() / plain.abs().max()), "finite": bool(torch.isfinite(moved).all())}


def subject_words() -> dict:
    """The subject word found with each family's own tokenizer (no text encoder weights needed), as the node
    finds it: FLUX.1's T5 and, where this ComfyUI has it, FLUX.2 klein's Qwen3 with its chat template."""
    from types import SimpleNamespace

    import comfy.text_encoders.flux as flux_text
    from omniid.comfy_host.rb_dit import FAMILIES
    from omniid.comfy_host.rb_setup import subject_token
    streams = {family.name: family.tokenizers for family in FAMILIES}
    found = {}
    for name, tokenizer, family in (("t5", getattr(flux_text, "FluxTokenizer", None), "FLUX"),
                                    ("qwen3", getattr(flux_text, "KleinTokenizer", None), "FLUX.2")):
        if tokenizer is None:
            continue
        tokenizer = tokenizer()
        clip = SimpleNamespace(tokenize=tokenizer.tokenize_with_weights, tokenizer=tokenizer)
        positive = [[None, {}]]
        positive[0][0] = SimpleNamespace(shape=(1, 512, 8))
        found[name] = list(subject_token(positive, 0, "", clip, "a photo of a woman, smiling", streams[family]))
    return found


def hand_push(torch, model, reference, noise, sigmas, first, face, plain_x0, push) -> dict:
    """The push of the first guided step written out: the sampler's x there, E's gradient, the flow's scales."""
    dm = model.get_model_object("diffusion_model")
    weight, bias = dm.img_in.weight.clone().double(), dm.img_in.bias.clone().double()

    def features(z):                                                   # (B, 16 tokens, 64)
        tokens = z.reshape(z.shape[0], 16, 4, 2, 4, 2).permute(0, 2, 4, 1, 3, 5).reshape(z.shape[0], 16, 64)
        img = tokens @ weight.T + bias
        return torch.tanh(img) * 1.5 + 0.5 * img

    return expected_push(torch, model, reference, noise, sigmas, float(sigmas[first]), first, plain_x0, push,
                         features)


def expected_push(torch, model, reference, noise, sigmas, sigma: float, first: int, plain_x0, push, features) -> dict:
    """RB-Guidance's push at the first guided step (noise level ``sigma``) by hand, for a toy ``features``
    (z -> (B, 16 tokens, C)) on a 4 x 4 token grid: euler from the noise (x = sigma_0 * noise on a flow model's
    empty latent) to that step, the reference noised to t0 with seed 0's noise, E's gradient inside the
    constructed face mask, the flow's scale. ``push``: the guided minus the plain prediction there."""
    import torch.nn.functional as F
    x = (sigmas[0] * noise).double()
    for i in range(first):
        x = x + (x - plain_x0[i].double()) / sigmas[i].double() * (sigmas[i + 1] - sigmas[i]).double()
    sigma0 = 0.671
    z_ref = model.model.process_latent_in(reference).double()
    ref = features(sigma0 * noise_of_seed(torch, reference.shape, 0).double() + (1 - sigma0) * z_ref)[0]
    gen_mask = torch.zeros(1, 16, dtype=torch.bool)
    gen_mask.view(1, 4, 4)[:, 1:3, 0:3] = True
    x = x.clone().requires_grad_(True)
    gen = F.normalize(features(x), dim=-1)
    similarity = torch.einsum("rc,bnc->brn", F.normalize(ref, dim=-1), gen).masked_fill(~gen_mask[:, None], -1e9)
    energy = 8.5 / (1 + similarity.max(-1).values.mean(-1))
    (grad,) = torch.autograd.grad(energy.sum(), x)
    latent_mask = gen_mask.view(1, 4, 4).double().repeat_interleave(2, 1).repeat_interleave(2, 2)
    latent_mask = latent_mask.reshape(1, *([1] * (x.ndim - 3)), 8, 8)        # Qwen-Image's frame axis
    expected = -(sigma / (1 - sigma)) * grad * latent_mask
    return {"push_max": float(push.abs().max()), "expected_max": float(expected.abs().max()),
            "difference": float((push.double() - expected).abs().max()),
            "outside_mask": float((push.double() * (1 - latent_mask)).abs().max())}


def noise_of_seed(torch, shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def main() -> None:
    comfy_process.start(threads=1)
    import torch
    torch.manual_seed(0)
    print(json.dumps(facts(torch)))


if __name__ == "__main__":
    main()
