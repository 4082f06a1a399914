"""RB-Guidance on FLUX.1 in a real ComfyUI: the node on the tiny FLUX.1 dev from ComfyUI's loaders."""
from support.graph import Graph


def _text(result, node_id):
    return "\n".join(result.outputs.get(node_id, {}).get("text", []))


def test_flux_guider_from_the_loaders(comfy, comfy_server):
    """The same node on the tiny FLUX.1 dev from ComfyUI's loaders (FluxGuidance, cfg 1): strength 8.5 moves
    the latent ComfyUI's CFGGuider samples, and the preview says which masks and block (strength 0's
    bit-exactness and the push's value are checked in process on both hosts: test_rb_flux.py). Three steps,
    the last guided (sigma 0.61 with FLUX's shift: start_fraction 0.7 here)."""
    g = Graph()
    unet = g.out(g.add("UNETLoader", unet_name="omniid_tiny_flux.safetensors", weight_dtype="default"))
    vae = g.out(g.add("VAELoader", vae_name="omniid_tiny_flux_ae.safetensors"))
    positive = g.out(g.add("FluxGuidance", guidance=3.5,
                           conditioning=g.out(g.add("OmniTestFluxText", text="a photo of a man", tokens=8))))
    negative = g.out(g.add("ConditioningZeroOut", conditioning=positive))
    reference = g.out(g.add("ImageScale", image=g.photos("id_1.png"), upscale_method="area", width=64, height=64,
                            crop="center"))
    sigmas = g.out(g.add("BasicScheduler", model=unet, scheduler="simple", steps=3, denoise=1.0))
    latent = g.out(g.add("EmptySD3LatentImage", width=64, height=64, batch_size=1))
    guiders = {"plain": g.add("CFGGuider", model=unet, positive=positive, negative=negative, cfg=1.0)}
    for name, strength in (("rb", 8.5),):
        guiders[name] = g.add("OmniIdentityRBGuidance", model=unet, positive=positive, negative=negative, cfg=1.0,
                              reference=reference, vae=vae, strength=strength, start_fraction=0.7, t0=671,
                              subject_token=3, reference_region="whole image", seed=0)
    reads = {}
    for name, guider in guiders.items():
        sample = g.add("SamplerCustomAdvanced", noise=g.out(g.add("RandomNoise", noise_seed=3)),
                       guider=g.out(guider, 0), sampler=g.out(g.add("KSamplerSelect", sampler_name="euler")),
                       sigmas=sigmas, latent_image=latent)
        g.add("SaveLatent", samples=g.out(sample, 0), filename_prefix=f"rb_flux/{name}")

        def read(name=name):
            from safetensors.torch import load_file
            folder = comfy_server.base_directory / "output" / "rb_flux"
            return load_file(str(sorted(folder.glob(f"{name}_0*.latent"))[-1]))["latent_tensor"]
        reads[name] = read
    result = comfy.run(g.nodes, timeout=900)
    plain, rb = reads["plain"](), reads["rb"]()
    change = float((rb - plain).abs().max() / plain.abs().max())
    assert 1e-5 < change < 0.5, change
    text = _text(result, guiders["rb"])
    assert "reference mask: whole image" in text and "attention of subject_token input (3)" in text
    assert "features: FLUX block 1 of 2 (double block 0)" in text            # the default: the last double block
