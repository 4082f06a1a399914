"""Face analysis nodes: load a backend, detect/align/crop faces."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..comfy_host.folders import folder, library_cache_dir, onnx_files
from ..comfy_host.progress import progress
from ..encoders import face as face_core
from ..encoders.face.insightface_backend import KNOWN_PACKS, PROVIDERS, list_packs
from .common import CATEGORY, Faces, LOG, OmniNode

DLIB = "dlib"
NONE = "none"


def backend_options() -> list[str]:
    packs = sorted(set(list_packs(folder("insightface"))) | set(KNOWN_PACKS))
    return [DLIB] + [f"insightface/{name}" for name in packs]


class FaceAnalysisLoader(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityFaceAnalysisLoader",
            display_name="Face Analysis Loader (OmniIdentity)",
            category=f"{CATEGORY}/face",
            description=(
                "Loads a face analyser: detection, landmarks, face descriptor and head pose. "
                "'dlib' is bundled (HOG or CNN detector, 68 landmarks, 128-D descriptor) and needs "
                "no downloads; 'insightface/<pack>' runs an insightface model pack placed in "
                "models/insightface/models/<pack>/ (ArcFace 512-D embeddings)."),
            inputs=[
                io.Combo.Input("backend", options=backend_options(), default=DLIB,
                               tooltip="'dlib' (bundled) or an insightface pack from "
                                       "models/insightface/models/<pack>/ (needs insightface + onnxruntime)."),
                io.Combo.Input("provider", options=list(PROVIDERS), default="CPU",
                               tooltip="onnxruntime device for insightface packs; dlib always runs on the CPU."),
                io.Int.Input("det_size", default=640, min=128, max=2048, step=32,
                             tooltip="Detection resolution: images are scaled so their longer side is this "
                                     "many pixels for detection. Raise it to find small faces."),
                io.Combo.Input("dlib_detector", options=["hog", "cnn"], default="hog", optional=True,
                               tooltip="dlib backend only: 'hog' is fast and frontal; 'cnn' also finds "
                                       "turned and small faces but is slower on the CPU."),
                io.Combo.Input("arcface_model", options=[NONE] + list(onnx_files()), default=NONE, optional=True,
                               tooltip="dlib backend only: an ArcFace recognition model (.onnx under "
                                       "models/insightface, e.g. models/antelopev2/glintr100.onnx) whose 512-d "
                                       "embeddings replace dlib's descriptor; needed by the ArcFace baselines."),
            ],
            outputs=[io.FaceAnalysis.Output(display_name="face_analysis",
                                            tooltip="The loaded face analyser.")],
        )

    @classmethod
    def execute(cls, backend: str, provider: str, det_size: int, dlib_detector: str = "hog",
                arcface_model: str = NONE) -> io.NodeOutput:
        if arcface_model != NONE and backend != DLIB:
            raise ValueError("arcface_model applies to the dlib backend only; insightface packs bring "
                             "their own recognition model. Set it to 'none'.")
        arcface_path = None
        if arcface_model != NONE:
            arcface_path = onnx_files().get(arcface_model)
            if arcface_path is None:
                raise FileNotFoundError(f"ArcFace model {arcface_model!r} is no longer under models/insightface")
        analyzer = face_core.create_analyzer(
            backend, det_size=det_size, provider=provider, dlib_detector=dlib_detector,
            insightface_roots=folder("insightface"), arcface_model=arcface_path, library_dir=library_cache_dir())
        return io.NodeOutput(analyzer)


class FaceCrop(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityFaceCrop",
            display_name="Face Crop (OmniIdentity)",
            category=f"{CATEGORY}/face",
            description=(
                "Finds faces in an image batch and aligns each to the ArcFace five-point template "
                "(eye centres, nose tip, mouth corners; similarity transform), returning square "
                "crops, a face mask per crop, a FACES record (boxes, landmarks, pose, descriptors, "
                "crop transforms) and a preview. Images without a face are skipped with a warning; "
                "the node fails only when no face is left."),
            inputs=[
                io.Image.Input("image", tooltip="One or more photos (a batch)."),
                io.FaceAnalysis.Input("face_analysis", tooltip="From Face Analysis Loader (OmniIdentity)."),
                io.Int.Input("crop_size", default=224, min=64, max=2048, step=8,
                             tooltip="Side of the square crops in pixels (224 for CLIP, 112 for ArcFace)."),
                io.Float.Input("padding", default=0.25, min=0.0, max=2.0, step=0.01,
                               tooltip="Margin around the ArcFace face square, as a fraction of it per "
                                       "side: 0 is the tight ArcFace crop, 0.25 adds hair and chin."),
                io.Combo.Input("selection", options=list(face_core.SELECTIONS), default="largest",
                               tooltip="Which face to keep per image: the largest, the most confident, "
                                       "the one nearest the centre, or all of them (largest first)."),
            ],
            outputs=[
                io.Image.Output(display_name="crops", tooltip="Aligned face crops, one per kept face."),
                io.Mask.Output(display_name="masks", tooltip="Face region of each crop (soft edge)."),
                Faces.Output(display_name="faces",
                             tooltip="Per face: source image, box, landmarks, pose, descriptor, crop transform."),
                io.Image.Output(display_name="preview",
                                tooltip="The input images with boxes and landmarks drawn on them."),
            ],
        )

    @classmethod
    def execute(cls, image, face_analysis, crop_size: int, padding: float, selection: str) -> io.NodeOutput:
        image, face_analysis = cls.checked(image=image, face_analysis=face_analysis)
        result = face_core.crop_faces(image, face_analysis, crop_size=crop_size, padding=padding,
                                      selection=selection, on_image_done=progress(len(image)))
        notes = result.warnings + face_core.overlap_warnings(result.faces)
        for note in notes:
            LOG.warning("FaceCrop: %s", note)
        text = "\n".join([f"{len(result.faces.records)} face(s) kept; faces are numbered 1, 2, ... in this order "
                          "(per image, largest first)", *notes])
        return io.NodeOutput(result.crops, result.masks, result.faces, face_core.draw_faces(image, result.faces),
                             ui=ui.PreviewText(text))


class FaceMask(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityFaceMask",
            display_name="Face Mask (OmniIdentity)",
            category=f"{CATEGORY}/face",
            description=("The region of one face of a Face Crop, as a mask over the image it was found in: for one "
                         "identity per face in a picture of several people (an Apply Identity Adapter's attn_mask, "
                         "an RB-Guidance generation_mask). Use the layout photo's size for the generated image."),
            inputs=[
                Faces.Input("faces", tooltip="From Face Crop (selection 'all' keeps every face)."),
                io.Int.Input("face", default=1, min=1, max=64,
                             tooltip="Which face, in Face Crop's order (per image, largest first), from 1."),
                io.Float.Input("grow", default=0.15, min=0.0, max=2.0, step=0.01,
                               tooltip="Grow the face region about its centre by this fraction (hair, neck)."),
                io.Int.Input("feather", default=8, min=0, max=256, tooltip="Soft edge, in pixels."),
            ],
            outputs=[io.Mask.Output(display_name="mask", tooltip="The face region over the whole image.")],
        )

    @classmethod
    def execute(cls, faces, face: int, grow: float, feather: int) -> io.NodeOutput:
        if not isinstance(faces, face_core.FaceSet):
            raise TypeError("faces must come from 'Face Crop (OmniIdentity)'")
        records = faces.records
        if face > len(records):
            raise ValueError(f"face {face}: Face Crop kept {len(records)} face(s); choose 1 to {len(records)} "
                             "(selection 'all' keeps every face it finds)")
        record = records[face - 1]
        height, width = faces.image_sizes[record.image_index]
        mask = face_core.face_region(record.face, height, width, grow, feather)
        box = [round(float(v)) for v in record.face.bbox]
        return io.NodeOutput(mask[None], ui=ui.PreviewText(f"face {face} of {len(records)} (image "
                                                            f"{record.image_index + 1}, box {box})"))


NODES = [FaceAnalysisLoader, FaceCrop, FaceMask]
