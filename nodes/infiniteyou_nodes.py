"""InfiniteYou nodes: load InfuseNet with its image projection, add an identity from photos to a FLUX prompt."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..comfy_host.folders import model_files
from ..comfy_host.infiniteyou import FACE_ANALYSIS_ARCFACE, apply_infiniteyou, load_infiniteyou
from ..encoders.infiniteyou import COMBINE_MODES
from .common import CATEGORY, InfiniteYouType, OmniNode, advanced


def controlnet_files() -> list[str]:
    import folder_paths
    return [f for f in folder_paths.get_filename_list("controlnet") if f.endswith(".safetensors")]


class InfiniteYouLoader(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityInfiniteYouLoader",
            display_name="InfiniteYou Loader (OmniIdentity)",
            category=f"{CATEGORY}/infiniteyou",
            description=("Loads InfiniteYou for FLUX.1: InfuseNet (infusenet_aes_bf16 / infusenet_sim_bf16.safetensors "
                         "from models/controlnet, a FLUX ControlNet in diffusers' layout that ComfyUI's own ControlNet "
                         "loader reads) and the image projection that turns the ArcFace embedding into its identity "
                         "tokens (image_proj_model.bin from models/infiniteyou, read as tensors only), and the ArcFace network "
                         "the authors embed the face with (facexlib's IR-SE50, models/facexlib)."),
            inputs=[
                io.Combo.Input("infusenet", options=controlnet_files(),
                               tooltip="InfuseNet in models/controlnet (ByteDance/InfiniteYou: infusenet_aes_bf16."
                                       "safetensors for aesthetics, infusenet_sim_bf16.safetensors for likeness)."),
                io.Combo.Input("image_proj", options=model_files("infiniteyou"),
                               tooltip="The image projection published beside that InfuseNet (image_proj_model.bin of "
                                       "the same aes_stage2 / sim_stage1 folder) in models/infiniteyou."),
                io.Combo.Input("arcface", options=[FACE_ANALYSIS_ARCFACE, *model_files("facexlib")],
                               default=FACE_ANALYSIS_ARCFACE, optional=True,
                               tooltip="The ArcFace network for the identity: facexlib's recognition_arcface_ir_se50.pth "
                                       "in models/facexlib (the one the authors and their projection use), or 'face "
                                       "analysis': the embedding of the connected face analysis (antelopev2's "
                                       "glintr100, a network the projection was not trained on: little likeness)."),
            ],
            outputs=[InfiniteYouType.Output(display_name="infiniteyou", tooltip="InfuseNet and its image projection.")],
        )

    @classmethod
    def execute(cls, infusenet: str, image_proj: str, arcface: str = FACE_ANALYSIS_ARCFACE) -> io.NodeOutput:
        return io.NodeOutput(load_infiniteyou(infusenet, image_proj, arcface))


class ApplyInfiniteYou(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityApplyInfiniteYou",
            display_name="Apply InfiniteYou (OmniIdentity)",
            category=f"{CATEGORY}/infiniteyou",
            description=("Adds the identity of the photos to a FLUX.1 prompt as InfiniteYou's authors do: InfuseNet reads "
                         "the identity tokens (ArcFace embedding through the image projection) in place of the text and "
                         "the five-keypoint control image, and its residuals are added to FLUX's blocks. Several photos "
                         "of one person are averaged; photos without a face are skipped and reported. Works on the "
                         "conditioning like Apply ControlNet: the model is untouched, other patches and ControlNets stay."),
            inputs=[
                io.Conditioning.Input("positive", tooltip="The FLUX prompt's conditioning (InfuseNet is not added to the "
                                                          "negative, as in the authors' true CFG)."),
                InfiniteYouType.Input("infiniteyou", tooltip="From InfiniteYou Loader."),
                io.FaceAnalysis.Input("face_analysis",
                                      tooltip="Face Analysis Loader with ArcFace embeddings: the antelopev2 insightface "
                                              "pack, or dlib with antelopev2's glintr100.onnx."),
                io.Image.Input("images", tooltip="One or more photos of the person (the largest face of each is used)."),
                io.Vae.Input("vae", tooltip="FLUX's VAE: InfuseNet reads the control image as a latent."),
                io.Float.Input("strength", default=1.0, min=0.0, max=2.0, step=0.05,
                               tooltip="infusenet_conditioning_scale of the authors (default 1.0; try 0.9 if the face "
                                       "dominates); 0 leaves the prompt as is."),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="infusenet_guidance_start: the fraction of the steps before InfuseNet starts "
                                       "(the authors suggest 0.1 for more freedom)."),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="infusenet_guidance_end: the fraction of the steps where InfuseNet stops."),
                io.Image.Input("control_image", optional=True,
                               tooltip="A photo whose face sets the pose: its five keypoints are drawn as the control "
                                       "image. Unconnected: a black control image (the authors' default)."),
                io.Int.Input("width", default=864, min=64, max=8192, step=16, optional=True,
                             tooltip="Width of the image being generated (the control image is drawn at this size)."),
                io.Int.Input("height", default=1152, min=64, max=8192, step=16, optional=True,
                             tooltip="Height of the image being generated."),
                advanced(io.Combo.Input("combine", options=list(COMBINE_MODES), default="embeddings", optional=True,
                                        tooltip="Several photos: average their ArcFace embeddings (default) or their "
                                                "identity tokens.")),
            ],
            outputs=[io.Conditioning.Output(display_name="positive", tooltip="The prompt with InfuseNet added."),
                     io.Image.Output(display_name="control_image", tooltip="The five-keypoint control image used.")],
        )

    ORDERED = (("start_at", "end_at"),)

    @classmethod
    def execute(cls, positive, infiniteyou, face_analysis, images, vae, strength: float, start_at: float,
                end_at: float, control_image=None, width: int = 864, height: int = 1152,
                combine: str = "embeddings") -> io.NodeOutput:
        infiniteyou, face_analysis, images, control_image = cls.checked(
            infiniteyou=infiniteyou, face_analysis=face_analysis, images=images, control_image=control_image)
        conditioning, image, report = apply_infiniteyou(positive, infiniteyou, face_analysis, images, vae, strength,
                                                        start_at, end_at, control_image, width, height, combine)
        return io.NodeOutput(conditioning, image, ui=ui.PreviewText(report))


NODES = [InfiniteYouLoader, ApplyInfiniteYou]
