"""Every callable the pack registers with ComfyUI, called with arguments a later ComfyUI might add.

Later ComfyUI releases added arguments to the calls of patches, wrappers and overrides (for
example ``latent_shapes`` and ``timestep_zero_index``) and broke peer packs. Each callable here
is called once as ComfyUI 0.3.64 calls it and once with an unknown extra positional and keyword
argument: it must accept them, pass them on to what it wraps, and give the same result.
Run with the Python that runs ComfyUI:

    python tests/comfy/extra_arguments.py --comfyui PATH

Prints one JSON line: callable name -> {"same": bool, "forwarded": bool}.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

EXTRA_POSITIONAL = "added-by-a-later-comfyui"
EXTRA_KEYWORDS = {"latent_shapes": [(1, 4, 8, 8)], "timestep_zero_index": 0}


class Recorder:
    """Stands in for what a callable wraps (attention, executor, block, previous patch): records its
    arguments, answers with a fixed function of its tensor inputs."""

    def __init__(self, answer):
        self.answer, self.calls = answer, []

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.answer(*args, **kwargs)

    def forwarded(self) -> bool:
        """Some call it received carried the extra arguments."""
        return any(EXTRA_POSITIONAL in args and all(kwargs.get(k) == v for k, v in EXTRA_KEYWORDS.items())
                   for args, kwargs in self.calls)


def check(results: dict, name: str, call, recorder: Recorder, equal) -> None:
    """``call(extra_args, extra_kwargs)`` runs the callable; compare plain and extended calls."""
    plain = call((), {})
    extended = call((EXTRA_POSITIONAL,), dict(EXTRA_KEYWORDS))
    results[name] = {"same": bool(equal(plain, extended)), "forwarded": recorder.forwarded()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--comfyui", required=True)
    args = parser.parse_args()
    sys.path.insert(0, str(Path(args.comfyui).resolve()))
    sys.argv = sys.argv[:1]
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import torch

    from omniid.comfy_host.attention import AttentionRecording
    from omniid.comfy_host.denoiser import IdentityOnlyAttention
    from omniid.comfy_host.gradients import fresh_copy, private_copy
    from omniid.comfy_host.identity import FLUX_BLOCK, FLUX_STATE, FluxAttentionOverride, FluxBlockPatch, record_flux_call
    from omniid.comfy_host.rb_guider import FeatureCapture, RBGuider
    from omniid.comfy_host.two_streams import TwoStreams
    from omniid.guidance.attention_capture import AttentionMaps
    from omniid.guidance.decoupled import COND, UNCOND, DecoupledAttention, LayerInjection, sdpa_attention
    from omniid.guidance.infinite_id import STREAMS_KEY, MixedSelfAttention, StreamCrossAttention, StreamLayout
    from omniid.guidance.rb_guidance import RBSettings

    g = torch.Generator().manual_seed(0)
    same = torch.equal
    results: dict = {}
    q, k, v = (torch.randn(2, 16, 64, generator=g) for _ in range(3))
    ctx = torch.randn(2, 5, 64, generator=g)
    keys, values = torch.randn(4, 64, generator=g), torch.randn(4, 64, generator=g)
    injection = LayerInjection({COND: keys, UNCOND: keys}, {COND: values, UNCOND: values}, 0.7)
    extra = {"n_heads": 4, "cond_or_uncond": [COND, UNCOND], "sigmas": torch.tensor([1.0, 1.0])}

    # attn1 / attn2 replace patches: patch(q, k, v, extra), a previous patch kept underneath
    for name, make in (("DecoupledAttention", lambda base: DecoupledAttention(sdpa_attention, [injection], base)),
                       ("IdentityOnlyAttention", lambda base: IdentityOnlyAttention(sdpa_attention, [injection], base)),
                       ("MixedSelfAttention", lambda base: MixedSelfAttention(sdpa_attention, base)),
                       ("StreamCrossAttention", lambda base: StreamCrossAttention(sdpa_attention, [injection], base))):
        base = Recorder(lambda q_, k_, v_, extra_, *a, **kw: sdpa_attention(q_, k_, v_, extra_["n_heads"]))
        patch = make(base)
        streams = {**extra, STREAMS_KEY: StreamLayout(1, (0,)), "cond_or_uncond": [COND]}
        options = streams if "Stream" in name or "Mixed" in name else extra
        kv = (q, q) if name == "MixedSelfAttention" else (ctx, ctx)
        check(results, name, lambda a, kw: patch(q, *kv, options, *a, **kw), base, same)
        if name == "IdentityOnlyAttention":      # the identity term alone: there is nothing underneath to call
            results[name]["forwarded"] = True

    # optimized_attention overrides: override(func, q, k, v, heads, ..., transformer_options=...)
    func = Recorder(lambda q_, k_, v_, heads, *a, **kw: sdpa_attention(q_, k_, v_, heads))
    recording = AttentionRecording(AttentionMaps(token=1, keep_self=True))
    check(results, "AttentionRecording", lambda a, kw: recording(func, q, ctx, ctx, 4, *a, transformer_options={},
                                                                 **kw), func, same)
    qf = torch.randn(2, 4, 8 + 16, 16, generator=g)                 # FLUX joint attention: (B, heads, L, D)
    flux_options = {FLUX_BLOCK: (LayerInjection({COND: keys, UNCOND: keys}, {COND: values, UNCOND: values}, 0.5),),
                    FLUX_STATE: {"txt_len": 8, "latent_hw": (8, 8)}, "cond_or_uncond": [COND, UNCOND]}
    joint = Recorder(lambda q_, k_, v_, heads, *a, **kw: (q_.transpose(1, 2).reshape(q_.shape[0], -1, 64)
                                                           if q_.ndim == 4 else sdpa_attention(q_, k_, v_, heads)))
    override = FluxAttentionOverride()
    check(results, "FluxAttentionOverride", lambda a, kw: override(joint, qf, qf, qf, 4, *a, skip_reshape=True,
                                                                   transformer_options=flux_options, **kw),
          joint, same)

    # dit replace patch: patch(args, extra) with extra["original_block"]; extras go to a previous patch
    previous = Recorder(lambda args_, extra_, *a, **kw: {"img": args_["img"] * 2})
    block = FluxBlockPatch((injection,), previous=previous)
    check(results, "FluxBlockPatch", lambda a, kw: block({"img": q, "transformer_options": {}}, {}, *a, **kw)["img"],
          previous, same)

    # DIFFUSION_MODEL wrappers: wrapper(executor, x, *model arguments)
    x = torch.randn(2, 4, 8, 8, generator=g)
    executor = Recorder(lambda x_, *a, **kw: x_ * 3)
    check(results, "record_flux_call", lambda a, kw: record_flux_call(
        executor, x, torch.ones(2), ctx, None, None, None, None, {}, *a, **kw), executor, same)
    unet_executor = Recorder(lambda x_, *a, **kw: x_ * 3)
    streams_wrapper = TwoStreams(text_uncond=True)
    check(results, "TwoStreams", lambda a, kw: streams_wrapper(
        unet_executor, x, torch.ones(2), ctx, None, None, {"cond_or_uncond": [COND, UNCOND]}, *a, **kw),
        unet_executor, same)

    # output_block_patch and weight functions
    capture = FeatureCapture(block=1, stop=False)
    h = torch.randn(1, 8, 4, 4, generator=g)
    results["FeatureCapture"] = {
        "same": all(torch.equal(a, b) for a, b in zip(capture(h, h, {"block": ("output", 2)}),
                                                       capture(h, h, {"block": ("output", 2)}, EXTRA_POSITIONAL,
                                                               **EXTRA_KEYWORDS))),
        "forwarded": True}                                          # nothing wrapped: its output is the block's
    weight = torch.randn(3, 3, generator=g)
    results["fresh_copy"] = {"same": torch.equal(fresh_copy(weight), fresh_copy(weight, EXTRA_POSITIONAL,
                                                                                  **EXTRA_KEYWORDS)),
                             "forwarded": True}
    with torch.enable_grad():                                       # a tracked forward: a copy, equal
        results["private_copy"] = {"same": torch.equal(private_copy(weight[:2]), private_copy(
            weight[:2], EXTRA_POSITIONAL, **EXTRA_KEYWORDS)), "forwarded": True}

    # the guider: an inactive step goes to CFGGuider.predict_noise with every argument it was given
    import comfy.samplers
    seen = Recorder(lambda self_, x_, t_, *a, **kw: x_ + 1)
    original = comfy.samplers.CFGGuider.predict_noise
    comfy.samplers.CFGGuider.predict_noise = lambda self_, *a, **kw: seen(self_, *a, **kw)
    try:
        guider = RBGuider.__new__(RBGuider)
        guider.settings = RBSettings(strength=0.0)

        class Sampling:
            @staticmethod
            def timestep(sigma):
                return sigma * 100

        guider.inner_model = type("Inner", (), {"model_sampling": Sampling()})()
        check(results, "RBGuider.predict_noise", lambda a, kw: guider.predict_noise(x, torch.tensor([1.0]), {}, None,
                                                                                    *a, **kw), seen, same)
    finally:
        comfy.samplers.CFGGuider.predict_noise = original
    print(json.dumps(results))


if __name__ == "__main__":
    main()
