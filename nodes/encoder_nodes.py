"""Identity encoding nodes: load an encoder, encode photos with Omni-ID or a baseline."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..comfy_host.clip_vision import CROP_MODES, UNCONDITIONAL, ClipVision, load_siglip_head
from ..comfy_host.encoder_model import LoadedEncoder, require_encoder
from ..comfy_host.folders import clip_vision_files, model_files, model_path
from ..comfy_host.progress import progress
from ..encoders.checkpoint import load_encoder
from ..encoders.face import crop_faces
from ..encoders.identity import BASELINES, arcface_from_faces, baseline_embeds, infinite_id_embeds, omni_id_embeds
from ..encoders.omni_id import ARCFACE_MERGES
from .common import (CATEGORY, LOG, IdentityEmbedsType, OmniIdEncoderType, OmniNode, advanced)

CROP_SIZE = 224            # CLIP-H's input size


def prepare_photos(images, face_analysis, padding: float):
    """Aligned crops of the photos: made here when a face analysis is connected, else the input.

    Returns (crops, FACES or None, info about skipped photos).
    """
    if face_analysis is None:
        return images, None, {"num_images": len(images), "skipped_images": []}
    result = crop_faces(images, face_analysis, crop_size=CROP_SIZE, padding=padding, selection="largest",
                        on_image_done=progress(len(images)))
    for warning in result.warnings:
        LOG.warning("Encode: %s", warning)
    skipped = result.faces.skipped_images
    return result.crops, result.faces, {"num_images": len(result.crops), "skipped_images": skipped,
                                        "face_backend": face_analysis.name}


def report(embeds, fresh: int, skipped: list[int], total: int) -> str:
    lines = [embeds.describe(), f"CLIP encoded {fresh} new photo(s), reused {embeds.num_images - fresh}"]
    if skipped:
        lines.append(f"skipped photo(s) {', '.join(str(i + 1) for i in skipped)} of {total}: no face found")
    return "\n".join(lines)


IMAGES_TOOLTIP = ("Photos of one person (a batch). Aligned face crops from Face Crop, or any photos "
                  "when a face analysis is connected.")
FACE_ANALYSIS_TOOLTIP = ("Optional: detect and align the face in every photo here (crops of 224 px); "
                         "photos without a face are skipped and reported.")


def padding_input():
    return io.Float.Input("padding", default=0.25, min=0.0, max=2.0, step=0.01, optional=True,
                          tooltip="Margin around the ArcFace face square when cropping here (see Face Crop).")


def clip_crop_input():
    return io.Combo.Input("clip_crop", options=list(CROP_MODES), default="center", optional=True,
                          tooltip="How photos that are not square reach the vision model's input: center (CLIP's "
                                  "own preprocessing, h94 and IPAdapter_plus: shorter side resized, centre "
                                  "cropped), squash (whole photo resized, as SigLIP's processor for InstantX's "
                                  "adapter) or pad (padded with black to a square, IPAdapter_plus's 'pad'). "
                                  "Aligned face crops are square: every mode gives the same.")


def crops_output():
    return io.Image.Output(display_name="crops", tooltip="The face crops that were encoded.")


class EncoderLoader(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityEncoderLoader",
            display_name="Identity Encoder Loader (OmniIdentity)",
            category=f"{CATEGORY}/encode",
            description=("Loads an identity encoder (.safetensors in models/omni_identity): the Omni-ID "
                         "encoder, or the projection of an ArcFace / ArcFace+CLIP baseline. The file's "
                         "metadata holds its architecture; wrong or damaged files are named with the reason."),
            inputs=[io.Combo.Input("encoder_name", options=model_files("omni_identity"),
                                   tooltip="Encoder file in models/omni_identity.")],
            outputs=[OmniIdEncoderType.Output(display_name="encoder", tooltip="The loaded identity encoder.")],
        )

    @classmethod
    def execute(cls, encoder_name: str) -> io.NodeOutput:
        return io.NodeOutput(LoadedEncoder(load_encoder(model_path("omni_identity", encoder_name)), encoder_name))


class Encode(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityEncode",
            display_name="Omni-ID Encode (OmniIdentity)",
            category=f"{CATEGORY}/encode",
            description=("Encodes any number of photos of one person into one Omni-ID identity: the CLIP-H "
                         "penultimate tokens of every photo are concatenated as keys/values for 256 learned "
                         "queries (256 x 1280 out, independent of the photos' order). Photos already seen "
                         "with the same CLIP model are not re-encoded."),
            inputs=[
                OmniIdEncoderType.Input("encoder", tooltip="From Identity Encoder Loader (an omni_id file)."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP-H vision model (CLIP-ViT-H-14-laion2B-s32B-b79K) "
                                                           "from Load CLIP Vision."),
                io.Image.Input("images", tooltip=IMAGES_TOOLTIP),
                io.FaceAnalysis.Input("face_analysis", optional=True, tooltip=FACE_ANALYSIS_TOOLTIP),
                padding_input(),
                clip_crop_input(),
            ],
            outputs=[
                IdentityEmbedsType.Output(display_name="embeds", tooltip="The identity (256 x 1280 tokens)."),
                crops_output(),
            ],
        )

    @classmethod
    def execute(cls, encoder, clip_vision, images, face_analysis=None, padding: float = 0.25,
                clip_crop: str = "center") -> io.NodeOutput:
        encoder, images, face_analysis = cls.checked(encoder=encoder, images=images, face_analysis=face_analysis)
        require_encoder(encoder)
        crops, _, info = prepare_photos(images, face_analysis, padding)
        tokens, fresh = ClipVision(clip_vision).cached_tokens(crops, clip_crop)
        info["encoder"] = encoder.name
        embeds = omni_id_embeds(encoder.ready(), tokens, info)
        text = report(embeds, fresh, info["skipped_images"], len(images))
        LOG.info("Encode: %s", text.replace("\n", "; "))
        return io.NodeOutput(embeds, crops, ui=ui.PreviewText(text))


class EncodeBaseline(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityEncodeBaseline",
            display_name="Baseline Identity Encode (OmniIdentity)",
            category=f"{CATEGORY}/encode",
            description=("The Omni-ID paper's baselines, and the input of the IP-Adapters users already have. clip: "
                         "the vision model's penultimate tokens of every photo (IP-Adapter Plus/Full) and its pooled "
                         "embedding (h94 base, XLabs FLUX with CLIP-L, InstantX FLUX with SigLIP). arcface: the "
                         "512-d ArcFace embedding per photo (IP-Adapter FaceID). arcface_clip: both (FaceID Plus). "
                         "With an encoder file of the same architecture the features are also projected to "
                         "256 x 1280 tokens, as in the paper."),
            inputs=[
                io.Combo.Input("method", options=list(BASELINES), default="clip",
                               tooltip="clip, arcface or arcface_clip."),
                io.Image.Input("images", tooltip=IMAGES_TOOLTIP),
                io.FaceAnalysis.Input("face_analysis", optional=True,
                                      tooltip="Needed by the ArcFace methods (an insightface pack, or dlib with an "
                                              "ArcFace model); also aligns the photos."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Needed by clip and arcface_clip: CLIP-H for h94's adapters, CLIP-L for "
                                            "XLabs' FLUX adapters, SigLIP so400m for InstantX's."),
                OmniIdEncoderType.Input("encoder", optional=True,
                                        tooltip="Optional arcface / arcface_clip encoder file: adds the projected "
                                                "256 x 1280 tokens."),
                io.Combo.Input("arcface_merge", options=list(ARCFACE_MERGES), default="concat", optional=True,
                               tooltip="Several photos with an arcface encoder: concatenate their tokens (the "
                                       "paper's choice) or average the embeddings first."),
                padding_input(),
                clip_crop_input(),
                io.Combo.Input("unconditional", options=list(UNCONDITIONAL), default="h94", optional=True,
                               tooltip="The image behind the identity of CFG's unconditional branch: h94 (CLIP's "
                                       "input of zeros after normalisation, and a zero pooled embedding, as h94's "
                                       "IP-Adapter code) or black (a black image, as IPAdapter_plus and XLabs)."),
                advanced(io.Combo.Input("siglip_head", options=["none", *clip_vision_files()], default="none", optional=True,
                               tooltip="SigLIP only (InstantX's FLUX adapter): the SigLIP file whose attention-"
                                       "pooling head gives the pooled embedding. ComfyUI's CLIP vision loader drops "
                                       "that head; choose a file that keeps it (e.g. google/siglip-so400m-"
                                       "patch14-384's model.safetensors).")),
            ],
            outputs=[
                IdentityEmbedsType.Output(display_name="embeds", tooltip="The baseline identity."),
                crops_output(),
            ],
        )

    @classmethod
    def execute(cls, method: str, images, face_analysis=None, clip_vision=None, encoder=None,
                arcface_merge: str = "concat", padding: float = 0.25, clip_crop: str = "center",
                unconditional: str = "h94", siglip_head: str = "none") -> io.NodeOutput:
        images, face_analysis, encoder = cls.checked(images=images, face_analysis=face_analysis, encoder=encoder)
        needs_arcface = method in ("arcface", "arcface_clip")
        if needs_arcface and face_analysis is None:
            raise ValueError(f"the {method} baseline needs face_analysis connected (an insightface pack, or dlib "
                             "with an ArcFace model) to compute ArcFace embeddings")
        if method in ("clip", "arcface_clip") and clip_vision is None:
            raise ValueError(f"the {method} baseline needs clip_vision (CLIP-H)")
        if encoder is not None:
            require_encoder(encoder)
        crops, faces, info = prepare_photos(images, face_analysis, padding)
        arcface = arcface_from_faces(faces) if needs_arcface else None
        tokens, fresh, uncond, pooled, pooled_uncond = None, 0, None, None, None
        if clip_vision is not None and method != "arcface":
            vision = ClipVision(clip_vision)
            if siglip_head != "none":
                vision.head = load_siglip_head(model_path("clip_vision", siglip_head), vision.heads)
            tokens, pooled, fresh = vision.cached_features(crops, clip_crop)
            uncond, pooled_uncond = vision.unconditional(unconditional)
            info.update(image_encoder=vision.describe(None if pooled is None else pooled.shape[-1], tokens),
                        clip_crop=clip_crop, unconditional=unconditional)
        if encoder is not None:
            info["encoder"] = encoder.name
        embeds = baseline_embeds(method, clip_tokens=tokens, arcface=arcface,
                                 encoder=encoder.ready() if encoder is not None else None,
                                 arcface_merge=arcface_merge, info=info, clip_uncond=uncond, pooled=pooled,
                                 pooled_uncond=pooled_uncond)
        text = report(embeds, fresh, info["skipped_images"], len(images))
        return io.NodeOutput(embeds, crops, ui=ui.PreviewText(text))


class EncodeInfiniteID(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityEncodeInfiniteID",
            display_name="Infinite-ID Encode (OmniIdentity)",
            category=f"{CATEGORY}/encode",
            description=("Infinite-ID's identity extractor (ECCV 2024): c_id = Concat(M_clip(E_clip(FA(x))), "
                         "M_face(E_face(FA(x)))): the aligned face's CLIP ViT-H last hidden states (257 tokens) "
                         "through the CLIP mapper and its ArcFace embedding through the face mapper, concatenated. "
                         "For Mixed Attention / Apply Adapter with an adapter trained on infinite_id embeds. Several "
                         "photos are averaged."),
            inputs=[
                OmniIdEncoderType.Input("encoder", tooltip="An infinite_id encoder file (Identity Encoder Loader)."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP-H vision model (OpenCLIP ViT-H/14)."),
                io.Image.Input("images", tooltip="Photos of the person (the paper uses one)."),
                io.FaceAnalysis.Input("face_analysis",
                                      tooltip="Aligns the faces (FA) and gives the ArcFace embeddings: an insightface "
                                              "pack, or dlib with an ArcFace model."),
                padding_input(),
            ],
            outputs=[IdentityEmbedsType.Output(display_name="embeds", tooltip="c_id: 257 + face tokens."),
                     crops_output()],
        )

    @classmethod
    def execute(cls, encoder, clip_vision, images, face_analysis, padding: float = 0.25) -> io.NodeOutput:
        encoder, images, face_analysis = cls.checked(encoder=encoder, images=images, face_analysis=face_analysis)
        require_encoder(encoder)
        crops, faces, info = prepare_photos(images, face_analysis, padding)
        tokens, fresh = ClipVision(clip_vision).cached_tokens(crops, layer="last")
        info["encoder"] = encoder.name
        embeds = infinite_id_embeds(encoder.ready(), tokens, arcface_from_faces(faces), info)
        text = report(embeds, fresh, info["skipped_images"], len(images))
        return io.NodeOutput(embeds, crops, ui=ui.PreviewText(text))


NODES = [EncoderLoader, Encode, EncodeBaseline, EncodeInfiniteID]
