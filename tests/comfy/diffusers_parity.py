"""The diffusers host against ComfyUI's, in process: an adapter file trained by the diffusers host
(`omniid train --stage flow`) on a diffusers UNet with tests/comfy's small SD1.5 layout.

    python tests/comfy/diffusers_parity.py --comfyui /opt/ComfyUI --folder MODEL --adapter FILE

ComfyUI side: the UNet's weights converted to ComfyUI's layout with ComfyUI's own key map, the
file through the pack's loader, and OmniIdentityApplyAdapter (the node's execute). diffusers
side: the same file through ``diffusers_host.apply_identity``. Prints one JSON line: the layers
each host finds, whether every layer's identity K/V (cond and uncond) and weight are equal,
and the largest difference of the two models' outputs, plain and with the identity, for a CFG
batch (cond row, uncond row).
"""
from __future__ import annotations

import json
from pathlib import Path

import comfy_process



def small_sd15_config() -> dict:
    """tests/comfy/inprocess.py's small SD1.5 layout (read by path: this folder's name is ComfyUI's package's)."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("omniid_inprocess", Path(__file__).with_name("inprocess.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return dict(module.SMALL_SD15_UNET)


def main() -> None:
    def add_arguments(parser):
        parser.add_argument("--folder", required=True)
        parser.add_argument("--adapter", required=True)
    args = comfy_process.start(add_arguments)
    import comfy.model_patcher
    import comfy.supported_models
    import comfy.utils
    import torch
    from diffusers import UNet2DConditionModel

    from omniid.diffusers_host.identity import apply_identity as diffusers_apply, identity_call
    from omniid.diffusers_host.layers import host_layers
    from omniid.encoders.embeds import IdentityEmbeds
    from omniid.guidance.adapter_files import load_adapter
    from omniid.guidance.decoupled import COND, UNCOND
    from omniid.nodes.adapter_nodes import ApplyAdapter
    from omniid.comfy_host.layers import unet_layers

    unet = UNet2DConditionModel.from_pretrained(args.folder, subfolder="unet").eval()
    config = comfy.supported_models.SD15(small_sd15_config())
    config.set_inference_dtype(torch.float32, None)
    base = config.get_model({})
    key_map = comfy.utils.unet_to_diffusers(config.unet_config)
    diffusers_sd = unet.state_dict()
    converted = {comfy_key: diffusers_sd[d_key] for d_key, comfy_key in key_map.items() if d_key in diffusers_sd}
    missing, unexpected = base.diffusion_model.load_state_dict(converted, strict=False)
    cpu = torch.device("cpu")
    model = comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)

    adapter = load_adapter(args.adapter, "trained_by_diffusers")
    g = torch.Generator().manual_seed(5)
    embeds = IdentityEmbeds("omni_id", {"tokens": torch.randn(16, adapter.config.token_dim, generator=g)})
    blocks = "all=1, output.1=0.5, middle=1.5"
    patched = ApplyAdapter.execute(model=model, adapter=adapter, embeds=embeds, weight=0.8, start_at=0.0, end_at=1.0,
                                   blocks=blocks).args[0]
    diffusers_apply(unet, adapter, adapter.identity_tokens(embeds), 0.8,
                    blocks=__import__("omniid.guidance.decoupled", fromlist=["BlockWeights"]).BlockWeights.parse(blocks))

    comfy_layers, d_layers = unet_layers(model), host_layers(unet)
    patches = patched.model_options["transformer_options"]["patches_replace"]["attn2"]
    kv_equal, weights = [], []
    for c_layer, d_layer in zip(comfy_layers, d_layers):
        c_inj = patches[c_layer.key].injections[0]
        d_inj = d_layer.attention.processor.patch.injections[0]
        kv_equal.append(all(torch.equal(c_inj.keys[b], d_inj.keys[b]) and torch.equal(c_inj.values[b], d_inj.values[b])
                            for b in (COND, UNCOND)))
        weights.append([c_inj.weight, d_inj.weight])

    x = torch.randn(2, 4, 16, 16, generator=g)
    t = torch.tensor([600, 600])
    context = torch.randn(1, 7, 768, generator=g).expand(2, -1, -1)

    def comfy_out(m):
        options = {**m.model_options["transformer_options"], "cond_or_uncond": [COND, UNCOND],
                   "sigmas": torch.tensor([1.0, 1.0])}
        return base.diffusion_model(x, timesteps=t, context=context, transformer_options=options)

    with torch.no_grad():
        with identity_call(unet, cond_or_uncond=[COND, UNCOND]):
            d_identity = unet(x, t, encoder_hidden_states=context).sample
        c_identity, c_plain = comfy_out(patched), comfy_out(model)
        from omniid.diffusers_host.identity import remove_identity
        remove_identity(unet)
        d_plain = unet(x, t, encoder_hidden_states=context).sample
    # a mask and a sigma window: the node's start_at/end_at become sigmas with ComfyUI's schedule; the
    # diffusers host is given those sigmas, and both are run inside and outside the window
    mask = torch.zeros(1, 32, 32)
    mask[:, :, 10:] = 1.0
    masked = ApplyAdapter.execute(model=model, adapter=adapter, embeds=embeds, weight=0.8, start_at=0.2, end_at=0.6,
                                  attn_mask=mask, blocks="all=1").args[0]
    first = masked.model_options["transformer_options"]["patches_replace"]["attn2"][comfy_layers[0].key].injections[0]
    window = (first.sigma_start, first.sigma_end)
    from omniid.diffusers_host.denoiser import unet_sigma_window
    own_window = unet_sigma_window(0.2, 0.6)
    diffusers_apply(unet, adapter, adapter.identity_tokens(embeds), 0.8, sigma_start=window[0], sigma_end=window[1],
                    mask=mask)
    masked_diff = {}
    with torch.no_grad():
        for name, sigma in (("inside", (window[0] * window[1]) ** 0.5), ("outside", window[0] * 1.5)):
            options = {**masked.model_options["transformer_options"], "cond_or_uncond": [COND, UNCOND],
                       "sigmas": torch.tensor([sigma, sigma])}
            c_out = base.diffusion_model(x, timesteps=t, context=context, transformer_options=options)
            with identity_call(unet, sigmas=torch.tensor([sigma]), cond_or_uncond=[COND, UNCOND]):
                d_out = unet(x, t, encoder_hidden_states=context).sample
            masked_diff[name] = float((c_out - d_out).abs().max())
            masked_diff[name + "_effect"] = float((d_out - d_plain).abs().max())
        remove_identity(unet)
    from omniid.diffusers_host.denoiser import flux_percent_to_sigma
    from support.flux_layout import comfy_flux, flux_state_dict
    tiny_flux = comfy_flux(flux_state_dict(hidden=64, heads=4, depth=1, single=1, context=48, vec=32), 4, (4, 6, 6))
    flux_sampling = tiny_flux.get_model_object("model_sampling")     # FLUX dev's schedule, as ComfyUI detects it
    percents = [0.0, 0.001, 0.2, 0.5, 0.6, 0.999, 1.0]
    flux_sigmas = [[float(flux_sampling.percent_to_sigma(p)), flux_percent_to_sigma(p)] for p in percents]
    print(json.dumps({"window": list(window), "own_window": list(own_window), "flux_sigmas": flux_sigmas, "masked": masked_diff,
        "comfy_layers": [[l.group, l.number] for l in comfy_layers], "diffusers_layers": [[l.group, l.number] for l in d_layers],
        "converted": len(converted), "missing": len(missing), "unexpected": len(unexpected),
        "kv_equal": kv_equal, "weights": weights,
        "plain_diff": float((c_plain - d_plain).abs().max()), "identity_diff": float((c_identity - d_identity).abs().max()),
        "identity_effect": float((d_identity - d_plain).abs().max()), "scale": float(d_plain.abs().max())}))


if __name__ == "__main__":
    main()
