"""PuLID-FLUX on ComfyUI's FLUX: the authors' residual after every 2nd double block and every 4th single
block, through ``patches_replace["dit"]`` block patches on a clone (no forward replacement), and the
identity condition built from photos (ArcFace + EVA02-CLIP + IDFormer, see ``pulid_condition``).

A block patch runs the block (or the patch that was there before it: another pack's, or this pack's
IP-Adapter patches, so both effects stay), then adds ``weight x pulid_ca[i](identity, image tokens)`` to
the generated image's tokens. A DIFFUSION_MODEL wrapper records each call's text length and latent
size, and fails loudly when a ComfyUI release stopped calling the block patches.
"""
from __future__ import annotations

from typing import Optional

import comfy.patcher_extension
import torch

from ..encoders.pulid_flux import PuLIDFileError, PuLIDFlux, injection_points
from ..guidance.decoupled import COND, UNCOND
from ..guidance.flux_identity import image_token_count
from ..guidance.pulid_flux import PuLIDInjection, add_residuals
from .compat import comfyui_version, flux_options_position
from .identity import InjectionPointMissing
from .layers import diffusion_model, existing_patch, is_flux, model_description, sigma_window
from .options import find_options

PULID_STATE = "omni_identity_pulid_flux"      # per model call: text length, latent size, blocks run


def check_model_fits(model, pulid: PuLIDFlux) -> list[tuple[str, int]]:
    """The model's injection points, one per ``pulid_ca`` module; a clear error when the file is for
    another model."""
    if not is_flux(model):
        raise PuLIDFileError(f"PuLID-FLUX injects into FLUX.1 models; {model_description(model)} is not one")
    dm = diffusion_model(model)
    points = injection_points(len(dm.double_blocks), len(dm.single_blocks))
    width = int(dm.hidden_size)
    if len(points) != pulid.config.num_ca or width != pulid.config.ca_dim:
        raise PuLIDFileError(
            f"{pulid.describe()} does not fit {model_description(model)}: that model has "
            f"{len(dm.double_blocks)} double and {len(dm.single_blocks)} single blocks of width {width}, which take "
            f"{len(points)} modules of width {width}. Use the PuLID-FLUX file made for FLUX.1 (dev or schnell).")
    return points


def apply_pulid_flux(model, pulid: PuLIDFlux, cond: torch.Tensor, uncond: torch.Tensor, weight: float = 1.0,
                     start_at: float = 0.0, end_at: float = 1.0, mask: Optional[torch.Tensor] = None):
    """A clone of ``model`` with the identity tokens ``cond`` (1, T, C) injected (``uncond`` for the
    unconditional CFG rows, the authors' true-CFG choice); ``model`` is untouched."""
    points = check_model_fits(model, pulid)
    sigma_start, sigma_end = sigma_window(model, start_at, end_at)
    tokens = {COND: cond.detach(), UNCOND: uncond.detach()}
    patched = model.clone()
    for (block, index), module in zip(points, pulid.pulid_ca):
        injection = PuLIDInjection(module, tokens, float(weight), sigma_start, sigma_end, mask)
        existing = existing_patch(patched, "dit", (block, index))
        patch = (existing.with_injection(injection) if isinstance(existing, PuLIDBlockPatch)
                 else PuLIDBlockPatch((injection,), previous=existing, kind=block.split("_")[0]))
        patched.set_model_patch_replace(patch, "dit", block, index)
    patched.remove_wrappers_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, PULID_STATE)
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, PULID_STATE, record_pulid_call)
    return patched


def record_pulid_call(executor, x, *args, **kwargs):
    """DIFFUSION_MODEL wrapper: the text length and latent size of this call for the block patches, and
    after it a check that ComfyUI ran them."""
    options = find_options(args, kwargs, flux_options_position())
    context = args[1] if len(args) > 1 else kwargs.get("context")
    state = None
    if options is not None and torch.is_tensor(context):
        state = {"txt_len": int(context.shape[1]), "latent_hw": tuple(x.shape[-2:]), "blocks": 0}
        options[PULID_STATE] = state
    out = executor(x, *args, **kwargs)
    if state is not None and state["blocks"] == 0 and any(
            isinstance(p, PuLIDBlockPatch) for p in options.get("patches_replace", {}).get("dit", {}).values()):
        raise InjectionPointMissing(f"ComfyUI {comfyui_version()} did not call the pack's FLUX block patches "
                                    "(patches_replace['dit']): PuLID-FLUX cannot be injected on this release")
    return out


class PuLIDBlockPatch:
    """dit replace patch: the block (or the patch before it), then the identity residuals on the image tokens."""

    def __init__(self, injections: tuple[PuLIDInjection, ...], previous=None, kind: str = "double"):
        self.injections = injections
        self.previous = previous
        self.kind = kind

    def with_injection(self, injection: PuLIDInjection) -> "PuLIDBlockPatch":
        return PuLIDBlockPatch((*self.injections, injection), self.previous, self.kind)

    def __deepcopy__(self, memo) -> "PuLIDBlockPatch":
        return PuLIDBlockPatch(self.injections, self.previous, self.kind)

    def to(self, device_or_dtype) -> "PuLIDBlockPatch":
        """ComfyUI moves patches with the model (to its device, then to its weight dtype): the modules follow
        the device and keep their own dtype (a float8 FLUX must not cast them; the residual is computed in
        the modules' dtype and added in the image stream's)."""
        if isinstance(device_or_dtype, torch.dtype):
            return self
        for injection in self.injections:
            injection.module.to(device_or_dtype)
        previous = self.previous.to(device_or_dtype) if hasattr(self.previous, "to") else self.previous
        return PuLIDBlockPatch(tuple(i.to(device_or_dtype) for i in self.injections), previous, self.kind)

    def __call__(self, args: dict, extra: dict, *more, **kwargs) -> dict:
        out = self.previous(args, extra, *more, **kwargs) if self.previous is not None else extra["original_block"](args)
        options = args.get("transformer_options") or {}
        state = options.get(PULID_STATE)
        if not isinstance(state, dict):
            raise InjectionPointMissing(f"ComfyUI {comfyui_version()} ran a FLUX block without the pack's model "
                                        "wrapper (WrappersMP.DIFFUSION_MODEL): PuLID-FLUX cannot find the text length")
        state["blocks"] += 1
        img = out["img"]
        txt_len = 0 if self.kind == "double" else int((options.get("img_slice") or [state["txt_len"]])[0])
        count = image_token_count(img.shape[1], txt_len, state["latent_hw"])
        img = add_residuals(img, txt_len, count, self.injections, options.get("cond_or_uncond") or (),
                            state["latent_hw"], options.get("sigmas"))
        return {**out, "img": img}


# -- files and the identity from photos ---------------------------------------------------------
class LoadedPuLIDFlux:
    """A PuLID-FLUX file and the EVA02-CLIP vision tower its identity condition needs."""

    def __init__(self, pulid: PuLIDFlux, eva, parser=None):
        self.pulid = pulid
        self.eva = eva
        self.parser = parser          # BiSeNet face parsing, or None: the landmark outline

    def describe(self) -> str:
        return f"{self.pulid.describe()}; {self.eva.config.describe()}"

    def models(self) -> list:
        return [self.pulid, self.eva] + ([self.parser] if self.parser is not None else [])


def load_pulid_flux(pulid_name: str, eva_name: str, parsing_name: str = "none") -> LoadedPuLIDFlux:
    """The PuLID-FLUX file from models/pulid, the EVA02-CLIP checkpoint from models/clip_vision (checked
    against each other: the IDFormer reads EVA's hidden-state and embedding widths) and, unless "none",
    the face parsing model from models/facexlib."""
    from ..encoders import eva_clip, face_parsing
    from ..encoders.pulid_flux import load_file
    from .folders import model_path
    parser = None if parsing_name == "none" else face_parsing.load_file(model_path("facexlib", parsing_name),
                                                                        parsing_name)
    pulid = load_file(model_path("pulid", pulid_name), pulid_name)
    eva = eva_clip.load_file(model_path("clip_vision", eva_name), eva_name)
    c = pulid.config
    if c.vit_width != eva.config.width or c.id_width - 512 != eva.config.embed_dim:
        raise PuLIDFileError(f"{pulid.describe()} reads EVA hidden states of width {c.vit_width} and an embedding of "
                             f"width {c.id_width - 512}, but '{eva_name}' is {eva.config.describe()}: use "
                             "EVA02_CLIP_L_336_psz14_s6B (EVA02-CLIP-L-14-336), the encoder PuLID-FLUX was trained with")
    return LoadedPuLIDFlux(pulid, eva, parser)


def identity_from_photos(loaded: LoadedPuLIDFlux, face_analysis, images: torch.Tensor, combine: str = "average"):
    """(conditional tokens, unconditional tokens, report) of the photos of one person."""
    import comfy.model_management
    from ..encoders.pulid_faces import pulid_faces
    from ..encoders.pulid_flux import identity_condition, identity_tokens
    device = comfy.model_management.get_torch_device()
    parsing = None
    if loaded.parser is not None:
        parser = loaded.parser.to(device)
        parsing = parser.labels
    faces = pulid_faces(images, face_analysis, parsing)
    eva = loaded.eva.to(device)
    if device.type == "cpu":
        eva = eva.float()
    try:
        embeds, hidden = eva.encode(faces.images)
        cond, uncond = identity_tokens(loaded.pulid.to(device), identity_condition(faces.arcface.to(device), embeds),
                                       hidden, combine)
    finally:
        offload = comfy.model_management.intermediate_device()
        for model in loaded.models():
            model.to(offload)
    return cond.to(offload), uncond.to(offload), faces.report(len(images))


def apply_pulid_flux_photos(model, loaded: LoadedPuLIDFlux, face_analysis, images: torch.Tensor, weight: float,
                            start_at: float, end_at: float, attn_mask: Optional[torch.Tensor] = None,
                            combine: str = "average"):
    """(patched clone, report): the identity of ``images`` injected with PuLID-FLUX."""
    check_model_fits(model, loaded.pulid)
    cond, uncond, report = identity_from_photos(loaded, face_analysis, images, combine)
    patched = apply_pulid_flux(model, loaded.pulid, cond, uncond, weight, start_at, end_at, attn_mask)
    return patched, f"PuLID-FLUX weight {weight}: {report}"
