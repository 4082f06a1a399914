"""OmniPortrait's RB-Guidance node: a GUIDER for SamplerCustomAdvanced (the engine is comfy_host.rb_guider)."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..comfy_host.gradients import gradient_ready
from ..comfy_host.rb_guider import RBGuider
from ..encoders.face import NoFaceFoundError
from ..encoders.face.crop import largest_face_mask
from ..guidance.rb_guidance import RBSettings
from .common import CATEGORY, LOG, check_face_analysis


def reference_face_mask(image: torch.Tensor, face_analysis) -> torch.Tensor:
    """(1, H, W) face mask of the reference photo (its largest face)."""
    try:
        return largest_face_mask(image[0], check_face_analysis(face_analysis))[None]
    except NoFaceFoundError:
        raise ValueError("no face found in the reference image: give a reference_mask, or a clearer photo") from None


class RBGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityRBGuidance",
            display_name="RB-Guidance (OmniIdentity)",
            category=f"{CATEGORY}/guidance",
            description=(
                "OmniPortrait's training-free RB-Guidance as a GUIDER for SamplerCustomAdvanced: CFG, plus, while "
                "t <= start_fraction x T, the gradient of E = p / (1 + S) on the latent, where S matches diffusion "
                "features (DIFT) of the reference face (noised to t0) and of the generated face, inside face masks; "
                "the gradient is masked to the face. About twice the cost of plain CFG in the guided steps."),
            inputs=[
                io.Model.Input("model", tooltip="SD1.5 or SDXL model, usually already carrying an identity adapter."),
                io.Conditioning.Input("positive", tooltip="Positive prompt."),
                io.Conditioning.Input("negative", tooltip="Negative prompt."),
                io.Float.Input("cfg", default=7.5, min=0.0, max=100.0, step=0.1, tooltip="CFG scale."),
                io.Image.Input("reference", tooltip="Reference photo of the face (its first image is used)."),
                io.Vae.Input("vae", tooltip="The model's VAE, to encode the reference."),
                io.Float.Input("strength", default=8.5, min=0.0, max=100.0, step=0.1,
                               tooltip="p in E = p / (1 + S); 0 turns the guidance off (plain CFG)."),
                io.Float.Input("start_fraction", default=0.6, min=0.0, max=1.0, step=0.01,
                               tooltip="u: guidance only while t <= u x T (the paper's 0.6)."),
                io.Int.Input("t0", default=671, min=0, max=999,
                             tooltip="Timestep the reference is noised to for its features (the paper's 671)."),
                io.Int.Input("feature_block", default=6, min=1, max=64, optional=True,
                             tooltip="DIFT features: the input of this output block (6 = after SD1.5's second "
                                     "up-block, 32 x 32 at 512 px)."),
                io.Int.Input("subject_token", default=0, min=0, max=76, optional=True,
                             tooltip="Position of the subject word in the positive prompt (CLIP tokens, 1 = first "
                                     "word) for the attention-derived face mask; 0 = locate the face by its "
                                     "resemblance to the reference."),
                io.FaceAnalysis.Input("face_analysis", optional=True,
                                      tooltip="Face analysis to mask the reference's face (else reference_mask, else "
                                              "the whole reference)."),
                io.Mask.Input("reference_mask", optional=True, tooltip="Explicit face mask of the reference."),
                io.Mask.Input("generation_mask", optional=True,
                              tooltip="Explicit face mask of the generated image (skips the attention mask)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, optional=True,
                             tooltip="Seed of the noise added to the reference."),
            ],
            outputs=[
                io.Guider.Output(display_name="guider", tooltip="For SamplerCustomAdvanced."),
                io.Image.Output(display_name="mask_preview", tooltip="The reference with its face mask in red."),
            ],
        )

    @classmethod
    def execute(cls, model, positive, negative, cfg, reference, vae, strength, start_fraction, t0,
                feature_block=6, subject_token=0, face_analysis=None, reference_mask=None, generation_mask=None,
                seed=0) -> io.NodeOutput:
        settings = RBSettings(strength=strength, start_fraction=start_fraction, t0=t0)
        image = reference[:1, :, :, :3]
        if reference_mask is None and face_analysis is not None:
            reference_mask = reference_face_mask(image, face_analysis)
        elif reference_mask is not None:
            reference_mask = reference_mask if reference_mask.ndim == 3 else reference_mask[None]
        height, width = (image.shape[1] // 8) * 8, (image.shape[2] // 8) * 8
        latent = vae.encode(image[:, :height, :width])
        if reference_mask is not None:
            reference_mask = reference_mask[:, :height, :width]
        guider = RBGuider(gradient_ready(model), settings, latent, reference_mask,
                          None if generation_mask is None else (generation_mask if generation_mask.ndim == 3
                                                                else generation_mask[None]),
                          feature_block, subject_token, seed)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        preview = image[:, :height, :width].clone()
        if reference_mask is not None:
            m = reference_mask[:1, :, :, None].to(preview)
            preview = preview * (1 - 0.5 * m) + 0.5 * m * torch.tensor([1.0, 0.0, 0.0]).to(preview)
        LOG.info("RB-Guidance: p=%s, u=%s, t0=%s, feature block %s, subject token %s", strength, start_fraction, t0,
                 feature_block, subject_token or "auto")
        return io.NodeOutput(guider, preview)


NODES = [RBGuidance]
