"""IPAdapter_plus itself, loaded from the vendored archive into this process's ComfyUI, against the pack's
IPAdapter_plus compatible apply (``comfy_host.ipadapter_plus``) on identical random weights.

Both patch clones of the same ComfyUI UNet; each patched model samples the same latent (3 Euler steps,
CFG 5) and the latents are compared. The UNets are small but keep the block structure IPAdapter_plus
hard-codes (SD1.5: attention in input blocks 1, 2, 4, 5, 7, 8, output blocks 3-11 and the middle;
SDXL: input 4, 5 (depth 2), 7, 8 (depth 10), output 0-2 (10), 3-5 (2), middle (10)), with narrow
channels; the h94 files are random in the exact layouts IPAdapter_plus builds its projections for
(Resampler of 12 heads on SD1.5, 1280 wide with 20 heads on SDXL, 16 queries; MLPProjModel; the
base ImageProjModel of 4 tokens; FaceID's 512-wide ArcFace MLP). CLIP vision is ComfyUI's own
ClipVisionModel, small (3 layers, 64 wide, patch 32 at 224 px), random. FaceID files read a face that
a stand-in analyser "detects" (fixed embedding and keypoints) for both packs, IPAdapter_plus's through
insightface's Face record, the pack's through its DetectedFace. Needs ComfyUI importable.
"""
from __future__ import annotations

import importlib
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import torch

from . import ip_layouts as L
from .assets import scratch_dir

ARCHIVE = Path(__file__).resolve().parents[2].parent / "shared" / "vendor" / "ComfyUI_IPAdapter_plus-9d076a3d.tar.gz"
COMMIT = "9d076a3df0d2763cef5510ec5ab807f6632c39f5"
CLIP = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=3, patch_size=32,
            image_size=224, projection_dim=40, hidden_act="gelu", layer_norm_eps=1e-5, num_channels=3,
            model_type="clip_vision_model")
UNETS = {
    "sd15": dict(model_channels=32, channel_mult=[1, 2, 4, 4], num_res_blocks=[2, 2, 2, 2], num_heads=8,
                 num_head_channels=-1, transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
                 transformer_depth_output=[1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], transformer_depth_middle=1,
                 context_dim=64, use_linear_in_transformer=False),
    "sdxl": dict(model_channels=32, channel_mult=[1, 2, 4], num_res_blocks=[2, 2, 2], num_heads=4,
                 num_head_channels=-1, transformer_depth=[0, 0, 2, 2, 10, 10],
                 transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10], transformer_depth_middle=10,
                 context_dim=2048, use_linear_in_transformer=True),
}
ID_WIDTH = 512


def load_ipadapter_plus(folder: Path):
    """IPAdapter_plus's IPAdapterPlus module, unpacked from the archive into ``folder`` and imported."""
    with tarfile.open(ARCHIVE) as archive:
        archive.extractall(folder, filter="data")
    sys.path.insert(0, str(folder))
    return importlib.import_module("ComfyUI_IPAdapter_plus.IPAdapterPlus")


def unet(layout: str, seed: int):
    import comfy.model_patcher
    import comfy.supported_models
    config = dict(image_size=32, in_channels=4, out_channels=4, use_spatial_transformer=True, legacy=False,
                  adm_in_channels=None, use_temporal_attention=False, use_temporal_resblock=False,
                  use_checkpoint=False, **UNETS[layout])
    model_config = comfy.supported_models.SD15(dict(config))
    model_config.set_inference_dtype(torch.float32, None)
    base = model_config.get_model({})
    L.randomise(base.diffusion_model, seed)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(base, load_device=cpu, offload_device=cpu)


def clip_vision(seed: int):
    import comfy.clip_vision
    path = scratch_dir("omniid-clipv-") / "config.json"
    path.write_text(json.dumps(CLIP))
    cv = comfy.clip_vision.ClipVisionModel(str(path))
    L.randomise(cv.model, seed)
    return cv


def cross_attention_widths(model) -> list[int]:
    from omniid.comfy_host.layers import unet_layers
    return [layer.inner_dim for layer in unet_layers(model)]


def h94_file(kind: str, layout: str, widths: list[int], seed: int, token: int = 0) -> dict:
    """{"image_proj", "ip_adapter"} of ``kind`` in the layout IPAdapter_plus builds its modules for; ``token``:
    the UNet's text width (default: the small UNets' here)."""
    r = L.Random(seed)
    token = token or UNETS[layout]["context_dim"]
    clip_width, pooled = CLIP["hidden_size"], CLIP["projection_dim"]
    sdxl = layout == "sdxl"
    if kind in ("plus", "plus_face"):
        dim, heads = (1280, 20) if sdxl else (token, 12)
        proj = {"latents": (torch.randn(1, 16, dim, generator=r.generator) / dim ** 0.5).to(r.dtype),
                **resampler(r, dim, heads, clip_width, token)}
    elif kind == "portrait_unnorm":       # a Resampler over the raw ArcFace embedding (one 512-wide token)
        proj = {"latents": (torch.randn(1, 16, 1280, generator=r.generator) / 1280 ** 0.5).to(r.dtype),
                **resampler(r, 1280, 20, ID_WIDTH, token)}
    elif kind == "full_face":
        proj = {**r.linear("proj.0", clip_width, clip_width), **r.linear("proj.2", token, clip_width),
                **r.norm("proj.3", token)}
    elif kind == "base":
        proj = {**r.linear("proj", 4 * token, pooled), **r.norm("norm", token)}
    elif kind in ("faceid", "portrait"):
        tokens = 16 if kind == "portrait" else 4
        proj = {**r.linear("proj.0", 2 * ID_WIDTH, ID_WIDTH), **r.linear("proj.2", tokens * token, 2 * ID_WIDTH),
                **r.norm("norm", token)}
    elif kind in ("faceid_plus", "faceid_plusv2"):
        proj = {**r.linear("proj.0", 2 * ID_WIDTH, ID_WIDTH), **r.linear("proj.2", 4 * token, 2 * ID_WIDTH),
                **r.norm("norm", token), **resampler(r, token, token // 64, clip_width, token, "perceiver_resampler.")}
    else:
        raise ValueError(kind)
    layers = {}
    for i, width in enumerate(widths):
        layers[f"{2 * i + 1}.to_k_ip.weight"] = r.weight(width, token)
        layers[f"{2 * i + 1}.to_v_ip.weight"] = r.weight(width, token)
        if kind in ("faceid", "faceid_plus", "faceid_plusv2"):     # FaceID files carry their LoRA's keys
            layers[f"{2 * i}.to_q_lora.down.weight"] = r.weight(4, width)
            layers[f"{2 * i}.to_q_lora.up.weight"] = r.weight(width, 4)
    return {"image_proj": proj, "ip_adapter": layers}


def resampler(r, dim: int, heads: int, embedding: int, output: int, prefix: str = "") -> dict:
    """h94's Resampler body with ``heads`` 64-wide heads (its attention width need not be ``dim``)."""
    inner = 64 * heads
    state = {**r.linear(f"{prefix}proj_in", dim, embedding), **r.linear(f"{prefix}proj_out", output, dim),
             **r.norm(f"{prefix}norm_out", output)}
    for i in range(4):
        layer = f"{prefix}layers.{i}"
        state.update({**r.norm(f"{layer}.0.norm1", dim), **r.norm(f"{layer}.0.norm2", dim),
                      **r.linear(f"{layer}.0.to_q", inner, dim, bias=False),
                      **r.linear(f"{layer}.0.to_kv", 2 * inner, dim, bias=False),
                      **r.linear(f"{layer}.0.to_out", dim, inner, bias=False), **r.norm(f"{layer}.1.0", dim),
                      **r.linear(f"{layer}.1.1", 4 * dim, dim, bias=False),
                      **r.linear(f"{layer}.1.3", dim, 4 * dim, bias=False)})
    return state


FILE_NAMES = {"plus": "ip-adapter-plus_{}.safetensors", "plus_face": "ip-adapter-plus-face_{}.safetensors",
              "full_face": "ip-adapter-full-face_{}.safetensors", "base": "ip-adapter_{}.safetensors",
              "faceid": "ip-adapter-faceid_{}.safetensors", "portrait": "ip-adapter-faceid-portrait_{}.safetensors",
              "portrait_unnorm": "ip-adapter-faceid-portrait_{}_unnorm.safetensors",
              "faceid_plus": "ip-adapter-faceid-plus_{}.safetensors",
              "faceid_plusv2": "ip-adapter-faceid-plusv2_{}.safetensors"}


class StandInFaces:
    """A face 'found' at fixed keypoints with a fixed ArcFace embedding, for both packs: IPAdapter_plus calls
    ``get`` (insightface's FaceAnalysis API), the pack ``detect`` (its FaceAnalyzer API)."""

    class _Det:
        input_size = (640, 640)

    def __init__(self, seed: int, height: int, width: int):
        g = torch.Generator().manual_seed(seed)
        self.embedding = (torch.randn(ID_WIDTH, generator=g) * 20).numpy().astype(np.float32)
        centre = np.array([width / 2, height / 2])
        self.kps = (np.array([[-18, -12], [18, -12], [0, 4], [-14, 20], [14, 20]], dtype=np.float64)
                    * min(height, width) / 100 + centre).astype(np.float32)
        self.det_model = self._Det()

    def get(self, image):
        from insightface.app.common import Face
        return [Face(bbox=np.array([0, 0, 10, 10], np.float32), kps=self.kps, det_score=0.99,
                     embedding=self.embedding)]

    def detect(self, image, with_embedding: bool = True):
        from omniid.encoders.face.types import DetectedFace
        return [DetectedFace(bbox=np.array([0, 0, 10, 10.0]), score=0.99, keypoints5=self.kps.astype(np.float64),
                             landmarks=self.kps.astype(np.float64), landmark_format="kps5",
                             embedding=self.embedding.copy(), embedding_kind="arcface512")]


def paired_lora(work: Path, adapter_file: str, model, seed: int) -> dict:
    """A random LoRA on a few attention projections, saved in a loras folder ComfyUI is told about, under the
    name h94 gives a FaceID file's LoRA (<adapter>_lora.safetensors); returns its tensors."""
    import folder_paths
    from safetensors.torch import save_file
    folder = work / "loras"
    folder.mkdir(exist_ok=True)
    folder_paths.add_model_folder_path("loras", str(folder))
    g = torch.Generator().manual_seed(seed + 17)
    state = {}
    for name, module in model.model.diffusion_model.named_modules():
        if name.endswith(("attn1.to_q", "attn2.to_out.0")) and len(state) < 24:
            key = "lora_unet_" + name.replace(".", "_")
            state[f"{key}.lora_up.weight"] = torch.randn(module.weight.shape[0], 4, generator=g) * 0.3
            state[f"{key}.lora_down.weight"] = torch.randn(4, module.weight.shape[1], generator=g) * 0.3
            state[f"{key}.alpha"] = torch.tensor(4.0)
    save_file(state, str(folder / (Path(adapter_file).stem + "_lora.safetensors")))
    return state


def sample(model, seed: int, text: torch.Tensor, negative: torch.Tensor, steps: int = 3, size: int = 16) -> torch.Tensor:
    import comfy.sample
    latent = torch.zeros(1, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.no_grad():
        return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", [[text, {}]], [[negative, {}]],
                                   latent, denoise=1.0, disable_pbar=True, seed=seed).float()


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def cases(layout: str) -> list[dict]:
    """name, kind and IPAdapterAdvanced options of each comparison."""
    kinds = ("plus", "plus_face", "base") if layout == "sdxl" else ("plus", "plus_face", "full_face", "base")
    out = [dict(name=f"{kind}_defaults", kind=kind) for kind in kinds]   # (no Full-Face file exists for SDXL)
    if layout == "sdxl":
        return out + [dict(name="plus_style_transfer", kind="plus", weight_type="style transfer"),
                      dict(name="plus_composition_precise", kind="plus", weight_type="composition precise",
                           weight=0.8),
                      dict(name="base_ease_in_masked", kind="base", weight_type="ease in", mask=True),
                      dict(name="faceid_portrait_unnorm", kind="portrait_unnorm", faces=True),
                      dict(name="plus_style_and_composition", kind="plus", style_composition=False, photos=2),
                      dict(name="plus_strong_style_and_composition", kind="plus", style_composition=True)]
    out += [dict(name="plus_weight_0.5_window", kind="plus", weight=0.5, start_at=0.2, end_at=0.8),
            dict(name="plus_masked", kind="plus", mask=True),
            dict(name="plus_two_photos_concat", kind="plus", photos=2),
            dict(name="plus_two_photos_average", kind="plus", photos=2, combine_embeds="average"),
            dict(name="plus_two_photos_norm_average", kind="plus", photos=2, combine_embeds="norm average"),
            dict(name="base_two_photos_subtract", kind="base", photos=2, combine_embeds="subtract"),
            dict(name="plus_negative_image", kind="plus", negative=True),
            dict(name="base_negative_image", kind="base", negative=True),
            dict(name="faceid", kind="faceid", faces=True),
            dict(name="faceid_with_lora_0.6", kind="faceid", faces=True, lora=0.6),
            dict(name="faceid_portrait_two_photos", kind="portrait", faces=True, photos=2),
            dict(name="faceid_plus_v1", kind="faceid_plus", faces=True),
            dict(name="faceid_plusv2", kind="faceid_plusv2", faces=True, weight=0.7)]
    out += [dict(name="plus_layer_weights", kind="plus", layer_weights="0:0.5, 4:1.2, 9:0.8, 15:1", weight=0.9),
            dict(name="plus_layer_weights_composition_precise", kind="plus", weight_type="composition precise",
                 layer_weights="0:0, 3:0.8, 4:1, 5:0.6, 12:0.35", embeds_scaling="K+mean(V) w/ C penalty")]
    out += [dict(name=f"plus_{scaling}", kind="plus", embeds_scaling=scaling, weight=1.3)
            for scaling in ("K+V", "K+V w/ C penalty", "K+mean(V) w/ C penalty")]
    out += [dict(name="plus_two_photos_k_mean_v", kind="plus", photos=2, embeds_scaling="K+mean(V) w/ C penalty",
                 weight=1.3)]
    from omniid.guidance.ipadapter_plus import WEIGHT_TYPES
    out += [dict(name=f"plus_{wt}", kind="plus", weight_type=wt, weight=0.9) for wt in WEIGHT_TYPES if wt != "linear"]
    return out


QUICK = {"sd15/plus_defaults", "sd15/base_defaults", "sd15/plus_weight_0.5_window", "sd15/plus_masked",
         "sd15/plus_two_photos_average", "sd15/plus_negative_image", "sd15/faceid_with_lora_0.6",
         "sd15/faceid_plus_v1", "sd15/faceid_plusv2", "sd15/plus_two_photos_k_mean_v",
         "sd15/plus_style transfer precise", "sd15/plus_layer_weights", "sdxl/base_ease_in_masked"}


def run(layouts=("sd15", "sdxl"), seed: int = 0, steps: int = 3, size: int = 16, only=None) -> dict:
    """{"cases": {layout/name: relative L2 of the latents}, "effect": {layout/name: IPAdapter_plus vs no adapter}};
    ``only``: the layout/name keys to run (all by default)."""
    from safetensors.torch import save_file

    from omniid.comfy_host.ipadapter_plus import apply_ipadapter_plus
    from omniid.guidance.adapter_files import load_adapter
    work = scratch_dir("omniid-ipa-ref-")
    ipa = load_ipadapter_plus(work / "vendor")
    ipa_utils = importlib.import_module("ComfyUI_IPAdapter_plus.utils")
    cv = clip_vision(seed + 3)
    g = torch.Generator().manual_seed(seed + 7)
    photos = torch.rand(2, 180, 260, 3, generator=g)            # not square: the centre crop is exercised
    negative_photo = torch.rand(1, 224, 224, 3, generator=g)
    mask = torch.zeros(1, 128, 128)
    mask[:, 20:100, 30:110] = 1.0
    results, effects, face_images = {}, {}, {}
    for layout in layouts:
        chosen = [case for case in cases(layout) if only is None or f"{layout}/{case['name']}" in only]
        if not chosen:
            continue
        model = unet(layout, seed + 11)
        widths = cross_attention_widths(model)
        context = UNETS[layout]["context_dim"]
        text = torch.randn(1, 3, context, generator=g)
        negative = torch.randn(1, 3, context, generator=g)
        plain = sample(model, seed, text, negative, steps, size)
        files = {}
        for case in chosen:
            kind = case["kind"]
            if kind not in files:
                path = work / FILE_NAMES[kind].format(layout)
                save_file(L.flat(h94_file(kind, layout, widths, seed + 5 + len(files))), str(path))
                files[kind] = (ipa_utils.ipadapter_model_loader(str(path)), load_adapter(str(path), path.name))
            nested, adapter = files[kind]
            image = photos[:case.get("photos", 1)]
            faces = StandInFaces(seed + 13, *image.shape[1:3]) if case.get("faces") else None
            options = dict(weight=case.get("weight", 1.0), weight_type=case.get("weight_type", "linear"),
                           combine_embeds=case.get("combine_embeds", "concat"), start_at=case.get("start_at", 0.0),
                           end_at=case.get("end_at", 1.0), embeds_scaling=case.get("embeds_scaling", "V only"),
                           image_negative=negative_photo if case.get("negative") else None,
                           attn_mask=mask if case.get("mask") else None, layer_weights=case.get("layer_weights", ""))
            base, lora = model, {}
            if case.get("lora"):       # IPAdapter_plus's FaceID unified loader: the paired LoRA on the model first
                import comfy.sd
                lora_file = paired_lora(work, FILE_NAMES[kind].format(layout), model, seed)
                base = comfy.sd.load_lora_for_models(model, None, lora_file, case["lora"], 0)[0]
                lora = dict(faceid_lora="auto", faceid_lora_strength=case["lora"])
            if "style_composition" in case:       # IPAdapter Style & Composition (SDXL): a second photo for composition
                composition = photos[1:2].flip(1)
                style = dict(weight_style=1.2, weight_composition=0.8, expand_style=case["style_composition"],
                             combine_embeds="average", start_at=0.0, end_at=1.0, embeds_scaling="V only")
                # its node's own steps (the style image and weight, the composition type), straight into its
                # engine: the node's SDXL check asks for ComfyUI's SDXL model class, these UNets use SD1.5's
                theirs, their_faces = ipa.ipadapter_execute(
                    base.clone(), nested, cv, image=image, image_composition=composition, weight=style["weight_style"],
                    weight_composition=style["weight_composition"], combine_embeds=style["combine_embeds"],
                    weight_type="strong style and composition" if style["expand_style"] else "style and composition",
                    start_at=0.0, end_at=1.0, embeds_scaling="V only")
                options.update(weight=1.2, weight_composition=0.8, combine_embeds="average", image_composition=composition,
                               weight_type=("strong style and composition" if case["style_composition"]
                                            else "style and composition"))
            else:
                theirs, their_faces = ipa.IPAdapterAdvanced().apply_ipadapter(base, nested, image=image, clip_vision=cv,
                                                                              insightface=faces, **options)
            ours, our_faces = apply_ipadapter_plus(model, adapter, cv, image, face_analysis=faces, **options, **lora)
            if faces is not None:      # FaceID's face_image output: the aligned faces
                face_images[f"{layout}/{case['name']}"] = float((our_faces - their_faces).abs().max())
            reference = sample(theirs, seed, text, negative, steps, size)
            key = f"{layout}/{case['name']}"
            results[key] = relative(sample(ours, seed, text, negative, steps, size), reference)
            effects[key] = relative(plain, reference)
            print(f"{key:48s} latent rel L2 {results[key]:.2e} (IPAdapter_plus vs none {effects[key]:.2e})",
                  flush=True)
    return {"cases": results, "effect": effects, "face_images": face_images, "prep_image": prep_image_difference(ipa),
            "noise_image": noise_image_difference(ipa), "ipadapter_plus_commit": COMMIT}


def prep_image_difference(ipa, seed: int = 0) -> float:
    """Largest difference between IPAdapter_plus's Prep Image For ClipVision and the pack's, over photo shapes,
    filters, crop positions and sharpening."""
    from omniid.encoders.image_prep import prep_for_clip_vision
    g = torch.Generator().manual_seed(seed + 23)
    worst = 0.0
    for shape in ((2, 90, 131, 3), (1, 150, 101, 3)):
        image = torch.rand(*shape, generator=g)
        for interpolation in ("LANCZOS", "BICUBIC"):
            for position in ("top", "bottom", "left", "right", "center", "pad"):
                for sharpening in (0.0, 0.4):
                    theirs = ipa.PrepImageForClipVision().prep_image(image, interpolation, position, sharpening)[0]
                    ours = prep_for_clip_vision(image, interpolation, position, sharpening)
                    worst = max(worst, float((theirs - ours).abs().max()))
    return worst


def noise_image_difference(ipa, seed: int = 0) -> float:
    """Largest difference between IPAdapter_plus's IPAdapter Noise and the pack's over its three types, two
    strengths, blur off and 4 (made 5), photos of three shapes (a batch of one and of two, 224 square) and none.
    Their noise comes from a seed reset on torch's global generator; the global state is put back after."""
    from omniid.encoders.noise_images import NOISE_TYPES, noise_image
    g = torch.Generator().manual_seed(seed + 37)
    state = torch.get_rng_state()
    worst = 0.0
    for shape in ((1, 180, 260, 3), (2, 301, 150, 3), (1, 224, 224, 3), None):
        image = None if shape is None else torch.rand(*shape, generator=g)
        for kind in NOISE_TYPES:
            for strength in (0.3, 1.0):
                for blur in (0, 4):
                    theirs = ipa.IPAdapterNoise().make_noise(kind, strength, blur, image)[0]
                    worst = max(worst, float((theirs - noise_image(kind, strength, blur, image)).abs().max()))
    torch.set_rng_state(state)
    return worst
