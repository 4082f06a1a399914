"""Identity encoding nodes: load an encoder, encode photos (Omni-ID or a baseline), manage embeds."""
from __future__ import annotations

import hashlib
import os
import uuid
import weakref

import comfy.model_management as mm
import comfy.model_patcher
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..encoders.checkpoint import load_encoder
from ..encoders.clip_features import OPENAI_MEAN, TokenCache
from ..encoders.embeds import COMBINE_MODES, combine_embeds, load_embeds, save_embeds
from ..encoders.face import crop_faces
from ..encoders.identity import BASELINES, arcface_from_faces, baseline_embeds, omni_id_embeds
from ..encoders.omni_id import ARCFACE_MERGES
from .common import CATEGORY, LOG, IdentityEmbedsType, OmniIdEncoderType, check_combos, progress
from .model_folders import model_files

CROP_SIZE = 224            # CLIP-H's input size
TOKEN_CACHE = TokenCache(capacity=512)
_CLIP_KEYS: "weakref.WeakKeyDictionary[object, str]" = weakref.WeakKeyDictionary()


class LoadedEncoder:
    """The OMNI_ID_ENCODER value: an encoder under ComfyUI's memory management."""

    def __init__(self, model, name: str):
        load_device, offload_device = mm.get_torch_device(), mm.unet_offload_device()
        dtype = torch.float32
        if mm.should_use_bf16(load_device):
            dtype = torch.bfloat16
        elif mm.should_use_fp16(load_device):
            dtype = torch.float16
        self.model = model.to(offload_device, dtype)
        self.name = name
        self.config = model.config
        self.patcher = comfy.model_patcher.ModelPatcher(self.model, load_device=load_device,
                                                        offload_device=offload_device)

    def ready(self):
        """The encoder, loaded onto the compute device by ComfyUI's model manager."""
        mm.load_model_gpu(self.patcher)
        return self.model


def clip_key(clip_vision) -> str:
    """A stable id per loaded CLIP vision model, for the per-photo token cache."""
    key = _CLIP_KEYS.get(clip_vision)
    if key is None:
        key = _CLIP_KEYS[clip_vision] = uuid.uuid4().hex
    return key


def clip_tokens(clip_vision, crops: torch.Tensor) -> tuple[torch.Tensor, int]:
    """CLIP penultimate tokens (N, 257, C) of the crops; cached photos are not re-encoded."""
    def encode(images):
        return clip_vision.encode_image(images, crop=False)["penultimate_hidden_states"]

    return TOKEN_CACHE.encode(crops, encode, clip_key(clip_vision))


def clip_uncond_tokens(clip_vision) -> torch.Tensor:
    """CLIP tokens (1, 257, C) of a zero image after normalisation (an image of CLIP's mean
    colour): the unconditional input IP-Adapter projections were trained with."""
    mean = torch.tensor(getattr(clip_vision, "image_mean", OPENAI_MEAN), dtype=torch.float32)
    return clip_tokens(clip_vision, mean.expand(1, CROP_SIZE, CROP_SIZE, 3).contiguous())[0]


def prepare_photos(images: torch.Tensor, face_analysis, padding: float):
    """Aligned crops of the photos: made here when a face analysis is connected, else the input.

    Returns (crops, FACES or None, info about skipped photos).
    """
    if face_analysis is None:
        return images, None, {"num_images": len(images), "skipped_images": []}
    if not callable(getattr(face_analysis, "detect", None)):
        raise TypeError("face_analysis must come from 'Face Analysis Loader (OmniIdentity)'")
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


def crops_output():
    return io.Image.Output(display_name="crops", tooltip="The face crops that were encoded.")


def require_encoder(encoder) -> LoadedEncoder:
    if not isinstance(encoder, LoadedEncoder):
        raise TypeError("encoder must come from 'Identity Encoder Loader (OmniIdentity)'")
    return encoder


class EncoderLoader(io.ComfyNode):
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
    def validate_inputs(cls, encoder_name=None):
        return check_combos(cls, encoder_name=encoder_name)

    @classmethod
    def execute(cls, encoder_name: str) -> io.NodeOutput:
        path = folder_paths.get_full_path_or_raise("omni_identity", encoder_name)
        return io.NodeOutput(LoadedEncoder(load_encoder(path), encoder_name))


class Encode(io.ComfyNode):
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
            ],
            outputs=[
                IdentityEmbedsType.Output(display_name="embeds", tooltip="The identity (256 x 1280 tokens)."),
                crops_output(),
            ],
        )

    @classmethod
    def execute(cls, encoder, clip_vision, images, face_analysis=None, padding: float = 0.25) -> io.NodeOutput:
        require_encoder(encoder)
        crops, _, info = prepare_photos(images, face_analysis, padding)
        tokens, fresh = clip_tokens(clip_vision, crops)
        info["encoder"] = encoder.name
        embeds = omni_id_embeds(encoder.ready(), tokens, info)
        text = report(embeds, fresh, info["skipped_images"], len(images))
        LOG.info("Encode: %s", text.replace("\n", "; "))
        return io.NodeOutput(embeds, crops, ui=ui.PreviewText(text))


class EncodeBaseline(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityEncodeBaseline",
            display_name="Baseline Identity Encode (OmniIdentity)",
            category=f"{CATEGORY}/encode",
            description=("The Omni-ID paper's baselines. clip: CLIP-H penultimate tokens of every photo, "
                         "concatenated (IP-Adapter Plus/Full). arcface: the 512-d ArcFace embedding per photo "
                         "(IP-Adapter FaceID). arcface_clip: both (FaceIDPlus). With an encoder file of the same "
                         "architecture the features are also projected to 256 x 1280 tokens, as in the paper."),
            inputs=[
                io.Combo.Input("method", options=list(BASELINES), default="clip",
                               tooltip="clip, arcface or arcface_clip."),
                io.Image.Input("images", tooltip=IMAGES_TOOLTIP),
                io.FaceAnalysis.Input("face_analysis", optional=True,
                                      tooltip="Needed by the ArcFace methods (an insightface pack, or dlib with an "
                                              "ArcFace model); also aligns the photos."),
                io.ClipVision.Input("clip_vision", optional=True, tooltip="CLIP-H; needed by clip and arcface_clip."),
                OmniIdEncoderType.Input("encoder", optional=True,
                                        tooltip="Optional arcface / arcface_clip encoder file: adds the projected "
                                                "256 x 1280 tokens."),
                io.Combo.Input("arcface_merge", options=list(ARCFACE_MERGES), default="concat", optional=True,
                               tooltip="Several photos with an arcface encoder: concatenate their tokens (the "
                                       "paper's choice) or average the embeddings first."),
                padding_input(),
            ],
            outputs=[
                IdentityEmbedsType.Output(display_name="embeds", tooltip="The baseline identity."),
                crops_output(),
            ],
        )

    @classmethod
    def validate_inputs(cls, method=None, arcface_merge=None):
        return check_combos(cls, method=method, arcface_merge=arcface_merge)

    @classmethod
    def execute(cls, method: str, images, face_analysis=None, clip_vision=None, encoder=None,
                arcface_merge: str = "concat", padding: float = 0.25) -> io.NodeOutput:
        needs_arcface = method in ("arcface", "arcface_clip")
        if needs_arcface and face_analysis is None:
            raise ValueError(f"the {method} baseline needs a face analysis (insightface pack, or dlib with an "
                             "ArcFace model) to compute ArcFace embeddings")
        if method in ("clip", "arcface_clip") and clip_vision is None:
            raise ValueError(f"the {method} baseline needs clip_vision (CLIP-H)")
        if encoder is not None:
            require_encoder(encoder)
        crops, faces, info = prepare_photos(images, face_analysis, padding)
        arcface = arcface_from_faces(faces) if needs_arcface else None
        tokens, fresh, uncond = None, 0, None
        if clip_vision is not None and method != "arcface":
            tokens, fresh = clip_tokens(clip_vision, crops)
            uncond = clip_uncond_tokens(clip_vision)
        if encoder is not None:
            info["encoder"] = encoder.name
        embeds = baseline_embeds(method, clip_tokens=tokens, arcface=arcface,
                                 encoder=encoder.ready() if encoder is not None else None,
                                 arcface_merge=arcface_merge, info=info, clip_uncond=uncond)
        text = report(embeds, fresh, info["skipped_images"], len(images))
        return io.NodeOutput(embeds, crops, ui=ui.PreviewText(text))


class CombineEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        weight = "Weight of embeds_{} when averaging."
        return io.Schema(
            node_id="OmniIdentityCombineEmbeds",
            display_name="Combine Identity Embeds (OmniIdentity)",
            category=f"{CATEGORY}/encode",
            description=("Merges identities of the same kind: concat joins tokens and photos (e.g. two photo "
                         "sets of one person); average takes a weighted mean (blend identities)."),
            inputs=[
                IdentityEmbedsType.Input("embeds_1", tooltip="First identity."),
                IdentityEmbedsType.Input("embeds_2", tooltip="Second identity."),
                IdentityEmbedsType.Input("embeds_3", optional=True, tooltip="Optional third identity."),
                IdentityEmbedsType.Input("embeds_4", optional=True, tooltip="Optional fourth identity."),
                io.Combo.Input("mode", options=list(COMBINE_MODES), default="concat",
                               tooltip="concat: join along tokens / photos; average: weighted mean."),
                *(io.Float.Input(f"weight_{i}", default=1.0, min=0.0, max=10.0, step=0.05, optional=True,
                                 tooltip=weight.format(i)) for i in range(1, 5)),
            ],
            outputs=[IdentityEmbedsType.Output(display_name="embeds", tooltip="The combined identity.")],
        )

    @classmethod
    def validate_inputs(cls, mode=None):
        return check_combos(cls, mode=mode)

    @classmethod
    def execute(cls, embeds_1, embeds_2, mode: str, embeds_3=None, embeds_4=None, weight_1=1.0, weight_2=1.0,
                weight_3=1.0, weight_4=1.0) -> io.NodeOutput:
        pairs = [(e, w) for e, w in ((embeds_1, weight_1), (embeds_2, weight_2), (embeds_3, weight_3),
                                     (embeds_4, weight_4)) if e is not None]
        combined = combine_embeds([e for e, _ in pairs], mode, [w for _, w in pairs])
        return io.NodeOutput(combined, ui=ui.PreviewText(combined.describe()))


class SaveEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentitySaveEmbeds",
            display_name="Save Identity Embeds (OmniIdentity)",
            category=f"{CATEGORY}/encode",
            description=("Saves an identity as .safetensors in ComfyUI's output folder (never pickle), so it can "
                         "be reused without the photos: copy it to input/ or load it from output/."),
            inputs=[
                IdentityEmbedsType.Input("embeds", tooltip="The identity to save."),
                io.String.Input("filename_prefix", default="omni_identity/identity",
                                tooltip="Path under the output folder; a counter and .safetensors are appended."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, embeds, filename_prefix: str) -> io.NodeOutput:
        output_dir = folder_paths.get_output_directory()
        folder, name, counter, subfolder, _ = folder_paths.get_save_image_path(filename_prefix, output_dir)
        filename = f"{name}_{counter:05}_.safetensors"
        save_embeds(embeds, os.path.join(folder, filename))
        saved = {"filename": filename, "subfolder": subfolder, "type": "output"}
        LOG.info("SaveEmbeds: wrote %s", os.path.join(folder, filename))
        return io.NodeOutput(ui={"embeds": [saved], "text": [f"saved {os.path.join(subfolder, filename)}"]})


def embeds_files() -> list[str]:
    """.safetensors files in input/ (plain names) and output/ (annotated ' [output]')."""
    found = []
    for base, suffix in ((folder_paths.get_input_directory(), ""), (folder_paths.get_output_directory(), " [output]")):
        for dirpath, _, names in os.walk(base, followlinks=True):
            for name in names:
                if name.endswith(".safetensors"):
                    rel = os.path.relpath(os.path.join(dirpath, name), base).replace(os.sep, "/")
                    found.append(rel + suffix)
    return sorted(found)


class LoadEmbeds(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityLoadEmbeds",
            display_name="Load Identity Embeds (OmniIdentity)",
            category=f"{CATEGORY}/encode",
            description="Loads an identity saved by Save Identity Embeds, from the input or output folder.",
            inputs=[io.Combo.Input("embeds_file", options=embeds_files(),
                                   tooltip="A saved identity: files in input/, or in output/ marked [output].")],
            outputs=[IdentityEmbedsType.Output(display_name="embeds", tooltip="The loaded identity.")],
        )

    @classmethod
    def validate_inputs(cls, embeds_file=None):
        return check_combos(cls, embeds_file=embeds_file)

    @classmethod
    def fingerprint_inputs(cls, embeds_file):
        path = folder_paths.get_annotated_filepath(embeds_file)
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    @classmethod
    def execute(cls, embeds_file: str) -> io.NodeOutput:
        embeds = load_embeds(folder_paths.get_annotated_filepath(embeds_file))
        return io.NodeOutput(embeds, ui=ui.PreviewText(embeds.describe()))


NODES = [EncoderLoader, Encode, EncodeBaseline, CombineEmbeds, SaveEmbeds, LoadEmbeds]
