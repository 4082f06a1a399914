"""InfiniteYou on ComfyUI's FLUX: InfuseNet read by ComfyUI's own ControlNet loader (the diffusers FLUX
ControlNet layout, which ComfyUI runs as ``ControlNetFlux``) and driven as the authors' pipeline drives it,
through ComfyUI's control-object API on the conditioning (no model patch, no forward replacement).

``InfuseNetControl`` is ComfyUI's ``ControlNet`` with what InfiniteYou changes, all before ComfyUI's own
``get_control`` runs:
- InfuseNet's context is the identity tokens (the Resampler's output), not the prompt's T5 tokens;
- its guidance input is 1.0 (the pipeline's ``controlnet_guidance_scale``), not FLUX's guidance;
- its residuals go to FLUX's blocks by diffusers' rule for the model it runs beside (ComfyUI's
  ``ControlNetFlux`` assumes FLUX.1's 19 double and 38 single blocks; the pack sets the real counts);
- guidance start/end are fractions of the sampler's steps (the pipeline's ``controlnet_keep``), read from
  ``transformer_options["sample_sigmas"]``; without a schedule, ComfyUI's sigma window of those fractions.
The pooled prompt embedding and the control image (VAE-encoded by ComfyUI) are ComfyUI's as they are.
"""
from __future__ import annotations

import logging
from typing import Optional

import comfy.controlnet
import torch

from ..encoders.infiniteyou import InfiniteYouFileError, Resampler, arcface_embeddings, control_image, identity_tokens
from ..guidance.infiniteyou import INFUSENET_GUIDANCE, keep, step_of
from .compat import comfyui_version

LOG = logging.getLogger("ComfyUI-OmniIdentity")


class InfuseNetControl(comfy.controlnet.ControlNet):
    """ComfyUI's ControlNet for InfuseNet: identity tokens as context, guidance 1, the authors' schedule."""

    identity: Optional[torch.Tensor] = None
    window: tuple[float, float] = (0.0, 1.0)
    main_blocks: Optional[tuple[int, int]] = None
    sigma_window: Optional[tuple[float, float]] = None

    @classmethod
    def of(cls, control: comfy.controlnet.ControlNet, identity: torch.Tensor, start: float = 0.0,
           end: float = 1.0) -> "InfuseNetControl":
        """A copy of the loaded InfuseNet ``control`` carrying the identity tokens (1, T, C) and the window."""
        c = cls(None, global_average_pooling=control.global_average_pooling, load_device=control.load_device,
                manual_cast_dtype=control.manual_cast_dtype)
        c.control_model = control.control_model
        c.control_model_wrapped = control.control_model_wrapped
        control.copy_to(c)
        c.identity = identity.detach()
        c.window = (float(start), float(end))
        return c

    def copy(self) -> "InfuseNetControl":
        return InfuseNetControl.of(self, self.identity, *self.window)

    def pre_run(self, model, percent_to_timestep_function):
        super().pre_run(model, percent_to_timestep_function)
        dm = getattr(model, "diffusion_model", None)
        if not (hasattr(dm, "double_blocks") and hasattr(dm, "single_blocks")):
            raise InfiniteYouFileError(f"InfuseNet drives FLUX.1 models; the model being sampled is "
                                       f"{type(dm).__name__}. Connect a FLUX.1 (dev or schnell) model to the sampler.")
        self.main_blocks = (len(dm.double_blocks), len(dm.single_blocks))
        self.sigma_window = (float(percent_to_timestep_function(self.window[0])),
                             float(percent_to_timestep_function(self.window[1])))

    def active(self, sigma: float, transformer_options: Optional[dict]) -> bool:
        step = step_of((transformer_options or {}).get("sample_sigmas"), sigma)
        if step is not None:
            return keep(step[0], step[1], *self.window)
        if self.sigma_window is None:
            return True
        return self.sigma_window[1] <= sigma <= self.sigma_window[0]

    def get_control(self, x_noisy, t, cond, batched_number, transformer_options=None, *args, **kwargs):
        if not self.active(float(t[0]), transformer_options):
            if self.previous_controlnet is None:
                return None
            return self.previous_controlnet.get_control(x_noisy, t, cond, batched_number, transformer_options,
                                                        *args, **kwargs)
        model = self.control_model
        if not hasattr(model, "main_model_double") or not hasattr(model, "main_model_single"):
            raise RuntimeError(f"ComfyUI {comfyui_version()}'s FLUX ControlNet has no main_model_double/single: "
                               "InfuseNet's residuals cannot be mapped to FLUX's blocks on this release")
        if self.main_blocks is not None:
            model.main_model_double, model.main_model_single = self.main_blocks
        rows = x_noisy.shape[0]
        cond = dict(cond)
        cond["crossattn_controlnet"] = self.identity.expand(rows, -1, -1)
        if "guidance" in cond or getattr(getattr(model, "params", None), "guidance_embed", False):
            cond["guidance"] = torch.full((rows,), INFUSENET_GUIDANCE, device=x_noisy.device)
        return super().get_control(x_noisy, t, cond, batched_number, transformer_options, *args, **kwargs)


class LoadedInfiniteYou:
    """InfuseNet (a ComfyUI ControlNet) and the image projection that makes its identity tokens."""

    def __init__(self, infusenet: comfy.controlnet.ControlNet, projection: Resampler, name: str = "InfuseNet",
                 recognizer=None):
        self.infusenet = infusenet
        self.projection = projection
        self.name = name
        self.recognizer = recognizer      # facexlib's IR-SE50 ArcFace, or None: the face analysis' embedding

    def describe(self) -> str:
        arcface = "facexlib's IR-SE50 ArcFace" if self.recognizer is not None else "the face analysis' ArcFace"
        return f"InfiniteYou '{self.name}' with {self.projection.describe()}; embeddings from {arcface}"

    def models(self) -> list:
        return [self.projection] + ([self.recognizer] if self.recognizer is not None else [])


def check_infusenet(control, name: str, projection: Resampler) -> None:
    """A clear error unless ``control`` is a FLUX ControlNet of diffusers' layout reading the projection's width."""
    model = getattr(control, "control_model", None)
    if not isinstance(control, comfy.controlnet.ControlNet) or not hasattr(model, "main_model_double") \
            or not getattr(model, "latent_input", False):
        raise InfiniteYouFileError(f"'{name}' is not InfuseNet: ComfyUI reads it as {type(model).__name__}, not a FLUX "
                                   "ControlNet in diffusers' layout (infusenet_aes_bf16 / infusenet_sim_bf16.safetensors)")
    width = getattr(getattr(model, "params", None), "context_in_dim", None)
    if width is not None and width != projection.config.output_dim:
        raise InfiniteYouFileError(f"'{name}' reads context tokens of width {width}, but the image projection makes "
                                   f"tokens of width {projection.config.output_dim}: use the image_proj_model.bin "
                                   "published beside this InfuseNet (the same aes / sim folder)")


FACE_ANALYSIS_ARCFACE = "face analysis"


def load_infiniteyou(infusenet_name: str, projection_name: str,
                     arcface_name: str = FACE_ANALYSIS_ARCFACE) -> LoadedInfiniteYou:
    """InfuseNet from models/controlnet (through ComfyUI's ControlNet loader), the image projection from
    models/infiniteyou and, unless "face analysis", facexlib's IR-SE50 ArcFace from models/facexlib."""
    from ..encoders import arcface_ir_se
    from ..encoders.infiniteyou import load_file
    from .folders import model_path
    recognizer = None
    if arcface_name != FACE_ANALYSIS_ARCFACE:
        recognizer = arcface_ir_se.load_file(model_path("facexlib", arcface_name), arcface_name)
    projection = load_file(model_path("infiniteyou", projection_name), projection_name)
    try:
        control = comfy.controlnet.load_controlnet(model_path("controlnet", infusenet_name))
    except Exception as exc:        # ComfyUI's loader could not place the keys
        raise InfiniteYouFileError(f"ComfyUI cannot read '{infusenet_name}' as a ControlNet: {exc}") from exc
    check_infusenet(control, infusenet_name, projection)
    return LoadedInfiniteYou(control, projection, infusenet_name, recognizer)


def identity_from_photos(loaded: LoadedInfiniteYou, face_analysis, images: torch.Tensor, combine: str = "embeddings"):
    """(identity tokens (1, 8, 4096), report) of the photos of one person."""
    import comfy.model_management
    device = comfy.model_management.get_torch_device()
    recognizer = loaded.recognizer.to(device) if loaded.recognizer is not None else None
    projection = loaded.projection.to(device)
    if device.type == "cpu":
        projection = projection.float()
    try:
        embeds, kept, skipped = arcface_embeddings(images, face_analysis, recognizer)
        tokens = identity_tokens(projection, embeds, combine)
    finally:
        for model in loaded.models():
            model.to(comfy.model_management.intermediate_device())
    report = f"{len(kept)} of {len(images)} photo(s) used, ArcFace from " + (
        "facexlib's IR-SE50" if recognizer is not None else "the face analysis")
    if skipped:
        report += f"; no face in photo(s) {', '.join(str(i + 1) for i in skipped)} (skipped)"
    return tokens.to(comfy.model_management.intermediate_device()), report


def with_infusenet(conditioning: list, control: InfuseNetControl, hint: torch.Tensor, strength: float, vae) -> list:
    """The conditioning with InfuseNet added to each entry's controls (chained after any ControlNet already
    there, as ComfyUI's Apply ControlNet does); the entries given are not modified."""
    out = []
    for tensor, values in conditioning:
        values = dict(values)
        c = control.copy().set_cond_hint(hint, strength, (0.0, 1.0), vae=vae)
        c.set_previous_controlnet(values.get("control"))
        values["control"] = c
        values["control_apply_to_uncond"] = False
        out.append([tensor, values])
    return out


def apply_infiniteyou(positive: list, loaded: LoadedInfiniteYou, face_analysis, images: torch.Tensor, vae,
                      strength: float = 1.0, start_at: float = 0.0, end_at: float = 1.0,
                      control_photo: Optional[torch.Tensor] = None, width: int = 864, height: int = 1152,
                      combine: str = "embeddings"):
    """(positive conditioning with InfuseNet, the control image (1, H, W, 3), report)."""
    tokens, report = identity_from_photos(loaded, face_analysis, images, combine)
    photo = None if control_photo is None else control_photo[0]
    image, note = control_image(photo, face_analysis, width, height)
    control = InfuseNetControl.of(loaded.infusenet, tokens, start_at, end_at)
    conditioning = with_infusenet(positive, control, image.movedim(-1, 1), strength, vae)
    return conditioning, image, f"InfiniteYou scale {strength}, steps {start_at}-{end_at}: {report}; {note}"
