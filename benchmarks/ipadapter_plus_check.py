"""Side by side with IPAdapter_plus (cubiq/ComfyUI_IPAdapter_plus at the commit vendored in
../shared/vendor/, loaded from that archive, never copied into the pack), in one real ComfyUI.

Default (in process, a couple of minutes on a CPU; ``--quick``: the CI subset, 3 steps on an 8 x 8
latent): IPAdapter_plus's IPAdapterAdvanced against the pack's IPAdapter_plus compatible apply
(``comfy_host.ipadapter_plus``, node OmniIdentityApplyIPAdapterCompat) on identical random weights:
small UNets with the SD1.5 and SDXL block structure IPAdapter_plus hard-codes, random h94 files of
every kind (Plus, Plus-Face, Full-Face, base, FaceID, FaceID Portrait, FaceID Plus v1 and v2), a
non-square photo, two photos with each combine mode, a negative image, a mask, weights 0.5 / 0.9 /
1 / 1.3, a start/end window, every weight type and every embeds scaling (tests/support/
ipadapter_plus_ref.py). Figure per case: relative L2 of the sampled latents (3 Euler steps, CFG 5),
and IPAdapter_plus's latent against the model without it (how much there was to get right).

``--http``: the whole ComfyUI server with both packs in custom_nodes, a full-size random SD1.5 UNet,
the random full-size CLIP-H and an h94 Plus-Face file: IPAdapter_plus's IPAdapterAdvanced at its
defaults (V only) against the pack's compatible node, and against Apply Identity Adapter at its
defaults (h94's own conventions: the middle block, CLIP's mean colour as the unconditional image).
Figures: relative L2 of the latents and of the decoded images.

    .venv/bin/python benchmarks/ipadapter_plus_check.py [--quick]
    .venv/bin/python benchmarks/ipadapter_plus_check.py --http

Last line: RESULT {json}.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
from pathlib import Path

import sd15_harness as harness
import support_path  # noqa: F401  (tests/support importable as ``support``)

BUILD = """
import sys, json, torch
sys.path.insert(0, {comfyui!r}); sys.path.insert(0, {tests!r}); sys.argv = sys.argv[:1]
import comfy.cli_args; comfy.cli_args.args.cpu = True
import comfy.ops
from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel
from safetensors.torch import load_file, save_file
from tiny_models import initialise
from inprocess import SD15_UNET
unet = UNetModel(**SD15_UNET, operations=comfy.ops.disable_weight_init)
initialise(unet, torch.Generator().manual_seed(11))
tiny = load_file({tiny!r})
state = {{k: v for k, v in tiny.items() if not k.startswith("model.diffusion_model.")}}
state.update({{"model.diffusion_model." + k: v.detach().to(torch.float16).contiguous() for k, v in unet.state_dict().items()}})
save_file(state, {out!r})
"""
SD15_LAYERS = [320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 320, 1280]


def build_models(comfyui: Path, python: str, folder: Path) -> dict:
    """The full-size random SD1.5 checkpoint and the random Plus-Face file (cached)."""
    import torch
    from safetensors.torch import save_file
    from support import assets
    from support.ip_layouts import flat, h94_checkpoint
    folder.mkdir(parents=True, exist_ok=True)
    ckpt, plus_face = folder / "omniid_random_sd15_full.safetensors", folder / "ip-adapter-plus-face_sd15.safetensors"
    tiny = assets.tiny_models(comfyui, python) / "checkpoints" / "omniid_tiny_sd15.safetensors"
    if not ckpt.is_file():
        tests = str(Path(support_path.TESTS))
        code = BUILD.format(comfyui=str(comfyui), tests=str(Path(tests) / "comfy"), tiny=str(tiny), out=str(ckpt))
        subprocess.run([python, "-c", code], check=True)
    if not plus_face.is_file():
        nested = h94_checkpoint("plus_face", 768, SD15_LAYERS, seed=5, clip_width=1280, resampler=768, queries=16)
        save_file(flat(nested), str(plus_face))
    del torch
    return {"checkpoint": ckpt, "plus_face": plus_face}


def graphs(args, photo: str) -> dict:
    """name -> API prompt; each samples the same latent with the same seed and saves latent and image."""
    common = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "omniid_random_sd15_full.safetensors"}},
        "clipv": {"class_type": "CLIPVisionLoader", "inputs": {"clip_name": "omniid_random_clip_vit_h.safetensors"}},
        "photo": {"class_type": "LoadImage", "inputs": {"image": photo}},
        "pos": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "a portrait photo"}},
        "neg": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["ckpt", 1], "text": "blurry"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": args.size, "height": args.size, "batch_size": 1}},
    }

    def sampled(model, name):
        return {**common, "sample": {"class_type": "KSampler", "inputs": {
                    "model": model, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
                    "seed": 7, "steps": args.steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "normal",
                    "denoise": 1.0}},
                "save_latent": {"class_type": "SaveLatent", "inputs": {"samples": ["sample", 0],
                                                                       "filename_prefix": f"check/{name}"}},
                "decode": {"class_type": "VAEDecode", "inputs": {"samples": ["sample", 0], "vae": ["ckpt", 2]}},
                "save": {"class_type": "SaveImage", "inputs": {"images": ["decode", 0], "filename_prefix": f"check/{name}"}}}

    out = {"ipadapter_plus": sampled(["ipa", 0], "ipadapter_plus")}
    out["ipadapter_plus"].update({
        "ipa_file": {"class_type": "IPAdapterModelLoader", "inputs": {"ipadapter_file": "ip-adapter-plus-face_sd15.safetensors"}},
        "ipa": {"class_type": "IPAdapterAdvanced", "inputs": {
            "model": ["ckpt", 0], "ipadapter": ["ipa_file", 0], "image": ["photo", 0], "weight": args.weight,
            "weight_type": "linear", "combine_embeds": "concat", "start_at": 0.0, "end_at": 1.0,
            "embeds_scaling": "V only", "clip_vision": ["clipv", 0]}}})
    adapter = {"class_type": "OmniIdentityAdapterLoader", "inputs": {"adapter_name": "ip-adapter-plus-face_sd15.safetensors"}}
    compat = sampled(["apply", 0], "pack_compatible")
    compat.update({"adapter": adapter, "apply": {"class_type": "OmniIdentityApplyIPAdapterCompat", "inputs": {
        "model": ["ckpt", 0], "adapter": ["adapter", 0], "clip_vision": ["clipv", 0], "image": ["photo", 0],
        "weight": args.weight, "weight_type": "linear", "combine_embeds": "concat", "start_at": 0.0, "end_at": 1.0,
        "embeds_scaling": "V only"}}})
    out["pack_compatible"] = compat
    defaults = sampled(["apply", 0], "pack_defaults")
    defaults.update({
        "embeds": {"class_type": "OmniIdentityEncodeBaseline", "inputs": {
            "method": "clip", "images": ["photo", 0], "clip_vision": ["clipv", 0]}},
        "adapter": adapter,
        "apply": {"class_type": "OmniIdentityApplyAdapter", "inputs": {
            "model": ["ckpt", 0], "adapter": ["adapter", 0], "embeds": ["embeds", 0], "weight": args.weight,
            "start_at": 0.0, "end_at": 1.0}}})
    out["pack_defaults"] = defaults
    out["plain"] = sampled(["ckpt", 0], "plain")
    return out


def unpacked_ipadapter_plus() -> Path:
    """IPAdapter_plus unpacked from the vendored archive into a temporary folder."""
    import tarfile
    from support import assets
    from support.ipadapter_plus_ref import ARCHIVE
    folder = assets.scratch_dir("omniid-ipa-src-")
    with tarfile.open(ARCHIVE) as archive:
        archive.extractall(folder, filter="data")
    return folder / "ComfyUI_IPAdapter_plus"


def inprocess(args) -> None:
    harness.ensure_comfyui()
    import comfy.cli_args
    comfy.cli_args.args.cpu = True
    import torch
    from support import ipadapter_plus_ref as ref
    torch.set_num_threads(1)       # small models: one thread is fastest on a shared CPU
    quick = dict(steps=3, size=8, only=ref.QUICK) if args.quick else {}
    result = ref.run(**quick)
    from support import ipadapter_plus_nodes_check as nodes_check
    result["converter_layout"] = nodes_check.converter_layout_problems()
    result["node_checks"] = nodes_check.node_checks()
    worst = max(result["cases"].values())
    print(f"{len(result['cases'])} cases, worst latent rel L2 {worst:.2e}; smallest effect "
          f"{min(result['effect'].values()):.2e}", flush=True)
    print("RESULT " + json.dumps({**result, "worst": worst, "quick": args.quick}))


def examples(args) -> None:
    """IPAdapter_plus's example workflows and their converted twins (tests/support/ipadapter_plus_examples.py)."""
    comfyui = harness.ensure_comfyui()
    import torch
    from omniid.cli.server import comfyui_python
    from support import ipadapter_plus_examples as ex
    torch.set_num_threads(2)
    only = set(args.only.split(",")) if args.only else (set(ex.QUICK) if args.quick else None)
    result = ex.run(comfyui, comfyui_python(comfyui), only=only)
    worst = max(e["worst"] for e in result["examples"].values())
    print(f"{len(result['examples'])} examples, worst latent rel L2 {worst:.2e}", flush=True)
    print("RESULT " + json.dumps({**result, "worst": worst, "quick": args.quick}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="in process: the CI subset of cases")
    parser.add_argument("--http", action="store_true", help="the whole server with a full-size SD1.5 (slow)")
    parser.add_argument("--examples", action="store_true",
                        help="IPAdapter_plus's example workflows against their converted twins (--quick: a subset)")
    parser.add_argument("--only", help="--examples: comma-separated example file names")
    parser.add_argument("--ipadapter-plus", help="--http: a checkout of IPAdapter_plus (default: the vendored archive)")
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--weight", type=float, default=0.7)
    args = parser.parse_args()
    if args.examples:
        examples(args)
        return
    if not args.http:
        inprocess(args)
        return
    args.ipadapter_plus = args.ipadapter_plus or str(unpacked_ipadapter_plus())
    comfyui = harness.ensure_comfyui()
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file

    from omniid.cli.client import ComfyClient
    from omniid.cli.server import comfyui_python
    from support import assets
    from support.testing import populate_base, start_server

    python = comfyui_python(comfyui)
    models = build_models(comfyui, python, assets.cache_dir() / "ipadapter_plus_check")
    photo = assets.face_photos() / "obama.jpg"            # not square: exercises the crop convention
    base = populate_base(assets.scratch_dir("omniid-ipa-"), assets.tiny_models(comfyui, python),
                         {"photo.jpg": photo})
    (base / "models" / "checkpoints" / models["checkpoint"].name).symlink_to(models["checkpoint"])
    (base / "models" / "ipadapter").mkdir(parents=True, exist_ok=True)
    (base / "models" / "ipadapter" / models["plus_face"].name).symlink_to(models["plus_face"])
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    (base / "custom_nodes" / "ComfyUI_IPAdapter_plus").symlink_to(Path(args.ipadapter_plus).resolve())
    server = start_server(comfyui, base)
    try:
        client = ComfyClient(server.url)
        for name, prompt in graphs(args, "photo.jpg").items():
            client.run(prompt, timeout=1800)
            print(f"sampled {name}", flush=True)
    finally:
        server.cleanup()
    latents, images = {}, {}
    for name in ("ipadapter_plus", "pack_compatible", "pack_defaults", "plain"):
        latents[name] = load_file(str(sorted((base / "output" / "check").glob(f"{name}_0*.latent"))[-1]))["latent_tensor"].double()
        images[name] = torch.from_numpy(np.asarray(Image.open(sorted((base / "output" / "check").glob(
            f"{name}_0*.png"))[-1]).convert("RGB"), dtype=np.float64) / 255.0)

    shutil.rmtree(base, ignore_errors=True)

    def rel(a, b):
        return float((a - b).norm() / b.norm())

    figures = {}
    for name in ("pack_compatible", "pack_defaults", "plain"):
        figures[name] = {"latent": rel(latents[name], latents["ipadapter_plus"]),
                         "image": rel(images[name], images["ipadapter_plus"])}
        print(f"{name:40s} vs IPAdapter_plus: latent rel L2 {figures[name]['latent']:.3e}, "
              f"image rel L2 {figures[name]['image']:.3e}", flush=True)
    print("RESULT " + json.dumps({"vs_ipadapter_plus": figures, "size": args.size, "steps": args.steps,
                                  "weight": args.weight, "photo": photo.name}))


if __name__ == "__main__":
    main()
