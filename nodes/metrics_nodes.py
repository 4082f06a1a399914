"""Identity similarity node: ID similarity, CLIP-I and CLIP-T, with a report image."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..comfy_host.similarity import identity_similarity
from .common import CATEGORY, OmniNode


class Similarity(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentitySimilarity",
            display_name="Identity Similarity (OmniIdentity)",
            category=f"{CATEGORY}/metrics",
            description=(
                "Does the face keep its identity? ID similarity of each image against the references (ArcFace "
                "cosine with an insightface pack or dlib + ArcFace model; 1 - descriptor distance with the bundled "
                "dlib backend, where > 0.4 means the same person), mean and std; CLIP-I against the references "
                "and CLIP-T against a prompt when CLIP models are given; a report image."),
            inputs=[
                io.FaceAnalysis.Input("face_analysis", tooltip="From Face Analysis Loader (OmniIdentity)."),
                io.Image.Input("images", tooltip="Generated images to score."),
                io.Image.Input("reference_images", tooltip="One or more photos of the person."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="A CLIP vision model for CLIP-I (and CLIP-T with a matching text CLIP)."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The text CLIP for CLIP-T; its width must match clip_vision's projection "
                                      "(e.g. SD1.5's CLIP-L with a CLIP ViT-L/14 vision model)."),
                io.String.Input("prompt", default="", multiline=True, optional=True,
                                tooltip="The prompt the images were made from, for CLIP-T."),
            ],
            outputs=[
                io.Image.Output(display_name="report", tooltip="Thumbnails with their scores, and the references."),
                io.Float.Output(display_name="mean_similarity", tooltip="Mean ID similarity over images with a face."),
                io.String.Output(display_name="scores", tooltip="All figures as JSON."),
            ],
        )

    @classmethod
    def execute(cls, face_analysis, images, reference_images, clip_vision=None, clip=None,
                prompt: str = "") -> io.NodeOutput:
        face_analysis, images, reference_images = cls.checked(
            face_analysis=face_analysis, images=images, reference_images=reference_images)
        picture, mean, scores, text = identity_similarity(face_analysis, images, reference_images, clip_vision,
                                                          clip, prompt)
        return io.NodeOutput(picture, mean, scores, ui=ui.PreviewText(text))


NODES = [Similarity]
