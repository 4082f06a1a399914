"""PuLID-FLUX nodes: load the published file with its EVA02-CLIP encoder, apply an identity from photos."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..comfy_host.folders import model_files
from ..comfy_host.pulid_flux import apply_pulid_flux_photos, load_pulid_flux
from ..encoders.pulid_flux import COMBINE_MODES
from .common import CATEGORY, OmniNode, PuLIDFluxType


def eva_files() -> list[str]:
    import folder_paths
    return [f for f in folder_paths.get_filename_list("clip_vision") if f.endswith((".safetensors", ".pt", ".pth"))]


class PuLIDFluxLoader(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityPuLIDFluxLoader",
            display_name="PuLID-FLUX Loader (OmniIdentity)",
            category=f"{CATEGORY}/pulid_flux",
            description=("Loads PuLID-FLUX (pulid_flux_v0.9.0 / v0.9.1.safetensors from models/pulid: the IDFormer and "
                         "the 20 cross-attention modules) with the EVA02-CLIP-L-14-336 vision encoder it was trained "
                         "with (EVA02_CLIP_L_336_psz14_s6B.pt from models/clip_vision, read as tensors only), and "
                         "optionally the face parsing model that removes the background (models/facexlib)."),
            inputs=[
                io.Combo.Input("pulid_file", options=model_files("pulid"),
                               tooltip="PuLID-FLUX file in models/pulid (guozinan/PuLID: pulid_flux_v0.9.1.safetensors)."),
                io.Combo.Input("eva_clip", options=eva_files(),
                               tooltip="EVA02-CLIP-L-14-336 in models/clip_vision (QuanSun/EVA-CLIP: "
                                       "EVA02_CLIP_L_336_psz14_s6B.pt), the image encoder PuLID reads."),
                io.Combo.Input("face_parsing", options=["none", *model_files("facexlib")], default="none",
                               optional=True,
                               tooltip="facexlib's BiSeNet face parsing model in models/facexlib "
                                       "(parsing_bisenet.pth), which the authors use to whiten the background; "
                                       "none: the face outline from the landmarks (hair whitened too)."),
            ],
            outputs=[PuLIDFluxType.Output(display_name="pulid_flux", tooltip="PuLID-FLUX and its EVA02-CLIP encoder.")],
        )

    @classmethod
    def execute(cls, pulid_file: str, eva_clip: str, face_parsing: str = "none") -> io.NodeOutput:
        return io.NodeOutput(load_pulid_flux(pulid_file, eva_clip, face_parsing))


class ApplyPuLIDFlux(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityApplyPuLIDFlux",
            display_name="Apply PuLID-FLUX (OmniIdentity)",
            category=f"{CATEGORY}/pulid_flux",
            description=("Injects the identity of the photos into a FLUX.1 model as PuLID-FLUX's authors do: after every "
                         "2nd double block and every 4th single block the image tokens get weight x the cross-attention "
                         "to the identity tokens (ArcFace + EVA02-CLIP of the aligned face, through the IDFormer). "
                         "Several photos of one person are averaged; photos without a face are skipped and reported. "
                         "Block patches on a copy of the model: the input model is untouched, other patches stay."),
            inputs=[
                io.Model.Input("model", tooltip="A FLUX.1 model (dev or schnell)."),
                PuLIDFluxType.Input("pulid_flux", tooltip="From PuLID-FLUX Loader."),
                io.FaceAnalysis.Input("face_analysis",
                                      tooltip="Face Analysis Loader with ArcFace embeddings: the antelopev2 insightface "
                                              "pack, or dlib with antelopev2's glintr100.onnx."),
                io.Image.Input("images", tooltip="One or more photos of the person (the largest face of each is used)."),
                io.Float.Input("weight", default=1.0, min=-1.0, max=5.0, step=0.05,
                               tooltip="id_weight of the authors (their demo: 0 to 3, default 1); 0 leaves the model as is."),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the sampling schedule where the identity starts."),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the schedule where it stops."),
                io.Mask.Input("attn_mask", optional=True,
                              tooltip="Where the identity applies (image space, any size; resized to the token grid)."),
                io.Combo.Input("combine", options=list(COMBINE_MODES), default="average", optional=True,
                               tooltip="Several photos: average the identity tokens of each photo (as the authors' "
                                       "ComfyUI forks do), or concat: the IDFormer reads all photos at once."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the identity injected.")],
        )

    ORDERED = (("start_at", "end_at"),)

    @classmethod
    def execute(cls, model, pulid_flux, face_analysis, images, weight: float, start_at: float, end_at: float,
                attn_mask=None, combine: str = "average") -> io.NodeOutput:
        pulid_flux, face_analysis, images, attn_mask = cls.checked(pulid_flux=pulid_flux, face_analysis=face_analysis,
                                                                   images=images, attn_mask=attn_mask)
        patched, report = apply_pulid_flux_photos(model, pulid_flux, face_analysis, images, weight, start_at, end_at,
                                                  attn_mask, combine)
        return io.NodeOutput(patched, ui=ui.PreviewText(report))


NODES = [PuLIDFluxLoader, ApplyPuLIDFlux]
