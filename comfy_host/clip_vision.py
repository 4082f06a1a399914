"""ComfyUI's CLIP_VISION with one image layout, for every part of the pack that reads CLIP.

Images are ComfyUI IMAGE tensors (B, H, W, 3) in [0, 1]. How a photo that is not square
reaches the encoder's input size is the crop mode:
- ``center``: the shorter side to the input size, the centre cropped (CLIP's own
  preprocessing, h94's CLIPImageProcessor, IPAdapter_plus; an aligned square face crop is
  simply resized);
- ``squash``: the whole photo resized to a square (SigLIP's processor, InstantX's adapter);
- ``pad``: the photo padded to a square with black, then resized (IPAdapter_plus's "pad").
The unconditional image of IP-Adapter projections is one of ``UNCONDITIONAL``:
- ``h94``: CLIP's input of zeros after normalisation (CLIP's mean colour) for the tokens, and a
  zero pooled embedding (what h94's IP-Adapter code feeds its projections);
- ``black``: a black image for both (IPAdapter_plus's default negative image; XLabs').
CLIP is frozen everywhere in the pack: nothing here carries gradients.
"""
from __future__ import annotations

import os
import uuid
import weakref
from typing import Optional

import comfy.model_management as mm
import torch
import torch.nn.functional as F
from safetensors import safe_open

from ..encoders.checkpoint import CheckpointError
from ..encoders.clip_features import TokenCache, image_digest
from ..encoders.siglip_head import find_head_prefix, head_from_state

TOKEN_CACHE_PHOTOS = 512       # per-photo CLIP tokens kept (about 1.3 MB each for CLIP-H): ~0.7 GB at most
PHOTOS_PER_CALL = 4            # photos per CLIP forward; Cancel is honoured between calls
TOKEN_CACHE = TokenCache(capacity=TOKEN_CACHE_PHOTOS)
CROP_MODES = ("center", "squash", "pad")
UNCONDITIONAL = ("h94", "black")
_KEYS: "weakref.WeakKeyDictionary[object, str]" = weakref.WeakKeyDictionary()

_UNCOND: dict = {}             # (model key, mode) -> unconditional (tokens, pooled); a few entries per model


def _forget(key: str) -> None:
    TOKEN_CACHE.forget(key)
    for cached in [cached for cached in _UNCOND if cached[0].startswith(key)]:
        _UNCOND.pop(cached, None)


_HEADS: dict = {}              # (path, size, mtime, heads) -> SigLIP pooling head


def load_siglip_head(path: str, heads: int = 16):
    """SigLIP's pooling head from a checkpoint in models/clip_vision (only its head.* tensors are read)."""
    stat = os.stat(path)
    key = (path, stat.st_size, stat.st_mtime, heads)
    if key not in _HEADS:
        with safe_open(path, framework="pt", device="cpu") as f:
            prefix = find_head_prefix(f.keys())
            if prefix is None:
                raise CheckpointError(
                    f"{path} has no SigLIP pooling head (head.probe, head.attention.*, head.mlp.*): InstantX's "
                    "adapter reads SigLIP's pooled output; use a SigLIP file that keeps its head, such as "
                    "google/siglip-so400m-patch14-384's model.safetensors")
            state = {k: f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}
        try:
            _HEADS.clear()
            _HEADS[key] = head_from_state(state, heads)
        except KeyError as exc:
            raise CheckpointError(f"{path}: {exc}") from exc
    return _HEADS[key]


def pad_to_square(images: torch.Tensor) -> torch.Tensor:
    """(B, H, W, C) padded with black, centred, to (B, S, S, C) with S = max(H, W)."""
    h, w = images.shape[1:3]
    if h == w:
        return images
    size = max(h, w)
    top, left = (size - h) // 2, (size - w) // 2
    return F.pad(images, (0, 0, left, size - w - left, top, size - h - top))


class ClipVision:
    def __init__(self, clip_vision, head=None):
        """``head``: SigLIP's pooling head (``encoders.siglip_head``), for SigLIP's pooled output."""
        if not callable(getattr(clip_vision, "encode_image", None)):
            raise TypeError(f"clip_vision must come from ComfyUI's 'Load CLIP Vision', not a "
                            f"{type(clip_vision).__name__}")
        self.clip_vision = clip_vision
        self.head = head

    @property
    def key(self) -> str:
        """A stable id per loaded CLIP vision model, for the token cache."""
        key = _KEYS.get(self.clip_vision)
        if key is None:
            key = _KEYS[self.clip_vision] = uuid.uuid4().hex
            # a model ComfyUI unloads and loads again is a new object with a new key: its old
            # tokens can never be asked for again, so they go with the object
            weakref.finalize(self.clip_vision, _forget, key)
        return key

    @property
    def size(self) -> int:
        return int(getattr(self.clip_vision, "image_size", 224))

    @property
    def is_siglip(self) -> bool:
        vision = getattr(getattr(self.clip_vision, "model", None), "vision_model", None)
        return bool(getattr(vision, "output_layernorm", False))

    @property
    def heads(self) -> int:
        vision = getattr(getattr(self.clip_vision, "model", None), "vision_model", None)
        try:
            return int(vision.encoder.layers[0].self_attn.heads)
        except (AttributeError, IndexError, TypeError):
            return 16

    def describe(self, pooled_dim: Optional[int] = None, tokens: Optional[torch.Tensor] = None) -> str:
        kind = "SigLIP" if self.is_siglip else "CLIP"
        shape = f", tokens {tokens.shape[-2]} x {tokens.shape[-1]}" if tokens is not None else ""
        pooled = f", pooled {pooled_dim}" if pooled_dim else (", no pooled output" if self.is_siglip else "")
        return f"{kind} vision model at {self.size} px{shape}{pooled}"

    # -- encoding -------------------------------------------------------------------------
    def _encode(self, images: torch.Tensor, crop: str = "center") -> dict:
        if crop not in CROP_MODES:
            raise ValueError(f"crop must be one of {CROP_MODES}, not {crop!r}")
        images = images[..., :3]
        if crop == "pad":
            images = pad_to_square(images)
        parts = []                        # a few photos per forward, Cancel checked between them
        for start in range(0, images.shape[0], PHOTOS_PER_CALL):
            mm.throw_exception_if_processing_interrupted()
            with torch.no_grad():
                parts.append(self.clip_vision.encode_image(images[start:start + PHOTOS_PER_CALL],
                                                           crop=crop != "squash"))
        # ComfyUI returns an attribute bag (comfy.clip_vision.Output), not a dict
        parts = [part if isinstance(part, dict) else vars(part) for part in parts]
        return {key: torch.cat([part[key] for part in parts]) for key, value in parts[0].items()
                if torch.is_tensor(value)}

    def _encode_pixels(self, pixel_values: torch.Tensor) -> dict:
        """Outputs for normalised pixel values given directly (no resizing or rounding)."""
        cv = self.clip_vision
        mm.load_model_gpu(cv.patcher)
        siglip = bool(getattr(cv, "return_all_hidden_states", False))
        with torch.no_grad():
            out = cv.model(pixel_values=pixel_values.to(cv.load_device).float(),
                           intermediate_output="all" if siglip else -2)
        hidden = out[1][:, -2] if siglip else out[1]
        return {"last_hidden_state": out[0], "image_embeds": out[2], "penultimate_hidden_states": hidden}

    def _pooled(self, outputs: dict) -> Optional[torch.Tensor]:
        if not self.is_siglip:
            return outputs["image_embeds"].float().cpu()
        if self.head is None:
            return None
        return self.head(outputs["last_hidden_state"].float().cpu())

    def tokens(self, images: torch.Tensor, crop: str = "center") -> torch.Tensor:
        """Penultimate hidden states (B, 1 + patches, width), float32 on the CPU."""
        return self._encode(images, crop)["penultimate_hidden_states"].float().cpu()

    def last_tokens(self, images: torch.Tensor, crop: str = "center") -> torch.Tensor:
        """Last hidden states (B, 1 + patches, width), float32 on the CPU (Infinite-ID's CLIP features)."""
        return self._encode(images, crop)["last_hidden_state"].float().cpu()

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings (B, D), float32 on the CPU."""
        return self._encode(images)["image_embeds"].float().cpu()

    def cached_tokens(self, images: torch.Tensor, crop: str = "center",
                      layer: str = "penultimate") -> tuple[torch.Tensor, int]:
        """Tokens of the photos (the penultimate or the last layer's); photos seen before with this CLIP are
        not re-encoded. Returns (tokens, number of photos encoded now)."""
        encode = self.tokens if layer == "penultimate" else self.last_tokens
        key = self._cache_key(crop) + ("" if layer == "penultimate" else f":{layer}")
        return TOKEN_CACHE.encode(images, lambda x: encode(x, crop), key)

    def cached_features(self, images: torch.Tensor, crop: str = "center"
                        ) -> tuple[torch.Tensor, Optional[torch.Tensor], int]:
        """(tokens, pooled embeddings or None, photos encoded now), one encoder pass per new photo.
        Pooled embeddings are None for SigLIP without its pooling head."""
        pooling = not self.is_siglip or self.head is not None
        digests = [image_digest(image) for image in images]
        token_key, pooled_key = self._cache_key(crop), self._cache_key(crop) + ":pooled"
        fresh: dict[int, tuple] = {}

        def encode(indices: list[int]):
            missing = [i for i in indices if i not in fresh]
            if missing:
                outputs = self._encode(images[missing], crop)
                pooled = self._pooled(outputs)
                for j, i in enumerate(missing):
                    fresh[i] = (outputs["penultimate_hidden_states"][j].float().cpu(),
                                None if pooled is None else pooled[j])
            return indices

        def part(slot: int):
            return lambda indices: torch.stack([fresh[i][slot] for i in encode(indices)])

        tokens, count = TOKEN_CACHE.lookup([(token_key, d) for d in digests], part(0))
        pooled = TOKEN_CACHE.lookup([(pooled_key, d) for d in digests], part(1))[0] if pooling else None
        return tokens, pooled, count

    def _cache_key(self, crop: str) -> str:
        return f"{self.key}:{crop}" + (f":head{id(self.head)}" if self.head is not None else "")

    def unconditional(self, mode: str = "h94") -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(tokens (1, T, C), pooled (1, P) or None) of the unconditional image of ``mode``."""
        if mode not in UNCONDITIONAL:
            raise ValueError(f"unconditional must be one of {UNCONDITIONAL}, not {mode!r}")
        key = (self._cache_key("uncond"), mode)
        if key not in _UNCOND:
            if mode == "h94":      # zeros after normalisation, given to the model directly
                outputs = self._encode_pixels(torch.zeros(1, 3, self.size, self.size))
                pooled = self._pooled(outputs)
                pooled = None if pooled is None else torch.zeros_like(pooled)
            else:
                outputs = self._encode(torch.zeros(1, self.size, self.size, 3))
                pooled = self._pooled(outputs)
            if len(_UNCOND) >= 16:
                _UNCOND.pop(next(iter(_UNCOND)))
            _UNCOND[key] = (outputs["penultimate_hidden_states"].float().cpu(), pooled)
        return _UNCOND[key]

    def uncond_tokens(self) -> torch.Tensor:
        """Tokens (1, T, C) of CLIP's input of zeros after normalisation (CLIP's mean colour): the
        unconditional input h94's IP-Adapter projections were trained with."""
        return self.unconditional("h94")[0]
