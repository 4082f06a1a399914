"""Dataset nodes: a folder of per-person photo folders, or one built by Omni-ID's pipeline."""
from __future__ import annotations

import json
import os

from comfy_api.latest import io, ui

from ..comfy_host.folders import DATASETS_SUBFOLDER, dataset_folders, output_path, safe_name
from ..comfy_host.progress import progress
from ..training.build_dataset import BuildSettings, build_dataset
from ..training.dataset import IdentityDataset
from .common import CATEGORY, IdentityDatasetType, OmniNode

NO_DATASETS = "(no dataset folders in input/ or output/)"


class Dataset(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        options = list(dataset_folders()) or [NO_DATASETS]
        return io.Schema(
            node_id="OmniIdentityDataset",
            display_name="Identity Dataset (OmniIdentity)",
            category=f"{CATEGORY}/training",
            description=("A training dataset: a folder with one sub-folder of photos per person (8 each in the "
                         "paper, any number works), in ComfyUI's input/ folder or made by Build Dataset."),
            inputs=[io.Combo.Input("folder", options=options, tooltip="input/<name> or output/omni_identity_datasets/<name>."),
                    io.Int.Input("min_photos", default=2, min=1, max=64,
                                 tooltip="Identities with fewer photos are left out.")],
            outputs=[IdentityDatasetType.Output(display_name="dataset", tooltip="The identities found in the folder.")],
        )

    @classmethod
    def validate_inputs(cls, folder=None):
        if folder == NO_DATASETS:
            return ("no dataset folder: put a folder with one sub-folder of photos per person into ComfyUI's "
                    "input/ folder, or make one with 'Build Identity Dataset (OmniIdentity)'")
        if folder is not None and folder not in dataset_folders():
            return f"dataset folder {folder!r} not found; choose one of {list(dataset_folders())}"
        return True

    @classmethod
    def fingerprint_inputs(cls, folder, min_photos):
        path = dataset_folders().get(folder, "")
        stamp = [(root, len(files)) for root, _, files in os.walk(path)] if path else []
        return json.dumps([folder, min_photos, stamp])

    @classmethod
    def execute(cls, folder: str, min_photos: int) -> io.NodeOutput:
        dataset = IdentityDataset(dataset_folders()[folder], min_images=min_photos)
        return io.NodeOutput(dataset, ui=ui.PreviewText(dataset.describe()))


class BuildDataset(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityBuildDataset",
            display_name="Build Identity Dataset (OmniIdentity)",
            category=f"{CATEGORY}/training",
            description=("Omni-ID's dataset pipeline (Fig. II) over photos or video frames: detect faces, split "
                         "identities by descriptor similarity, drop faces smaller than 448 px (never upscaled) and the "
                         "lowest-quality 20%, cluster head poses (yaw, pitch, roll) into 16, take 8 faces, at most one "
                         "per cluster, every pair's summed pose difference above 15 degrees, and write the aligned "
                         "crops to output/omni_identity_datasets/<name>/<identity>/. The report says what was dropped "
                         "and why."),
            inputs=[
                io.Image.Input("images", tooltip="Photos or video frames (a batch), of one or several people."),
                io.FaceAnalysis.Input("face_analysis", tooltip="From Face Analysis Loader (OmniIdentity)."),
                io.String.Input("name", default="my_dataset", tooltip="Dataset folder name."),
                io.Int.Input("photos_per_identity", default=8, min=1, max=64,
                             tooltip="Faces kept per person (8 in the paper); people with fewer are left out."),
                io.Int.Input("pose_clusters", default=16, min=1, max=64, tooltip="k of the k-means over head poses."),
                io.Float.Input("min_pose_difference", default=15.0, min=0.0, max=270.0, step=0.5,
                               tooltip="Least sum of absolute yaw, pitch and roll differences (degrees) between any "
                                       "two chosen faces (paper: 15)."),
                io.Float.Input("drop_fraction", default=0.2, min=0.0, max=0.9, step=0.05,
                               tooltip="Share of each identity's faces dropped as the lowest quality."),
                io.Float.Input("similarity_threshold", default=-1.0, min=-1.0, max=1.0, step=0.01,
                               tooltip="Same-person threshold on descriptor similarity; -1 uses the backend's "
                                       "(dlib 0.4, ArcFace 0.35)."),
                io.Int.Input("crop_size", default=448, min=64, max=2048, step=8,
                             tooltip="Side of the aligned crops written (448 for the MTD stage)."),
                io.Int.Input("min_face_size", default=448, min=0, max=4096, step=8, optional=True,
                             tooltip="Faces spanning fewer source pixels than this are dropped, not upscaled (the "
                                     "paper's 448 px floor); 0 keeps every face. The report counts the dropped."),
            ],
            outputs=[IdentityDatasetType.Output(display_name="dataset", tooltip="The dataset just written."),
                     io.String.Output(display_name="report", tooltip="What was kept and left out, as JSON.")],
        )

    @classmethod
    def execute(cls, images, face_analysis, name: str, photos_per_identity: int, pose_clusters: int,
                min_pose_difference: float, drop_fraction: float, similarity_threshold: float,
                crop_size: int, min_face_size: int = 448) -> io.NodeOutput:
        images, face_analysis = cls.checked(images=images, face_analysis=face_analysis)
        name = safe_name(name, "name (the dataset folder)")
        out = output_path(DATASETS_SUBFOLDER, name)
        if os.path.isdir(out) and os.listdir(out):
            raise FileExistsError(f"output/{DATASETS_SUBFOLDER}/{name} already holds a dataset; choose another name "
                                  "(nothing is overwritten)")
        settings = BuildSettings(photos_per_identity, pose_clusters, min_pose_difference, drop_fraction,
                                 None if similarity_threshold < 0 else similarity_threshold, crop_size,
                                 min_face_size=min_face_size)
        report = build_dataset(images, face_analysis, out, settings, on_image=progress(len(images)))
        text = json.dumps(report.to_dict())
        if not report.identities:
            raise ValueError(f"no identity had {photos_per_identity} faces with distinct poses; lower "
                             f"photos_per_identity, min_pose_difference or min_face_size, or add photos. Report: {text}")
        return io.NodeOutput(IdentityDataset(out, min_images=1), text, ui=ui.PreviewText(text))


NODES = [Dataset, BuildDataset]
