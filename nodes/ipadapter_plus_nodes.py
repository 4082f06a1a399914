"""IPAdapter_plus's nodes on this pack's engine: the compatible apply (its options and defaults), its image prep and
its noise images."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..encoders.image_prep import CROP_POSITIONS, INTERPOLATIONS, prep_for_clip_vision
from ..encoders.noise_images import NOISE_TYPES, noise_image
from ..comfy_host.ipadapter_plus import LORA_CHOICES, apply_ipadapter_plus, lora_files
from ..guidance.ipadapter_plus import (COMBINE_MODES, EMBEDS_SCALINGS, STYLE_COMPOSITION_TYPES, WEIGHT_TYPES,
                                       parse_layer_weights)
from .common import CATEGORY, IdentityAdapterType, OmniNode


class ApplyIPAdapterCompat(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityApplyIPAdapterCompat",
            display_name="Apply IP-Adapter, IPAdapter_plus compatible (OmniIdentity)",
            category=f"{CATEGORY}/adapter",
            description=("IPAdapter_plus's IPAdapter Advanced, reproduced: the same h94 file, photos and options give "
                         "the same model patches (its unconditional image per kind of file, no middle block, its weight "
                         "types, embeds scaling and combine modes). For SD1.5 and SDXL h94 IP-Adapters (Plus, "
                         "Plus-Face, Full-Face, base, FaceID, FaceID Plus v1/v2, Portrait). `python -m omniid convert` "
                         "rewrites IPAdapter_plus workflows to use it."),
            inputs=[
                io.Model.Input("model", tooltip="SD1.5 or SDXL model."),
                IdentityAdapterType.Input("adapter", tooltip="An h94 IP-Adapter, from Identity Adapter Loader."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP-H (ViT-bigG for the SDXL ViT-G file), from Load CLIP Vision."),
                io.Image.Input("image", tooltip="The reference photo(s); non-square photos are centre-cropped, as there."),
                io.Float.Input("weight", default=1.0, min=-1.0, max=5.0, step=0.05, tooltip="Strength of the image."),
                io.Combo.Input("weight_type", options=[*WEIGHT_TYPES, *STYLE_COMPOSITION_TYPES], default="linear",
                               tooltip="IPAdapter_plus's weight types: a weight per layer from its block and position."),
                io.Combo.Input("combine_embeds", options=list(COMBINE_MODES), default="concat",
                               tooltip="How several photos merge: concat keeps every photo's tokens; the others "
                                       "merge the encoder outputs before the projection."),
                io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Fraction of the schedule where the image starts."),
                io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.001,
                               tooltip="Fraction of the schedule where it stops."),
                io.Combo.Input("embeds_scaling", options=list(EMBEDS_SCALINGS), default="V only",
                               tooltip="V only (IPAdapter_plus's default): the image term times the weight; K+V: "
                                       "keys and values times the weight; the C penalties scale by width / 1280."),
                io.Image.Input("image_negative", optional=True,
                               tooltip="Unconditional image (default: black for CLIP-token files, zeros otherwise)."),
                io.Image.Input("image_composition", optional=True,
                               tooltip="Style and composition (SDXL): the composition photo, read by the composition "
                                       "layer (IPAdapter Style & Composition's image_composition)."),
                io.Mask.Input("attn_mask", optional=True, tooltip="Where the image applies (resized to each layer)."),
                io.FaceAnalysis.Input("face_analysis", optional=True,
                                      tooltip="FaceID files: the face analysis that finds the face and its ArcFace "
                                              "embedding (Face Analysis Loader with insightface)."),
                io.Float.Input("weight_faceidv2", default=1.0, min=-1.0, max=5.0, step=0.05, optional=True,
                               tooltip="FaceID Plus v2: weight of the shortcut (IPAdapter FaceID's input; IPAdapter "
                                       "Advanced uses twice the weight)."),
                io.Float.Input("weight_composition", default=1.0, min=-1.0, max=5.0, step=0.05, optional=True,
                               tooltip="'style and composition': the weight of the composition layers."),
                io.Float.Input("boost", default=1.0, min=-5.0, max=5.0, step=0.05, optional=True,
                               tooltip="The precise types: style boost ('style transfer precise') or composition "
                                       "boost ('composition precise'); IPAdapter Advanced uses the weight."),
                io.Combo.Input("faceid_lora", options=[*LORA_CHOICES, *lora_files()], default="auto", optional=True,
                               tooltip="FaceID files: the LoRA h94 published with them (models/loras); auto finds "
                                       "the one named after the adapter (its name + '_lora')."),
                io.Float.Input("faceid_lora_strength", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Strength of the FaceID LoRA on the model (0: not applied; IPAdapter_plus's "
                                       "FaceID unified loader uses 0.6)."),
                io.String.Input("layer_weights", default="", multiline=True, optional=True,
                                tooltip="Per-layer weights by transformer index, 'index:weight, ...' (IPAdapter "
                                        "Mad Scientist's layer_weights): each times weight, other layers off; empty: "
                                        "the weight type decides."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the image's attention added."),
                     io.Image.Output(display_name="face_image",
                                     tooltip="FaceID files: the faces aligned as the adapter reads them (IPAdapter "
                                             "FaceID's face_image); other files: the input photos.")],
        )

    ORDERED = (("start_at", "end_at"),)
    PARSERS = {"layer_weights": parse_layer_weights}

    @classmethod
    def execute(cls, model, adapter, clip_vision, image, weight: float, weight_type: str, combine_embeds: str,
                start_at: float, end_at: float, embeds_scaling: str, image_negative=None, attn_mask=None,
                face_analysis=None, weight_faceidv2: float = 1.0, weight_composition: float = 1.0,
                boost: float = 1.0, faceid_lora: str = "auto", faceid_lora_strength: float = 0.0,
                layer_weights: str = "", image_composition=None) -> io.NodeOutput:
        adapter, image, image_negative, image_composition, attn_mask, face_analysis = cls.checked(
            adapter=adapter, image=image, image_negative=image_negative, image_composition=image_composition,
            attn_mask=attn_mask, face_analysis=face_analysis)
        patched, faces = apply_ipadapter_plus(model, adapter, clip_vision, image, weight, weight_type, combine_embeds,
                                              start_at, end_at, embeds_scaling, image_negative, attn_mask,
                                              face_analysis, weight_faceidv2, weight_composition, boost, faceid_lora,
                                              faceid_lora_strength, layer_weights, image_composition)
        return io.NodeOutput(patched, faces if faces is not None else image, ui=ui.PreviewText(
            f"{adapter.name}: weight {weight}, {weight_type}, {embeds_scaling}, {combine_embeds}"))


class PrepImageForClipVision(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityPrepImageForClipVision",
            display_name="Prep Image For CLIP Vision (OmniIdentity)",
            category=f"{CATEGORY}/adapter",
            description=("IPAdapter_plus's Prep Image For ClipVision: a square at the chosen position (or the photo "
                         "padded with black), resized to 224 px with a PIL filter, optionally sharpened "
                         "(contrast-adaptive sharpening)."),
            inputs=[
                io.Image.Input("image", tooltip="The reference photo(s)."),
                io.Combo.Input("interpolation", options=list(INTERPOLATIONS), default="LANCZOS",
                               tooltip="The resampling filter (PIL's)."),
                io.Combo.Input("crop_position", options=list(CROP_POSITIONS), default="top",
                               tooltip="Which square to keep, or pad: the whole photo padded with black."),
                io.Float.Input("sharpening", default=0.0, min=0.0, max=1.0, step=0.05,
                               tooltip="Contrast-adaptive sharpening; 0: none."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The 224 x 224 photo(s).")],
        )

    @classmethod
    def execute(cls, image, interpolation: str, crop_position: str, sharpening: float) -> io.NodeOutput:
        image = cls.checked(image=image)
        return io.NodeOutput(prep_for_clip_vision(image, interpolation, crop_position, sharpening))


class IPAdapterNoise(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityIPAdapterNoise",
            display_name="IPAdapter Noise (OmniIdentity)",
            category=f"{CATEGORY}/adapter",
            description=("IPAdapter_plus's IPAdapter Noise: a noisy image for the compatible apply's image_negative. "
                         "The photo's centre square at 224 px (black without a photo) mixed with noise whose seed "
                         "is the image's pixel sum (the same photo, the same noise), then optionally blurred."),
            inputs=[
                io.Combo.Input("type", options=list(NOISE_TYPES), default="fade",
                               tooltip="fade: the photo faded into uniform noise; dissolve: a share of pixels "
                                       "replaced by noise; gaussian: the photo plus normal noise."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="How much noise: the fade, the share of pixels, or the normal noise's scale."),
                io.Int.Input("blur", default=0, min=0, max=32, step=1,
                             tooltip="Gaussian blur kernel in pixels (an even size is made odd); 0: none."),
                io.Image.Input("image", optional=True,
                               tooltip="The photo to add noise to; without one, black."),
            ],
            outputs=[io.Image.Output(display_name="image", tooltip="The 224 x 224 noise image(s).")],
        )

    @classmethod
    def execute(cls, type: str, strength: float, blur: int, image=None) -> io.NodeOutput:  # noqa: A002
        image = cls.checked(image=image)
        return io.NodeOutput(noise_image(type, strength, blur, image))


NODES = [ApplyIPAdapterCompat, PrepImageForClipVision, IPAdapterNoise]
