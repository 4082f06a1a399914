"""The identity adapter on the 2026 DiTs, ComfyUI against the diffusers host, in process.

    python tests/comfy/dit_parity.py --comfyui /opt/ComfyUI --work DIR --families flux2,...

For each family: a tiny diffusers folder (tests/support/tiny_diffusers.py) is written under DIR and
`omniid train --stage flow` (the command line's own main, in this process) trains an adapter on it for
3 steps; then, ComfyUI side: the transformer's weights in the family's
published layout, configured by ComfyUI's detection, the file through the pack's loader and
OmniIdentityApplyAdapter's execute. diffusers side: the same file through
``diffusers_host.apply_identity``. Prints one JSON line: the family each host finds, whether every
layer's identity K/V (cond and uncond) are bit-equal, the two models' largest output difference on a
CFG batch (cond row, uncond row), plain and with the identity, and whether weight 0 and a sigma
outside start_at/end_at leave ComfyUI's output bit-identical; on Qwen-Image, the same with -Edit's reference
images (qwen_edit_parity.py). One JSON object, family -> facts.
"""
from __future__ import annotations

import json
from pathlib import Path

import comfy_process


MODEL_CLASS = {"flux2": "Flux2", "chroma": "Chroma", "qwen_image": "QwenImage", "z_image": "ZImage"}


def comfy_model(family: str, transformer):
    if family == "flux2":
        from support.flux2_layout import bfl_state_dict, comfy_flux2
        config = transformer.config
        return comfy_flux2(bfl_state_dict(transformer.state_dict()), config.num_attention_heads,
                           config.axes_dims_rope)
    if family == "qwen_image":
        from support.qwen_image_layout import comfy_qwen_image
        return comfy_qwen_image(transformer.state_dict(), transformer.config)
    if family == "chroma":
        from support.chroma_layout import bfl_state_dict, comfy_chroma
        return comfy_chroma(bfl_state_dict(transformer.state_dict()), transformer.config)
    if family == "z_image":
        from support.z_image_layout import comfy_z_image
        return comfy_z_image(transformer.state_dict(), transformer.config)
    raise ValueError(f"no ComfyUI twin for {family}")


def diffusers_output(family: str, transformer, x, sigma, context):
    """The diffusers host's velocity for ComfyUI's latent ``x`` (Qwen-Image's: one frame, as a video)."""
    from omniid.diffusers_host.denoiser import family_host
    frames = x.ndim == 5
    v = family_host(family).velocity(transformer, x[:, :, 0] if frames else x, sigma,
                                     {"encoder_hidden_states": context}, "cpu", x.dtype, 1.0)
    return v[:, :, None] if frames else v


def transformer_of(folder: str):
    from omniid.diffusers_host.models import _class_for
    _, cls = _class_for(str(Path(folder) / "transformer"))
    return cls.from_pretrained(folder, subfolder="transformer").eval()


def host_refusal(family: str, folder: str):
    """None where this ComfyUI builds its own model of ``family`` from the weights, else why not (a host
    older than the family: ComfyUI 0.3.64 detects no FLUX.2 and no Z-Image)."""
    try:
        comfy_model(family, transformer_of(folder))
    except ValueError as error:
        if "does not detect these weights" not in str(error):
            raise
        return str(error)
    return None


def train(family: str, folder: str, work: Path) -> str:
    """The adapter file `omniid train --stage flow` writes after 3 steps on the tiny ``family`` model."""
    from omniid.cli.main import main as omniid
    from support.tiny_diffusers import write_smoke_data
    data = work / "data"
    if not (data / "encoder.json").exists():
        write_smoke_data(data)
    adapter = work / family / "trained.safetensors"
    code = omniid(["train", "--stage", "flow", "--model", folder, "--data", str(data / "identities"), "--clip",
                   f"open_clip:{data / 'tiny_vit.json'}", "--encoder-config", (data / "encoder.json").read_text(),
                   "--out", str(adapter), "--image-size", "32", "--steps", "3", "--batch", "1", "--targets", "1",
                   "--threads", "1", "--lr", "1e-2"])
    if code != 0 or not adapter.exists():
        raise SystemExit(f"omniid train --stage flow on {family} exited with {code}")
    return str(adapter)


def injections_at(patched, layer) -> tuple:
    """The identity injections ComfyUI's clone holds for a layer: in its dit block patch, or (families without
    block patches) in its attention override, by layer number."""
    options = patched.model_options["transformer_options"]
    patch = options.get("patches_replace", {}).get("dit", {}).get(layer.key)
    if patch is not None:
        return patch.injections
    override = options.get("optimized_attention_override")
    return getattr(override, "injections", {}).get(layer.number, ())


# latent channels and frame axis ComfyUI's model takes, per family
LATENT = {"flux2": lambda c: (c.in_channels, ()), "qwen_image": lambda c: (c.in_channels // 4, (1,)),
          "z_image": lambda c: (c.in_channels, ()), "chroma": lambda c: (c.in_channels // 4, ())}


def main() -> None:
    def arguments(parser):
        parser.add_argument("--work", required=True)
        parser.add_argument("--families", required=True)
    args = comfy_process.start(arguments)
    from support.tiny_diffusers import write_model_folder
    facts = {}
    for family in args.families.split(","):
        folder = write_model_folder(family, Path(args.work) / family)
        refusal = host_refusal(family, folder)
        if refusal is not None:
            import comfy.supported_models
            facts[family] = {"built": False, "reason": refusal,
                             "host_has_class": hasattr(comfy.supported_models, MODEL_CLASS[family])}
            continue
        facts[family] = {"built": True, **check(family, folder, train(family, folder, Path(args.work)))}
    print(json.dumps(facts))


def check(family: str, folder: str, adapter_file: str) -> dict:
    import torch

    from omniid.comfy_host.layers import host_layers as comfy_layers, model_family as comfy_family
    from omniid.diffusers_host.identity import apply_identity as diffusers_apply, identity_call
    from omniid.diffusers_host.layers import host_layers, model_family
    from omniid.encoders.embeds import IdentityEmbeds
    from omniid.guidance.adapter_files import load_adapter
    from omniid.guidance.decoupled import COND, UNCOND
    from omniid.nodes.adapter_nodes import ApplyAdapter

    transformer = transformer_of(folder)
    model = comfy_model(family, transformer)
    adapter = load_adapter(adapter_file, "trained_by_diffusers")
    g = torch.Generator().manual_seed(5)
    embeds = IdentityEmbeds("omni_id", {"tokens": torch.randn(16, adapter.config.token_dim, generator=g)})
    blocks = "all=1, single.1=0.5"

    def apply(weight, start_at=0.0, end_at=1.0):
        return ApplyAdapter.execute(model=model, adapter=adapter, embeds=embeds, weight=weight, start_at=start_at,
                                    end_at=end_at, blocks=blocks).args[0]

    from omniid.guidance.decoupled import BlockWeights
    patched = apply(0.8)
    diffusers_apply(transformer, adapter, adapter.identity_tokens(embeds), 0.8, blocks=BlockWeights.parse(blocks))
    c_layers, d_layers = comfy_layers(model), host_layers(transformer)
    kv_equal, weights = [], []
    for c_layer, d_layer in zip(c_layers, d_layers):
        c_inj = injections_at(patched, c_layer)[0]
        d_inj = d_layer.attention.processor.injections[0]
        kv_equal.append(all(torch.equal(c_inj.keys[b], d_inj.keys[b]) and torch.equal(c_inj.values[b], d_inj.values[b])
                            for b in (COND, UNCOND)))
        weights.append([c_inj.weight, d_inj.weight])

    channels, frames = LATENT[family](transformer.config)
    x = torch.randn(1, channels, *frames, 8, 12, generator=g).expand(2, *([-1] * (3 + len(frames)))).contiguous()
    # a cond row and an uncond row; an even token grid on each side: on odd ones ComfyUI 0.33 and diffusers 0.42
    # centre Qwen-Image's rotary positions differently (the plain models differ there, with or without identity)
    x[1] += 0.5
    width = getattr(transformer.config, "joint_attention_dim", None) or transformer.config.cap_feat_dim
    context = torch.randn(1, 5, width, generator=g).expand(2, -1, -1)
    sigma = torch.tensor([0.7, 0.7])

    import comfy.patcher_extension

    def comfy_out(m, sigmas=sigma):
        """The diffusion model's forward as a sampler runs it: the patcher's wrappers in transformer_options."""
        options = {**m.model_options["transformer_options"], "cond_or_uncond": [COND, UNCOND], "sigmas": sigmas}
        options["wrappers"] = comfy.patcher_extension.merge_nested_dicts(dict(options.get("wrappers", {})),
                                                                         m.wrappers, copy_dict1=True)
        extra = {"z_image": {"num_tokens": context.shape[1]},
                 "chroma": {"guidance": torch.zeros(2)}}.get(family, {})        # Chroma: ComfyUI's default, 0
        return m.model.diffusion_model(x, sigmas, context, transformer_options=options, **extra)

    from omniid.diffusers_host.identity import remove_identity
    with torch.no_grad():
        latent_shape = (*x.shape[:2], *x.shape[-2:])
        with identity_call(transformer, sigmas=sigma[:1], cond_or_uncond=[COND, UNCOND], latent_shape=latent_shape):
            d_identity = diffusers_output(family, transformer, x, sigma, context)
        c_identity, c_plain = comfy_out(patched), comfy_out(model)
        remove_identity(transformer)
        d_plain = diffusers_output(family, transformer, x, sigma, context)
        zero = comfy_out(apply(0.0))
        windowed = apply(0.8, start_at=0.5, end_at=0.9)
        outside = comfy_out(windowed, torch.tensor([0.99, 0.99]))
        outside_plain = comfy_out(model, torch.tensor([0.99, 0.99]))
    edit = {}
    if family == "qwen_image":           # -Edit's reference images: qwen_edit_parity.py, beside this script
        from qwen_edit_parity import edit_facts
        edit = {"edit": edit_facts(transformer, model, adapter, embeds)}
    return {
        **edit, "comfy_family": comfy_family(model), "diffusers_family": model_family(transformer),
        "adapter_family": adapter.config.family, "layers": [[l.group, l.number] for l in c_layers],
        "diffusers_layers": [[l.group, l.number] for l in d_layers], "kv_equal": kv_equal, "weights": weights,
        "plain_diff": float((c_plain - d_plain).abs().max()), "identity_diff": float((c_identity - d_identity).abs().max()),
        "identity_effect": float((d_identity - d_plain).abs().max()),
        "increment_diff": float(((c_identity - c_plain) - (d_identity - d_plain)).abs().max()),
        "comfy_identity_effect": float((c_identity - c_plain).abs().max()), "scale": float(d_plain.abs().max()),
        "uncond_effect": float((c_identity[1] - c_plain[1]).abs().max()),
        "weight0_equal": bool(torch.equal(zero, c_plain)), "outside_window_equal": bool(torch.equal(outside, outside_plain)),
        "window_patched": sum(1 for layer in c_layers if injections_at(windowed, layer))}


if __name__ == "__main__":
    main()
