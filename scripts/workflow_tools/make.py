"""Make the editor (UI) workflows and their thumbnails from the API-format workflows.

    PYTHONPATH=scripts:tests .venv/bin/python -m workflow_tools.make [--comfyui PATH] [--only NAME] [--json-only]

For each ``workflows/api/<name>.json`` the real frontend, served by a ComfyUI started on
the tiny test models and driven in headless Chromium, builds the graph
(``app.loadApiJson``), lays it out in the pack's one style (``layout``: stages left to
right in titled, coloured groups, a note heading each stage, an About note with what the
workflow is for and exactly which model files its loaders ask for), fixes the seeds, and
serialises it to ``workflows/<name>.json`` (where ComfyUI's template browser finds a
pack's workflows), with a thumbnail ``workflows/<name>.jpg`` (``thumbnails``: its stages
and their nodes) and a screenshot of the editor at 75 % zoom in ``docs/workflows/``
(``--json-only``: the workflows alone). The server has a stand-in photo under every name a Load
Image node asks for, so the editor sizes those nodes with their photo's preview, as a user who
put photos in ComfyUI's input folder sees them, and an empty stand-in file under every model name a
loader asks for (frontend 1.49 marks a file the server lacks as an error). The UI files are thus
exactly what the editor makes of the API twins;
``tests/comfy/test_frontend.py`` checks, in the frontend of every supported host, that they
load with their saved values, keep their groups and convert back.

The files are written by the frontend of the oldest supported host (ComfyUI 0.3.64, frontend
1.27) unless ``--comfyui``, $COMFYUI_PATH or $OMNIID_COMFYUI_HOST say otherwise: newer frontends
read what older ones write, not the reverse (frontend 1.49 on ComfyUI 0.33 adds fields and
slots 0.3.64 lacks, e.g. an output on Save Image). A workflow on core nodes the oldest host lacks
(``newer_core_nodes`` in workflows/notes.toml, e.g. FLUX.2's) is written by the first host that has them:
``OMNIID_COMFYUI_HOST=0.33.0 ... --only start_flux2_klein_rb``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import time

from omniid.cli.provision import HOST_VARIABLE, HOSTS
from omniid.cli.server import comfyui_python, find_comfyui

from support import assets
from support.browser import Chromium, open_editor
from support.testing import WORKFLOWS, populate_base, start_server

from . import layout as ui_layout
from . import thumbnails

ZOOM = 0.75
SCREENSHOTS = WORKFLOWS.parent / "docs" / "workflows"     # the editor at 75 % zoom, shown in the README

MODEL_FOLDERS = {
    "CheckpointLoaderSimple": {"ckpt_name": "checkpoints"},
    "CLIPVisionLoader": {"clip_name": "clip_vision"},
    "ControlNetLoader": {"control_net_name": "controlnet"},
    "UNETLoader": {"unet_name": "diffusion_models"},
    "CLIPLoader": {"clip_name": "text_encoders"},
    "DualCLIPLoader": {"clip_name1": "text_encoders", "clip_name2": "text_encoders"},
    "VAELoader": {"vae_name": "vae"},
    "OmniIdentityEncoderLoader": {"encoder_name": "omni_identity"},
    "OmniIdentityAdapterLoader": {"adapter_name": "ipadapter"},
    "OmniIdentityFlameLoader": {"model": "flame", "landmark_embedding": "flame"},
    "OmniIdentityFaceAnalysisLoader": {"arcface_model": "insightface"},
    "OmniIdentityPuLIDFluxLoader": {"pulid_file": "pulid", "eva_clip": "clip_vision", "face_parsing": "facexlib"},
    "OmniIdentityInfiniteYouLoader": {"infusenet": "controlnet", "image_proj": "infiniteyou", "arcface": "facexlib"},
}


# where each published file comes from (the notes name them as published)
SOURCES = {
    "v1-5-pruned-emaonly.safetensors": "stable-diffusion-v1-5/stable-diffusion-v1-5 on Hugging Face",
    "sd_xl_base_1.0.safetensors": "stabilityai/stable-diffusion-xl-base-1.0 on Hugging Face",
    "CLIP-ViT-H-14-laion2B-s32B-b79K.safetensors": "h94/IP-Adapter, models/image_encoder/model.safetensors, "
                                                   "saved under this name",
    "clip-vit-large-patch14.safetensors": "openai/clip-vit-large-patch14, model.safetensors, saved under this name",
    "ip-adapter-plus-face_sd15.safetensors": "h94/IP-Adapter, models/",
    "ip-adapter-plus-face_sdxl_vit-h.safetensors": "h94/IP-Adapter, sdxl_models/",
    "ip-adapter-faceid-plusv2_sdxl.bin": "h94/IP-Adapter-FaceID",
    "ip-adapter-faceid-plusv2_sd15.bin": "h94/IP-Adapter-FaceID",
    "flux-ip-adapter.safetensors": "XLabs-AI/flux-ip-adapter (ip_adapter.safetensors), saved under this name",
    "flux1-dev.safetensors": "black-forest-labs/FLUX.1-dev",
    "clip_l.safetensors": "comfyanonymous/flux_text_encoders",
    "t5xxl_fp16.safetensors": "comfyanonymous/flux_text_encoders",
    "ae.safetensors": "black-forest-labs/FLUX.1-dev",
    "flux1-kontext-dev.safetensors": "black-forest-labs/FLUX.1-Kontext-dev on Hugging Face",
    "flux-2-klein-4b.safetensors": "Comfy-Org/Flux-2-Klein-4B on Hugging Face, split_files/diffusion_models/",
    "qwen_3_4b.safetensors": "Comfy-Org/Flux-2-Klein-4B on Hugging Face, split_files/text_encoders/",
    "flux2-vae.safetensors": "Comfy-Org/Flux-2-Klein-4B on Hugging Face, split_files/vae/",
    "pulid_flux_v0.9.1.safetensors": "guozinan/PuLID on Hugging Face",
    "EVA02_CLIP_L_336_psz14_s6B.pt": "QuanSun/EVA-CLIP on Hugging Face",
    "infusenet_aes_bf16.safetensors": "ByteDance/InfiniteYou on Hugging Face, infu_flux_v1.0/aes_stage2/InfuseNet",
    "image_proj_model.bin": "ByteDance/InfiniteYou on Hugging Face, infu_flux_v1.0/aes_stage2",
    "recognition_arcface_ir_se50.pth": "facexlib's release assets (v0.1.0)",
    "antelopev2/glintr100.onnx": "insightface's antelopev2 model pack (its ArcFace recogniser)",
    "control_v11p_sd15_openpose.pth": "lllyasviel/ControlNet-v1-1",
    "omni_id.safetensors": "trained: the train_omni_id workflow",
    "arcface.safetensors": "trained: the train_omni_id workflow (arcface method)",
    "arcface_clip.safetensors": "trained: the train_omni_id workflow (arcface_clip method)",
}
TRAINED = ("**Omni-ID's weights are not public**: the encoder and adapter files this workflow loads come from "
           "training them yourself with the `train_omni_id` template (docs/training.md in the pack). To try the "
           "pack without training, start with a `start_...` template: they run on h94's and XLabs' public files.")


def model_lines(api: dict) -> list[str]:
    lines = []
    for node in api.values():
        for field, folder in MODEL_FOLDERS.get(node["class_type"], {}).items():
            value = node["inputs"].get(field)
            if isinstance(value, str) and value != "none":
                source = SOURCES.get(value)
                line = f"- `models/{folder}/{value}` ({node['_meta']['title']}" + (f"; from {source})" if source else ")")
                if line not in lines:
                    lines.append(line)
        if node["class_type"] == "OmniIdentityFaceAnalysisLoader":
            backend = node["inputs"].get("backend", "dlib")
            line = ("- face analysis: dlib is bundled, no file needed" if backend == "dlib" else
                    f"- `models/insightface/models/{backend.split('/', 1)[1]}/` (the insightface pack's .onnx files; "
                    "needs `requirements-insightface.txt`)")
            if line not in lines:
                lines.append(line)
    return lines


def template_notes() -> dict:
    """workflows/notes.toml: name -> {title, purpose}."""
    import tomllib
    return tomllib.loads((WORKFLOWS / "notes.toml").read_text(encoding="utf-8"))


def note_text(name: str, api: dict, notes: dict) -> str:
    info = notes[name]
    text = [f"## {info['title']}", "", info["purpose"]]
    if info.get("trained"):
        text += ["", TRAINED]
    if info.get("duration"):
        text += ["", info["duration"]]
    text += ["", "**Model files** (rename in the loaders if yours differ):"]
    text += model_lines(api) or ["- none"]
    inputs = sorted({n["inputs"]["image"] for n in api.values() if n["class_type"] == "LoadImage"})
    if inputs:
        text += ["", "**Photos**: load your own in " + ", ".join(f"`{i}`" for i in inputs) + "."]
    text += ["", "Pack: ComfyUI-OmniIdentity. API twin: `workflows/api/" + name + ".json`."]
    return "\n".join(text)


def _stage_rows(ui: dict, groups: list[dict], api: dict) -> list[tuple[str, str, list[str]]]:
    titles = {int(i): node["_meta"]["title"] for i, node in api.items()}
    return [(g["title"], g["color"], [titles[i] for i in g["ids"]]) for g in groups]


def oldest_host() -> str:
    return min(HOSTS, key=lambda version: tuple(int(part) for part in version.split(".")))


def example_photos(folder: Path) -> dict[str, Path]:
    """A stand-in photo in ``folder`` for every image name the API workflows' Load Image nodes ask for: a grey
    square saying "your photo" (the preview the editor adds has one height whatever the photo)."""
    from PIL import Image, ImageDraw, ImageFont
    wanted = sorted({node["inputs"]["image"] for path in (WORKFLOWS / "api").glob("*.json")
                     for node in json.loads(path.read_text()).values() if node["class_type"] == "LoadImage"})
    photos = {}
    for name in wanted:
        image = Image.new("RGB", (512, 512), (90, 92, 96))
        ImageDraw.Draw(image).text((256, 256), f"your photo\n{name}", fill=(230, 230, 230), anchor="mm",
                                   align="center", font=ImageFont.load_default(size=40))
        photos[name] = folder / name
        image.save(photos[name])
    return photos


def stand_in_models(base: Path) -> None:
    """An empty file under every model name the API workflows' loaders ask for, where the tiny models have none: the
    editor then shows the loaders as a user who has the files sees them (frontend 1.49 marks a missing file as an
    error). The generator's server lists them and never loads them."""
    for path in (WORKFLOWS / "api").glob("*.json"):
        for node in json.loads(path.read_text()).values():
            for field, folder in MODEL_FOLDERS.get(node["class_type"], {}).items():
                value = node["inputs"].get(field)
                target = base / "models" / folder / str(value)
                if isinstance(value, str) and value != "none" and not target.exists():
                    target.parent.mkdir(parents=True, exist_ok=True)
                    target.touch()


def build_all(url: str, names: list[str] | None = None, pictures: bool = True) -> list[Path]:
    """Editor workflow, thumbnail and 75 % screenshot of each API workflow (or of ``names``)."""
    notes = template_notes()
    written = []
    with Chromium(width=1600, height=1000) as browser:
        page = open_editor(browser, url)
        print("written by frontend", page.evaluate("window.__COMFYUI_FRONTEND_VERSION__ || 'unknown'"),
              file=sys.stderr)
        for api_path in sorted((WORKFLOWS / "api").glob("*.json")):
            name = api_path.stem
            if names and name not in names:
                continue
            api = json.loads(api_path.read_text())
            info = notes[name]
            groups = ui_layout.plan(api, info.get("stages", {}), info.get("stage_notes", {}))
            ui = page.evaluate(ui_layout.build_script(name, api, groups, note_text(name, api, notes), ZOOM))
            target = WORKFLOWS / f"{name}.json"
            target.write_text(json.dumps(ui, indent=1) + "\n")
            written.append(target)
            if not pictures:
                continue
            written.append(thumbnails.thumbnail(WORKFLOWS / f"{name}.jpg", info["title"],
                                                _stage_rows(ui, groups, api)))
            box = page.evaluate(ui_layout.AT_ZOOM % {"scale": ZOOM})
            # room for the editor's menus around the canvas
            page.send("Emulation.setDeviceMetricsOverride", width=box["width"] + 200, height=box["height"] + 300,
                      deviceScaleFactor=1, mobile=False)
            time.sleep(0.5)
            clip = page.evaluate(ui_layout.DRAW % {"scale": ZOOM, **box})
            time.sleep(0.5)
            SCREENSHOTS.mkdir(parents=True, exist_ok=True)
            written.append(page.screenshot(SCREENSHOTS / f"{name}.jpg", clip=clip, quality=80))
            page.evaluate(ui_layout.SHOW_OVERLAYS)
            page.send("Emulation.clearDeviceMetricsOverride")
        page.close()
    return written


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_PATH, else the one scripts/setup.sh recorded)")
    parser.add_argument("--only", action="append", help="workflow names to rebuild (default: all)")
    parser.add_argument("--json-only", action="store_true",
                        help="write the editor workflows only (no thumbnails, no editor screenshots)")
    args = parser.parse_args(argv)
    if not args.comfyui:
        os.environ.setdefault(HOST_VARIABLE, oldest_host())
    comfyui = Path(args.comfyui) if args.comfyui else find_comfyui()
    if comfyui is None:
        print("error: no ComfyUI checkout (set COMFYUI_PATH)", file=sys.stderr)
        return 3
    tiny = assets.tiny_models(comfyui, comfyui_python(comfyui))
    base = populate_base(assets.scratch_dir("omniid-ui-"), tiny, example_photos(assets.scratch_dir("omniid-ui-photos-")))
    stand_in_models(base)
    server = start_server(comfyui, base)
    try:
        for path in build_all(server.url, args.only, pictures=not args.json_only):
            print(path.relative_to(WORKFLOWS.parent))
    finally:
        server.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
