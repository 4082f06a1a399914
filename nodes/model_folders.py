"""The pack's model folders, registered with ComfyUI's folder_paths.

Each folder is added under ComfyUI's models directory (and keeps any extra paths a
user's extra_model_paths.yaml already gave it), so inputs list files from there.
"""
from __future__ import annotations

import os

import folder_paths

# name -> file extensions listed in inputs (insightface packs are folders, listed apart)
MODEL_FOLDERS: dict[str, set[str]] = {
    "omni_identity": {".safetensors"},
    "ipadapter": {".safetensors", ".bin"},
    "insightface": set(),
    "flame": {".pkl", ".npz", ".npy"},
}


def register_model_folders() -> None:
    for name, extensions in MODEL_FOLDERS.items():
        folder_paths.add_model_folder_path(name, os.path.join(folder_paths.models_dir, name))
        paths, known = folder_paths.folder_names_and_paths[name]
        folder_paths.folder_names_and_paths[name] = (paths, set(known) | extensions)


def folder(name: str) -> list[str]:
    """The search paths of one of the pack's model folders."""
    return folder_paths.get_folder_paths(name)


def model_files(name: str) -> list[str]:
    """Files of one of the pack's model folders with the extensions it accepts."""
    extensions = tuple(MODEL_FOLDERS[name])
    return [f for f in folder_paths.get_filename_list(name) if f.endswith(extensions)]
