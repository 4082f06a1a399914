"""Encoder checkpoints: safetensors with the architecture config in the metadata.

Metadata key ``omni_identity`` holds JSON: {"format": "omni_identity.encoder",
"version": 1, "config": {...EncoderConfig...}, ...extra}. Loading checks the format,
the config, and every tensor name and shape against the architecture, and names the
file and the problem when anything is off.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .omni_id import EncoderConfig, IdentityEncoder

METADATA_KEY = "omni_identity"
ENCODER_FORMAT = "omni_identity.encoder"
ENCODER_VERSION = 1


class CheckpointError(ValueError):
    """A model file that cannot be used; the message names the file and the reason."""


def atomic_save(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """Write a safetensors file next to ``path`` and rename it into place."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    tmp = os.path.join(folder, f".{os.path.basename(path)}.{os.getpid()}.tmp")
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def float32_copies(tensors: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """Float32 CPU copies of ``tensors`` to write (keys prefixed), leaving the module they belong to as it is."""
    return {prefix + k: v.detach().float().cpu().contiguous() for k, v in tensors.items()}


def save_encoder(encoder: IdentityEncoder, path: str, extra: Optional[dict] = None) -> None:
    """Float32 copies of the encoder's tensors are written; the encoder itself is left as it is."""
    info = {"format": ENCODER_FORMAT, "version": ENCODER_VERSION, "config": encoder.config.to_dict(), **(extra or {})}
    atomic_save(float32_copies(encoder.state_dict()), path, {METADATA_KEY: json.dumps(info)})


def _looks_like(keys: list[str]) -> str:
    hints = (
        (("image_proj.", "ip_adapter."), "an IP-Adapter file (it belongs in models/ipadapter)"),
        (("model.diffusion_model.",), "a Stable Diffusion checkpoint (models/checkpoints)"),
        (("vision_model.", "visual."), "a CLIP vision model (models/clip_vision)"),
        (("input_hint_block.", "controlnet_"), "a ControlNet (models/controlnet)"),
    )
    for prefixes, what in hints:
        if any(k.startswith(prefixes) for k in keys):
            return f"; it looks like {what}"
    return ""


def read_safetensors(path: str, kind: str) -> tuple[dict, dict[str, torch.Tensor]]:
    """(metadata, tensors) of a safetensors file, or a CheckpointError saying why not."""
    if not os.path.isfile(path):
        raise CheckpointError(f"{kind} file not found: {path}")
    try:
        with safe_open(path, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:
        size = os.path.getsize(path)
        raise CheckpointError(
            f"{kind} file {path} ({size} bytes) is not a readable safetensors file: {exc}. "
            "It may be truncated (an interrupted download or copy) or another format; "
            "pickled .ckpt/.pt files are not loaded.") from exc
    return metadata, tensors


def read_info(path: str, metadata: dict, keys: list[str], kind: str, expected_format: str) -> dict:
    raw = metadata.get(METADATA_KEY)
    if raw is None:
        raise CheckpointError(f"{path} is not an OmniIdentity {kind}: its metadata has no "
                              f"'{METADATA_KEY}' config{_looks_like(keys)}")
    try:
        info = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: the '{METADATA_KEY}' metadata is not valid JSON ({exc})") from exc
    if info.get("format") != expected_format:
        raise CheckpointError(f"{path} holds a {info.get('format')!r}, not an OmniIdentity {kind} ({expected_format!r})")
    return info


def load_encoder(path: str) -> IdentityEncoder:
    """Load an encoder checkpoint on the CPU, checking it completely."""
    metadata, tensors = read_safetensors(path, "encoder")
    info = read_info(path, metadata, list(tensors), "encoder", ENCODER_FORMAT)
    if info.get("version", 0) > ENCODER_VERSION:
        raise CheckpointError(f"{path} is encoder format version {info['version']}; this pack reads up to "
                              f"{ENCODER_VERSION}: update ComfyUI-OmniIdentity")
    try:
        config = EncoderConfig.from_dict(info.get("config", {}))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"{path}: invalid encoder config: {exc}") from exc
    with torch.device("meta"):
        skeleton = IdentityEncoder(config)
    expected = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in tensors.items()}
    problems = []
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        problems.append(f"unexpected tensors {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    wrong = [f"{k}: {found[k]} != {expected[k]}" for k in sorted(set(expected) & set(found)) if found[k] != expected[k]]
    if wrong:
        problems.append(f"shape mismatches {wrong[:3]}{' ...' if len(wrong) > 3 else ''}")
    if problems:
        raise CheckpointError(f"{path} does not match its {config.architecture} config: " + "; ".join(problems))
    skeleton.load_state_dict(tensors, strict=True, assign=True)
    return skeleton.eval()
