"""Where the pack's files live in a ComfyUI install, and the one rule for naming what it saves.

Model folders are registered under ComfyUI's models directory (keeping any extra paths a
user's extra_model_paths.yaml gave them). Everything the pack writes (identities,
encoders, adapters, pivot encoders) is named ``<prefix>_NNNNN.safetensors`` with the next
free counter, so nothing is ever overwritten.
"""
from __future__ import annotations

import os
import re

import folder_paths

# name -> file extensions listed in inputs (insightface packs are folders, listed apart)
MODEL_FOLDERS: dict[str, set[str]] = {
    "omni_identity": {".safetensors"},
    "ipadapter": {".safetensors", ".bin"},
    "insightface": set(),
    "flame": {".pkl", ".npz", ".npy"},
    "pulid": {".safetensors"},             # PuLID-FLUX files (pulid_flux_v0.9.x.safetensors)
    "facexlib": {".pth", ".safetensors"},  # face parsing (parsing_bisenet.pth, read as tensors only)
    "infiniteyou": {".bin", ".safetensors"},  # InfiniteYou's image projection (image_proj_model.bin, tensors only)
}
DATASETS_SUBFOLDER = "omni_identity_datasets"      # under output/: datasets Build Dataset writes
RUNS_SUBFOLDER = "omni_identity_training"          # under output/: training checkpoints


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


def library_cache_dir() -> str:
    """Where third-party libraries the pack imports keep caches (matplotlib's, via insightface): ComfyUI's
    temp folder, never the user's home."""
    return os.path.join(folder_paths.get_temp_directory(), "omni_identity_libraries")


def clip_vision_files() -> list[str]:
    """safetensors files in ComfyUI's models/clip_vision (the SigLIP pooling head is read from one)."""
    return [f for f in folder_paths.get_filename_list("clip_vision") if f.endswith(".safetensors")]


def model_path(name: str, filename: str) -> str:
    """The file behind a name a loader lists; raises when it is gone."""
    return folder_paths.get_full_path_or_raise(name, filename)


def model_file_path(name: str, filename: str):
    """The file behind a name a loader lists, or None when it is gone."""
    return folder_paths.get_full_path(name, filename)


def onnx_files() -> dict[str, str]:
    """ONNX files under the insightface folders: name relative to its folder -> full path."""
    found = {}
    for root in folder("insightface"):
        for dirpath, _, names in os.walk(root, followlinks=True):
            for name in names:
                if name.endswith(".onnx"):
                    full = os.path.join(dirpath, name)
                    found.setdefault(os.path.relpath(full, root).replace(os.sep, "/"), full)
    return dict(sorted(found.items()))


def safe_name(name: str, what: str) -> str:
    """A relative name the user typed, checked: no '..', no absolute path, plain characters."""
    cleaned = name.strip().strip("/")
    if not cleaned or ".." in cleaned.split("/") or not re.fullmatch(r"[A-Za-z0-9_./ -]+", cleaned):
        raise ValueError(f"{what} {name!r}: use letters, digits, '_', '-', '.', '/' (no '..')")
    return cleaned


def next_free_path(folder_path: str, prefix: str, what: str = "filename_prefix") -> str:
    """``folder_path/<prefix>_NNNNN.safetensors`` with the first counter not taken."""
    base = os.path.join(folder_path, safe_name(prefix, what))
    os.makedirs(os.path.dirname(base), exist_ok=True)
    counter = 1
    while os.path.exists(f"{base}_{counter:05d}.safetensors"):
        counter += 1
    return f"{base}_{counter:05d}.safetensors"


def save_model_file(folder_name: str, prefix: str, write) -> str:
    """Write a file into models/<folder_name>/ with ``write(path)``; its name as the loaders list it."""
    root = folder(folder_name)[0]
    path = next_free_path(root, prefix)
    write(path)
    return os.path.relpath(path, root).replace(os.sep, "/")


def save_output_file(prefix: str, write) -> tuple[str, str]:
    """Write a file into output/ with ``write(path)``; (subfolder, filename) as ComfyUI reports outputs."""
    root = folder_paths.get_output_directory()
    path = next_free_path(root, prefix)
    write(path)
    relative = os.path.relpath(path, root).replace(os.sep, "/")
    subfolder, _, filename = relative.rpartition("/")
    return subfolder, filename


def output_path(*parts: str) -> str:
    return os.path.join(folder_paths.get_output_directory(), *parts)


def run_checkpoint(run_name: str, stage: str) -> str:
    """output/omni_identity_training/<run_name>.<stage>.pt: where a training run keeps its checkpoint."""
    return output_path(RUNS_SUBFOLDER, f"{safe_name(run_name, 'run_name')}.{stage}.pt")


def dataset_folders() -> dict[str, str]:
    """'input/<name>' and 'output/omni_identity_datasets/<name>' -> path, for folders of identity folders."""
    found = {}
    roots = (("input", folder_paths.get_input_directory()), (f"output/{DATASETS_SUBFOLDER}",
                                                             output_path(DATASETS_SUBFOLDER)))
    for label, root in roots:
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if os.path.isdir(path) and any(os.path.isdir(os.path.join(path, sub)) for sub in os.listdir(path)):
                found[f"{label}/{name}"] = path
    return found


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


def annotated_path(name: str) -> str:
    """The file behind a name from ``embeds_files`` (input/, or output/ when marked)."""
    return folder_paths.get_annotated_filepath(name)
