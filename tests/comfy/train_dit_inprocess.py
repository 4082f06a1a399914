"""Train Flow Matching on the DiTs, in process: run with the Python that runs ComfyUI.

    python tests/comfy/train_dit_inprocess.py --comfyui PATH --work DIR --families flux,flux2,qwen_image,z_image

For each family: a tiny model in the published layout (FLUX.1 schnell's, FLUX.2 klein's, Qwen-Image's over
its 16-channel latent with a frame axis, (B, 16, 1, h, w), and tests/support/tiny_diffusers.py's Z-Image),
configured by ComfyUI's detection and loaded in inference mode as ComfyUI's loaders do; ComfyUI's own small
CLIP vision model; a stand-in VAE that gives the family's latent layout (the VAE is not what is checked:
targets are encoded once, without gradients). Then, with every node run in inference mode as ComfyUI runs nodes:
- OmniIdentityTrainFlowMatching trains the clip method's adapter (it starts from a given adapter) for 3
  steps, 2 identities x 2 targets per step, 1-2 input photos each (step 0 draws one of each,
  so its targets are denoised in two groups of different token lengths);
- the node's loss at step 0 against the flow-matching loss computed here by hand on the same batch (the
  objective's own draws: sampler, noise, levels): x_t = (1 - s) x0 + s eps, the velocity v of ComfyUI's
  diffusion model patched by OmniIdentityApplyAdapter with the starting adapter and each identity's photo
  tokens, loss = mean over identities of the mean over targets of mean((eps - x0 - v)^2);
- the trained adapter through OmniIdentityApplyAdapter: 2 euler steps of ComfyUI's CFGGuider, weight 1
  against weight 0 and the plain model, and the plain model before and after training.
Prints one JSON line, family -> facts, that tests/comfy/test_training_dits.py asserts. A family this ComfyUI
does not detect (0.3.64: no FLUX.2, no Z-Image) is reported with the reason.
"""
from __future__ import annotations

import json
from pathlib import Path

import comfy_process

STEPS, BATCH, TARGETS, IMAGE_SIZE, SEED, TEXT_WIDTH = 3, 2, 2, 64, 0, 40
SIGMAS = (1.0, 0.6, 0.0)
MODEL_CLASS = {"flux": "Flux", "flux2": "Flux2", "qwen_image": "QwenImage", "z_image": "ZImage"}
LATENT = {"flux": (16,), "flux2": (32,), "qwen_image": (16, 1), "z_image": (16,)}    # channels, frames


def transformer_weights(family: str):
    """(weights in the layout ComfyUI's detection reads, the builder of ComfyUI's model from them)."""
    import torch
    torch.manual_seed(41)
    if family == "flux":
        from support.flux_layout import comfy_flux, flux_state_dict
        return (flux_state_dict(64, 4, 2, 2, seed=40, dtype=torch.float32, context=TEXT_WIDTH, vec=32, guidance=False,
                                mlp_ratio=2.0), lambda state: comfy_flux(state, 4, (4, 6, 6)))
    if family == "flux2":          # klein's layout: one double block, two single ones
        from support.flux2_layout import bfl_state_dict, comfy_flux2
        from support.tiny_diffusers import flux2_transformer
        config = (transformer := flux2_transformer()).config
        return (bfl_state_dict(transformer.state_dict()),
                lambda state: comfy_flux2(state, config.num_attention_heads, config.axes_dims_rope))
    if family == "qwen_image":     # over Qwen-Image's own 16-channel latent
        from diffusers import QwenImageTransformer2DModel
        from support.qwen_image_layout import comfy_qwen_image
        transformer = QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                                  attention_head_dim=32, num_attention_heads=2,
                                                  joint_attention_dim=TEXT_WIDTH, axes_dims_rope=(8, 12, 12))
        return transformer.state_dict(), lambda state: comfy_qwen_image(state, transformer.config)
    from support.tiny_diffusers import z_image_transformer
    from support.z_image_layout import comfy_z_image
    transformer = z_image_transformer()
    return transformer.state_dict(), lambda state: comfy_z_image(state, transformer.config)


def comfy_model(family: str):
    """ComfyUI's model of ``family`` holding small random weights, loaded in inference mode as its loaders load."""
    import torch
    state, build = transformer_weights(family)
    with torch.inference_mode():
        return build(state)


class LatentVAE:
    """Stands in for the family's VAE: (B, H, W, 3) images -> (B, channels, *frames, H / 8, W / 8) latents, each
    latent pixel a fixed mix of its 8 x 8 block's mean colour."""

    def __init__(self, torch, channels, *frames):
        self.torch, self.frames = torch, frames
        self.mix = torch.randn(channels, 3, generator=torch.Generator().manual_seed(42))

    def encode(self, images):
        pooled = self.torch.nn.functional.avg_pool2d(images.movedim(-1, 1).float(), 8) * 2 - 1
        latent = self.torch.einsum("oc,bchw->bohw", self.mix, pooled)
        return latent.reshape(*latent.shape[:2], *self.frames, *latent.shape[2:])


def velocity(torch, patched, x, sigma, positive):
    """ComfyUI's diffusion model of ``patched`` at ``x``, as a sampler calls it: the patcher's options and
    wrappers in transformer_options, the positive branch only, timestep from the model's sampling, and what the
    family's model class passes from the conditioning (FLUX.1: the pooled text as y; FLUX.2: the text left-padded
    with zeros to 512 tokens; Z-Image: the text length)."""
    import comfy.patcher_extension

    from omniid.comfy_host.layers import model_family
    from omniid.guidance.decoupled import COND
    options = {**patched.model_options["transformer_options"], "cond_or_uncond": [COND], "sigmas": sigma}
    options["wrappers"] = comfy.patcher_extension.merge_nested_dicts(dict(options.get("wrappers", {})),
                                                                     patched.wrappers, copy_dict1=True)
    dm = patched.model.diffusion_model
    context, info = positive[0]
    b, family = x.shape[0], model_family(patched)
    if family == "flux2":
        context = torch.cat([context.new_zeros(1, 512 - context.shape[1], context.shape[2]), context], dim=1)
    extra = {"flux": {"y": info["pooled_output"].expand(b, -1)}, "z_image": {"num_tokens": context.shape[1]}}
    timestep = patched.model.model_sampling.timestep(sigma)
    return dm(x, timestep, context.expand(b, -1, -1), transformer_options=options, **extra.get(family, {})).float()


def hand_loss(torch, model, vae, cv, start, dataset, positive) -> tuple:
    """Step 0's batch as the objective draws it: its loss written out, the same without the identity, and each
    identity's count of input photos."""
    from omniid.comfy_host.clip_vision import ClipVision
    from omniid.encoders.embeds import IdentityEmbeds
    from omniid.nodes.adapter_nodes import ApplyAdapter
    from omniid.training.dataset import FewToManySampler, SamplerConfig, load_image
    from omniid.training.flow_matching import noise_draw
    sampling = model.get_model_object("model_sampling")
    samples = FewToManySampler(dataset, SamplerConfig("few_to_many", 1, 2, TARGETS), SEED).sample(0, BATCH)
    with_identity, plain = [], []
    for row, sample in enumerate(samples):
        person = dataset.identities[sample.identity]
        photos = torch.cat([load_image(person.images[i], 224).permute(1, 2, 0)[None] for i in sample.inputs])
        embeds = IdentityEmbeds("clip", {"clip": ClipVision(cv).tokens(photos).float()})
        patched = ApplyAdapter.execute(model=model, adapter=start, embeds=embeds, weight=1.0, start_at=0.0,
                                       end_at=1.0).args[0]
        per_target, per_target_plain = [], []
        for j, index in enumerate(sample.targets):
            image = load_image(person.images[index], IMAGE_SIZE).permute(1, 2, 0)[None]
            x0 = model.model.process_latent_in(vae.encode(image)).float()
            u, eps = noise_draw(SEED, 0, row, j, x0.shape[1:])
            sigma = torch.tensor([float(sampling.percent_to_sigma(float(u)))])
            x_t = (1 - sigma) * x0 + sigma * eps[None]
            target = eps[None] - x0
            per_target.append(((target - velocity(torch, patched, x_t, sigma, positive)) ** 2).mean())
            per_target_plain.append(((target - velocity(torch, model, x_t, sigma, positive)) ** 2).mean())
        with_identity.append(torch.stack(per_target).mean())
        plain.append(torch.stack(per_target_plain).mean())
    counts = [len(sample.inputs) for sample in samples]
    return float(torch.stack(with_identity).mean()), float(torch.stack(plain).mean()), counts


def sample(torch, model, shape, positive, negative):
    """2 euler steps of ComfyUI's CFGGuider (cfg 2: both branches run)."""
    import comfy.samplers
    guider = comfy.samplers.CFGGuider(model)
    guider.set_conds(positive, negative)
    guider.set_cfg(2.0)
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(43))
    return guider.sample(noise, torch.zeros(shape), comfy.samplers.sampler_object("euler"), torch.tensor(SIGMAS),
                         disable_pbar=True, seed=43)


def check(family: str, model, work: Path) -> dict:
    import torch

    import folder_paths
    from omniid.comfy_host.clip_vision import ClipVision
    from omniid.comfy_host.folders import run_checkpoint
    from omniid.comfy_host.layers import host_layers, model_family
    from omniid.encoders.embeds import IdentityEmbeds
    from omniid.guidance.adapter import AdapterConfig, create_adapter
    from omniid.nodes.adapter_nodes import ApplyAdapter
    from omniid.nodes.training_nodes import TrainFlowMatching
    from omniid.training.dataset import IdentityDataset, load_image
    from support.ipadapter_plus_ref import clip_vision
    from support.synthetic_faces import write_identity_dataset

    vae, cv = LatentVAE(torch, *LATENT[family]), clip_vision(44)
    folder_paths.set_output_directory(str(work / "output"))
    dataset = IdentityDataset(write_identity_dataset(work / "people", identities=2, photos=4, size=IMAGE_SIZE))
    g = torch.Generator().manual_seed(45)
    conds = tuple([[torch.randn(1, 6, TEXT_WIDTH, generator=g), {"pooled_output": torch.randn(1, 32, generator=g)}]]
                  for _ in range(2))          # the pooled text: FLUX's y
    shape = (1, *LATENT[family], IMAGE_SIZE // 8, IMAGE_SIZE // 8)
    with torch.inference_mode():
        width = ClipVision(cv).tokens(torch.zeros(1, 224, 224, 3)).shape[-1]
    config = AdapterConfig(family=model_family(model), token_dim=width, embeds_kind="clip",
                           layer_dims=tuple(layer.inner_dim for layer in host_layers(model)))
    start = create_adapter(config, seed=46, name="start")

    with torch.inference_mode():
        plain_before = sample(torch, model, shape, *conds)
        hand, hand_plain, counts = hand_loss(torch, model, vae, cv, start, dataset, conds[0])
        _, trained, plot = TrainFlowMatching.execute(
            model=model, vae=vae, clip_vision=cv, dataset=dataset, positive=conds[0], adapter=start, mode="omni_id",
            image_size=IMAGE_SIZE, steps=STEPS, lr=1e-2, batch=BATCH, grad_accum=1, inputs_min=1, inputs_max=2,
            targets=TARGETS, precision="fp32", seed=SEED, run_name=f"train_{family}", resume=False, save_every=0,
            method="clip", recipe="custom").args
        losses = torch.load(run_checkpoint(f"train_{family}", "flow"), weights_only=True)["losses"].tolist()
        photo = load_image(dataset.identities[0].images[0], 224).permute(1, 2, 0)[None]
        embeds = IdentityEmbeds("clip", {"clip": ClipVision(cv).tokens(photo).float()})

        def applied(weight):
            return ApplyAdapter.execute(model=model, adapter=trained, embeds=embeds, weight=weight, start_at=0.0,
                                        end_at=1.0).args[0]
        identity, zero = sample(torch, applied(1.0), shape, *conds), sample(torch, applied(0.0), shape, *conds)
        plain_after = sample(torch, model, shape, *conds)
    changed = [not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), start.state_dict().values())]
    return {"built": True, "family": model_family(model), "latent_shape": list(shape), "losses": losses,
            "hand_loss": hand, "hand_plain_loss": hand_plain, "step0_inputs": counts, "adapter_family": trained.config.family,
            "tensors_changed": changed, "plot_shape": list(plot.shape),
            "identity_effect": float((identity - plain_after).abs().max()), "scale": float(plain_after.abs().max()),
            "weight0_equal": bool(torch.equal(zero, plain_after)),
            "plain_unchanged_by_training": bool(torch.equal(plain_before, plain_after)),
            "model_left_unpatched": not model.model_options["transformer_options"] and not model.wrappers}


def main() -> None:
    def arguments(parser):
        parser.add_argument("--work", required=True)
        parser.add_argument("--families", required=True)
    args = comfy_process.start(arguments, threads=1)
    facts = {}
    for family in args.families.split(","):
        try:
            built = comfy_model(family)
        except ValueError as error:
            if "does not detect these weights" not in str(error):
                raise
            import comfy.supported_models
            facts[family] = {"built": False, "reason": str(error),
                             "host_has_class": hasattr(comfy.supported_models, MODEL_CLASS[family])}
            continue
        facts[family] = check(family, built, Path(args.work) / family)
    print(json.dumps(facts))


if __name__ == "__main__":
    main()
