"""Qwen-Image-Edit's reference images with the identity adapter, ComfyUI against the diffusers host (imported by
dit_parity.py, in its process, on the tiny Qwen-Image model and adapter it built).

ComfyUI side: the reference latents as ReferenceLatent / TextEncodeQwenImageEdit(Plus) hand them to the model
(``ref_latents``, ComfyUI's default ``ref_latents_method``). diffusers side: the references' packed latents after
the generated image's in the image stream and ``img_shapes`` listing all of them, as QwenImageEditPipeline and
QwenImageEditPlusPipeline call the transformer, with no latent shape told to the host (it reads ``img_shapes``).
Both hosts' calls of ``guidance.flux_identity.identity_terms`` are recorded, to read the term it adds to each
row of the joint attention output: text, generated image, references.
"""
from __future__ import annotations

import inspect
from contextlib import contextmanager

import torch

GRID = (8, 12)                                         # the generated latent: 4 x 6 tokens
REFERENCES = {"edit": [(8, 8)], "edit_plus": [(8, 8), (4, 8)]}   # references no larger than the generated image
LARGER = [(12, 16)]                                    # 6 x 8 tokens: larger than the generated image's 4 x 6


@contextmanager
def recorded_terms(module):
    """Every identity_terms call of ``module`` as (text length, output before, output after)."""
    original, calls = module.identity_terms, []

    def recording(out, q, pe, txt_len, *args, **kwargs):
        result, residual = original(out, q, pe, txt_len, *args, **kwargs)
        calls.append((txt_len, out, result))
        return result, residual

    module.identity_terms = recording
    try:
        yield calls
    finally:
        module.identity_terms = original


def term_rows(calls, generated: int) -> dict:
    """The largest term any call added to the text rows and to the reference rows, the smallest largest term
    on the generated image's rows, and the reference rows each call saw."""
    text = gen = refs = 0.0
    gen_min, ref_rows = float("inf"), set()
    for txt_len, before, after in calls:
        term = (after - before).abs()
        text = max(text, float(term[:, :txt_len].max()))
        gen = float(term[:, txt_len:txt_len + generated].max())
        gen_min = min(gen_min, gen)
        ref_rows.add(term.shape[1] - txt_len - generated)
        if term.shape[1] > txt_len + generated:
            refs = max(refs, float(term[:, txt_len + generated:].max()))
    return {"calls": len(calls), "text_term": text, "generated_term_min": gen_min, "reference_term": refs,
            "reference_rows": sorted(ref_rows)}


@contextmanager
def zero_cond_t(transformer):
    """diffusers' Qwen-Image-Edit-2511 mode (``zero_cond_t``: the references modulated at timestep 0) on the same
    weights; ComfyUI's twin is ref_latents_method "index_timestep_zero"."""
    modules = [transformer, *transformer.transformer_blocks]
    for module in modules:
        module.zero_cond_t = True
    try:
        yield
    finally:
        for module in modules:
            module.zero_cond_t = False


def edit_facts(transformer, model, adapter, embeds) -> dict:
    import comfy.patcher_extension

    import omniid.comfy_host.identity as comfy_identity
    import omniid.diffusers_host.dit_processors as diffusers_processors
    from omniid.diffusers_host.identity import apply_identity, identity_call, remove_identity
    from omniid.diffusers_host.qwen_image import pack, unpack
    from omniid.guidance.decoupled import COND, UNCOND
    from omniid.nodes.adapter_nodes import ApplyAdapter

    forward = model.model.diffusion_model.forward
    facts = {"takes_ref_latents": "ref_latents" in inspect.signature(forward).parameters}
    if not facts["takes_ref_latents"]:
        return facts
    # ComfyUI's Qwen-Image knows -Edit-2511's mode where its model takes a default reference method
    init = inspect.signature(type(model.model.diffusion_model).__init__).parameters
    facts["timestep_zero_host"] = "default_ref_method" in init
    g = torch.Generator().manual_seed(11)
    channels = transformer.config.in_channels // 4
    x = torch.randn(1, channels, 1, *GRID, generator=g).expand(2, -1, -1, -1, -1).contiguous()
    x[1] += 0.5                                        # a cond row and an uncond row
    context = torch.randn(1, 5, transformer.config.joint_attention_dim, generator=g).expand(2, -1, -1)
    sigma = torch.tensor([0.7, 0.7])
    generated = (GRID[0] // 2) * (GRID[1] // 2)
    reference = {hw: torch.randn(1, channels, 1, *hw, generator=g).expand(2, -1, -1, -1, -1)
                 for hw in {hw for refs in (*REFERENCES.values(), LARGER) for hw in refs}}

    def apply(weight):
        return ApplyAdapter.execute(model=model, adapter=adapter, embeds=embeds, weight=weight, start_at=0.0,
                                    end_at=1.0).args[0]

    def comfy_out(m, refs, method=None):
        options = {**m.model_options["transformer_options"], "cond_or_uncond": [COND, UNCOND], "sigmas": sigma}
        options["wrappers"] = comfy.patcher_extension.merge_nested_dicts(dict(options.get("wrappers", {})),
                                                                         m.wrappers, copy_dict1=True)
        extra = {} if method is None else {"ref_latents_method": method}
        return m.model.diffusion_model(x, sigma, context, ref_latents=[reference[hw] for hw in refs],
                                       transformer_options=options, **extra)

    def diffusers_out(refs):
        tokens = torch.cat([pack(x[:, :, 0]), *(pack(reference[hw][:, :, 0]) for hw in refs)], dim=1)
        shapes = [[(1, h // 2, w // 2) for h, w in (GRID, *refs)]] * x.shape[0]
        v = transformer(hidden_states=tokens, encoder_hidden_states=context, timestep=sigma, img_shapes=shapes).sample
        return unpack(v[:, :generated], x[:, :, 0].shape)[:, :, None]

    patched, zero = apply(0.8), apply(0.0)
    apply_identity(transformer, adapter, adapter.identity_tokens(embeds), 0.8)
    d_identities = {}
    with torch.no_grad():
        for name, refs in REFERENCES.items():
            with recorded_terms(diffusers_processors) as d_calls, identity_call(transformer, sigmas=sigma[:1],
                                                                                 cond_or_uncond=[COND, UNCOND]):
                d_identity = d_identities[name] = diffusers_out(refs)
            with recorded_terms(comfy_identity) as c_calls:
                c_identity = comfy_out(patched, refs)
            c_plain = comfy_out(model, refs)
            facts[name] = {"identity_diff": float((c_identity - d_identity).abs().max()),
                           "comfy_identity_effect": float((c_identity - c_plain).abs().max()),
                           "uncond_effect": float((c_identity[1] - c_plain[1]).abs().max()),
                           "weight0_equal": bool(torch.equal(comfy_out(zero, refs), c_plain)),
                           "comfy": term_rows(c_calls, generated), "diffusers": term_rows(d_calls, generated),
                           "expected_reference_rows": sum((h // 2) * (w // 2) for h, w in refs)}
        if facts["timestep_zero_host"]:
            with zero_cond_t(transformer), identity_call(transformer, sigmas=sigma[:1], cond_or_uncond=[COND, UNCOND]):
                d_identity = diffusers_out(REFERENCES["edit"])
            facts["timestep_zero_identity_diff"] = float(
                (comfy_out(patched, REFERENCES["edit"], "index_timestep_zero") - d_identity).abs().max())
        remove_identity(transformer)
        d_plains = {}
        for name, refs in REFERENCES.items():
            d_plain = d_plains[name] = diffusers_out(refs)
            facts[name].update(plain_diff=float((comfy_out(model, refs) - d_plain).abs().max()),
                               identity_effect=float((d_identities[name] - d_plain).abs().max()),
                               scale=float(d_plain.abs().max()))
        facts["offset_plain_diff"] = float((comfy_out(model, REFERENCES["edit_plus"], "offset")
                                            - diffusers_out(REFERENCES["edit_plus"])).abs().max())
        facts["larger_reference_plain_diff"] = float((comfy_out(model, LARGER) - diffusers_out(LARGER)).abs().max())
        if facts["timestep_zero_host"]:
            with zero_cond_t(transformer):
                d_plain = diffusers_out(REFERENCES["edit"])
            facts["timestep_zero_plain_diff"] = float(
                (comfy_out(model, REFERENCES["edit"], "index_timestep_zero") - d_plain).abs().max())
            facts["timestep_zero_effect"] = float((d_plain - d_plains["edit"]).abs().max())    # vs "index"
    return facts
