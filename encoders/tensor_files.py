"""Reading a published weights file as plain tensors: safetensors, or a ``.pth``/``.bin`` through
``torch.load(weights_only=True)``, which refuses pickled objects other than tensors."""
from __future__ import annotations

from typing import Optional

import torch


def file_name(path: str, name: Optional[str] = None) -> str:
    """The name errors call a file by: ``name``, else the path's last part."""
    return name or path.replace("\\", "/").rsplit("/", 1)[-1]


def read_tensors(path: str, name: str, error: type[Exception]):
    """What ``path`` holds, read as tensors only; ``error`` (with the file's name) where it cannot be."""
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file as read
            return read(path)
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:          # damaged, or a pickle holding more than tensors
        raise error(f"'{name}' cannot be read as tensors (pickled objects are refused): {exc}") from exc
