"""IPAdapter_plus's apply, reproduced on this pack's engine: same file, photo and options give the same
patched model as ComfyUI_IPAdapter_plus's IPAdapterAdvanced (its conventions: ``guidance.ipadapter_plus``).

The photos are encoded with ComfyUI's CLIP_VISION as IPAdapter_plus encodes them (CLIP's
preprocessing at 224 px, centre crop); FaceID files read ArcFace embeddings of the face found by the
pack's face analysis (normalised, except Portrait-unnorm files) and, for FaceID Plus, CLIP tokens
of the face aligned to ArcFace's template at 224 px (256 px for SDXL). The identity terms are
registered as this pack's attn2 replace patches on a clone, one per cross-attention layer of the
input and output blocks (IPAdapter_plus never reaches the middle block).
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch
from comfy.ldm.modules.attention import SpatialTransformer

from ..guidance.adapter import AdapterFitError, IdentityAdapter
from ..guidance.decoupled import COND, UNCOND, LayerInjection
from ..guidance.ipadapter_plus import (COMBINE_MODES, EMBEDS_SCALINGS, SCALING_MODES, STYLE_COMPOSITION_TYPES,
                                       WEIGHT_TYPES, combine,
                                       layer_plan, paired_lora_name, parse_layer_weights, repeat_to)
from .clip_vision import ClipVision
from .identity import add_unet_injection
from .layers import adapter_layers, check_fit, diffusion_model, is_flux, sigma_window

CLIP_KINDS = ("plus", "full_face", "faceid_plusv2")     # kinds IPAdapter_plus treats as "plus": CLIP tokens


def transformer_indices(model) -> dict[tuple[str, int], int]:
    """(group, block number) -> the index ComfyUI's UNet gives the block's SpatialTransformer
    (``transformer_options["transformer_index"]``): counted in the forward order input, middle, output."""
    dm = diffusion_model(model)
    indices, count = {}, 0
    for group, blocks in (("input", dm.input_blocks), ("middle", [dm.middle_block]), ("output", dm.output_blocks)):
        for number, block in enumerate(blocks):
            for module in block or ():
                if isinstance(module, SpatialTransformer):
                    indices[(group, number)] = count
                    count += 1
    return indices


def is_sdxl_file(adapter: IdentityAdapter) -> bool:
    """IPAdapter_plus's test: tokens 2048 wide are SDXL's (its block tables and ease curves follow)."""
    return adapter.config.token_dim == 2048


def is_portrait_unnorm(adapter: IdentityAdapter) -> bool:
    """FaceID Portrait-unnorm (SDXL): a Plus resampler that reads one 512-wide token, the ArcFace embedding
    before normalisation (IPAdapter_plus tells it by ``unnorm`` in the file name; the width says it here)."""
    return adapter.config.projection == "plus" and adapter.config.projection_args.get("embedding_dim") == 512


def needs_faces(adapter: IdentityAdapter) -> bool:
    return adapter.config.projection in ("faceid", "faceid_plusv2") or is_portrait_unnorm(adapter)


def tokens_of(cv: ClipVision, images: torch.Tensor) -> torch.Tensor:
    """CLIP's penultimate tokens of the photos, centre-cropped (photos seen before come from the pack's cache)."""
    return cv.cached_tokens(images, "center")[0]


def pooled_of(cv: ClipVision, images: torch.Tensor) -> torch.Tensor:
    """CLIP's projected image embeddings of the photos, centre-cropped (cached with the tokens)."""
    return cv.cached_features(images, "center")[1]


def encode(adapter: IdentityAdapter, clip_vision, image: torch.Tensor, image_negative: Optional[torch.Tensor],
           faces: Optional[tuple[torch.Tensor, torch.Tensor]]) -> tuple[dict, dict]:
    """(conditional, unconditional) projection inputs, per photo, as IPAdapter_plus builds them."""
    kind = adapter.config.projection
    cv = ClipVision(clip_vision)
    if is_portrait_unnorm(adapter):        # a resampler over the raw ArcFace embedding, one token per photo
        arcface = faces[0][:, None]
        return {"clip": arcface}, {"clip": torch.zeros_like(arcface)}
    if kind in ("faceid", "faceid_plusv2"):
        arcface, crops = faces
        cond, uncond = {"arcface": arcface}, {"arcface": torch.zeros_like(arcface)}
        if kind == "faceid_plusv2":
            cond["clip"] = tokens_of(cv, crops)
            uncond["clip"] = tokens_of(cv, image_negative) if image_negative is not None else cv.unconditional("black")[0]
        return cond, uncond
    if kind in CLIP_KINDS:
        tokens = tokens_of(cv, image)
        negative = tokens_of(cv, image_negative) if image_negative is not None else cv.unconditional("black")[0]
        return {"clip": tokens}, {"clip": negative}
    if kind == "pooled":
        pooled = pooled_of(cv, image)
        negative = pooled_of(cv, image_negative) if image_negative is not None else torch.zeros_like(pooled[:1])
        return {"pooled": pooled}, {"pooled": negative}
    raise AdapterFitError(f"adapter '{adapter.name}' ({adapter.config.describe()}) is not an h94 IP-Adapter for SD1.5 "
                          "or SDXL: the IPAdapter_plus compatible apply takes those only")


def face_inputs(face_analysis, image: torch.Tensor, crop_size: int, normalise: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """ArcFace embeddings (N, 512) of the first face per photo and the faces aligned to ArcFace's template at
    ``crop_size`` (insightface's norm_crop, when insightface is installed; the same geometry with the pack's
    warp otherwise); a photo without a face is an error, as in IPAdapter_plus."""
    embeddings, crops = [], []
    for index, photo in enumerate(image):
        pixels = photo[..., :3].mul(255).clamp(0, 255).byte().cpu().numpy()   # IPAdapter_plus's conversion
        faces = [f for f in face_analysis.detect(pixels) if f.embedding is not None]
        if not faces:
            raise ValueError(f"no face with an ArcFace embedding found in photo {index + 1} (IPAdapter_plus stops "
                             "here too); FaceID needs insightface's recognition model")
        face = faces[0]
        embedding = torch.from_numpy(np.asarray(face.embedding, dtype=np.float32))
        embeddings.append(embedding / embedding.norm() if normalise else embedding)
        crops.append(aligned_face(photo[..., :3], pixels, np.asarray(face.keypoints5, dtype=np.float32), crop_size))
    return torch.stack(embeddings), torch.stack(crops)


def aligned_face(photo: torch.Tensor, pixels: np.ndarray, keypoints: np.ndarray, size: int) -> torch.Tensor:
    """The face warped onto ArcFace's five-point template scaled to ``size`` (insightface's estimate_norm)."""
    try:
        from insightface.utils import face_align
    except Exception:      # insightface missing or broken: the same similarity transform, the pack's warp
        face_align = None
    if face_align is not None:
        return torch.from_numpy(face_align.norm_crop(pixels, landmark=keypoints, image_size=size)).float() / 255.0
    from ..encoders.face.alignment import ARCFACE_TEMPLATE_112, estimate_similarity, warp_crop
    ratio, shift = (size / 112.0, 0.0) if size % 112 == 0 else (size / 128.0, 8.0 * size / 128.0)
    template = ARCFACE_TEMPLATE_112 * ratio + np.array([shift, 0.0])
    return warp_crop(photo, estimate_similarity(keypoints, template), size)


@torch.no_grad()
def project(adapter: IdentityAdapter, inputs: dict, faceid_v2_weight: float) -> torch.Tensor:
    """The adapter's projection of one branch's inputs: (N, T, C) tokens."""
    kind = adapter.config.projection
    proj = adapter.image_proj if kind in ("faceid", "pooled") else adapter.image_proj.float()
    if kind == "faceid_plusv2":
        return proj(inputs["arcface"].float(), inputs["clip"].float(), faceid_v2_weight)
    return proj(next(iter(inputs.values())).float())


LORA_CHOICES = ("auto", "none")


def lora_files() -> list[str]:
    """The LoRA files ComfyUI lists (models/loras)."""
    import folder_paths
    return [name for name in folder_paths.get_filename_list("loras") if name.lower().endswith(".safetensors")]


def with_faceid_lora(model, adapter: IdentityAdapter, lora: str, strength: float):
    """``model`` with the FaceID LoRA applied to the UNet at ``strength`` (as IPAdapter_plus's FaceID unified
    loader applies it, model only): ``lora`` names a file in models/loras, or is "auto" (the file paired
    with the adapter by name, in models/loras or next to the adapter in models/ipadapter) or "none"."""
    if strength == 0.0 or lora == "none":
        return model
    import comfy.sd
    import comfy.utils
    import folder_paths
    if lora == "auto":
        path = None
        for folder in ("loras", "ipadapter"):
            name = paired_lora_name(adapter.name, folder_paths.get_filename_list(folder))
            if name is not None:
                path = folder_paths.get_full_path(folder, name)
                break
        if path is None:
            raise ValueError(f"no LoRA paired with '{adapter.name}' (named like "
                             f"'{os.path.splitext(os.path.basename(adapter.name))[0]}_lora.safetensors') in "
                             "models/loras or models/ipadapter: put h94's LoRA there, choose it in faceid_lora, or "
                             "set faceid_lora_strength to 0")
    else:
        path = folder_paths.get_full_path_or_raise("loras", lora)
    patched, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(path, safe_load=True),
                                               strength, 0)
    return patched


def apply_ipadapter_plus(model, adapter: IdentityAdapter, clip_vision, image: torch.Tensor, weight: float = 1.0,
                         weight_type: str = "linear", combine_embeds: str = "concat", start_at: float = 0.0,
                         end_at: float = 1.0, embeds_scaling: str = "V only",
                         image_negative: Optional[torch.Tensor] = None, attn_mask: Optional[torch.Tensor] = None,
                         face_analysis=None, weight_faceidv2: Optional[float] = None,
                         weight_composition: float = 1.0, boost: Optional[float] = None,
                         faceid_lora: str = "auto", faceid_lora_strength: float = 0.0, layer_weights: str = "",
                         image_composition: Optional[torch.Tensor] = None):
    """(a clone of ``model`` patched as IPAdapter_plus's IPAdapterAdvanced patches it, the aligned faces of a
    FaceID file or None); ``model`` is untouched. With ``faceid_lora_strength``, the FaceID LoRA is applied
    first, as IPAdapter_plus's FaceID unified loader does."""
    if weight_type not in WEIGHT_TYPES + STYLE_COMPOSITION_TYPES:
        raise ValueError(f"weight_type must be one of {WEIGHT_TYPES + STYLE_COMPOSITION_TYPES}, not {weight_type!r}")
    if embeds_scaling not in EMBEDS_SCALINGS:
        raise ValueError(f"embeds_scaling must be one of {EMBEDS_SCALINGS}, not {embeds_scaling!r}")
    if combine_embeds not in COMBINE_MODES:
        raise ValueError(f"combine_embeds must be one of {COMBINE_MODES}, not {combine_embeds!r}")
    if adapter.config.family != "unet" or adapter.config.source != "h94" or is_flux(model):
        raise AdapterFitError(f"adapter '{adapter.name}' ({adapter.config.describe()}): the IPAdapter_plus compatible "
                              "apply takes h94 IP-Adapters on SD1.5 / SDXL models; use Apply Identity Adapter")
    layers = adapter_layers(model, adapter)
    check_fit(adapter, model, layers)
    sdxl = is_sdxl_file(adapter)
    faces = None
    if needs_faces(adapter):
        if face_analysis is None:
            raise ValueError(f"adapter '{adapter.name}' is a FaceID adapter: connect a face_analysis")
        faces = face_inputs(face_analysis, image, 256 if sdxl else 224, normalise=not is_portrait_unnorm(adapter))
    cond_in, uncond_in = encode(adapter, clip_vision, image, image_negative, faces)
    composition_in = None
    if image_composition is not None:      # IPAdapter_plus's style and composition: transformer 3 reads it
        if faces is not None:
            raise ValueError("a composition image is for CLIP-image adapters, not FaceID")
        composition_in = encode(adapter, clip_vision, image_composition, None, None)[0]
        if combine_embeds != "concat":
            composition_in = {k: combine(v, combine_embeds) for k, v in composition_in.items()}
    count = next(iter(cond_in.values())).shape[0]
    uncond_in = {k: repeat_to(v, count) for k, v in uncond_in.items()}
    if combine_embeds != "concat" and count > 1:
        cond_in = {k: combine(v, combine_embeds) for k, v in cond_in.items()}
        uncond_in = {k: v[:1] for k, v in uncond_in.items()}
    shortcut = adapter.config.projection_args.get("shortcut", True)
    v2_weight = (weight_faceidv2 if weight_faceidv2 is not None else weight * 2) if shortcut else 1.0
    cond, uncond = project(adapter, cond_in, v2_weight), project(adapter, uncond_in, v2_weight)
    per_image = cond.shape[1]
    tokens = {COND: cond.reshape(-1, cond.shape[-1]), UNCOND: uncond.reshape(-1, uncond.shape[-1])}
    composition_tokens = None
    if composition_in is not None:
        composed = project(adapter, composition_in, v2_weight)
        composition_tokens = {COND: composed.reshape(-1, composed.shape[-1]), UNCOND: tokens[UNCOND]}
    indices = transformer_indices(model)
    table = parse_layer_weights(layer_weights)
    sigma_start, sigma_end = sigma_window(model, start_at, end_at)
    mode = SCALING_MODES[embeds_scaling]
    patched = with_faceid_lora(model, adapter, faceid_lora, faceid_lora_strength).clone()
    for index, layer in enumerate(layers):
        if layer.group == "middle":          # IPAdapter_plus's key for it, ("middle", 1), is never called
            continue
        plan = layer_plan(weight_type, weight, layer.group, indices[(layer.group, layer.number)], sdxl,
                          weight_composition, boost, table)
        if plan.weight is None or plan.weight == 0.0:
            continue
        keys, values = adapter.layer_kv(index, tokens)
        if plan.precise_swap:                # the image on the unconditional branch; zero tokens on the conditional
            keys = {COND: torch.zeros_like(keys[COND]), UNCOND: keys[COND]}
            values = {COND: torch.zeros_like(values[COND]), UNCOND: values[COND]}
        if composition_tokens is not None and plan.from_table and indices[(layer.group, layer.number)] == 3:
            composed_keys, composed_values = adapter.layer_kv(index, composition_tokens)
            keys, values = {**keys, COND: composed_keys[COND]}, {**values, COND: composed_values[COND]}
        injection = LayerInjection(keys, values, plan.weight, sigma_start, sigma_end, attn_mask, mode,
                                   tokens_per_image=per_image)
        add_unet_injection(patched, layer.key, injection)
    return patched, (faces[1] if faces is not None else None)
