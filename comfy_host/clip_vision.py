"""ComfyUI's CLIP_VISION with one image layout, for every part of the pack that reads CLIP.

Images are ComfyUI IMAGE tensors (B, H, W, 3) in [0, 1]; CLIP's own preprocessing resizes
the shorter side to its input size and crops the centre (a square face crop is simply
resized). CLIP is frozen everywhere in the pack: nothing here carries gradients.
"""
from __future__ import annotations

import uuid
import weakref

import comfy.model_management as mm
import torch

from ..encoders.clip_features import OPENAI_MEAN, TokenCache

TOKEN_CACHE_PHOTOS = 512       # per-photo CLIP tokens kept (about 1.3 MB each for CLIP-H): ~0.7 GB at most
PHOTOS_PER_CALL = 4            # photos per CLIP forward; Cancel is honoured between calls
TOKEN_CACHE = TokenCache(capacity=TOKEN_CACHE_PHOTOS)
_KEYS: "weakref.WeakKeyDictionary[object, str]" = weakref.WeakKeyDictionary()


class ClipVision:
    def __init__(self, clip_vision):
        if not callable(getattr(clip_vision, "encode_image", None)):
            raise TypeError(f"clip_vision must come from ComfyUI's 'Load CLIP Vision', not a "
                            f"{type(clip_vision).__name__}")
        self.clip_vision = clip_vision

    @property
    def key(self) -> str:
        """A stable id per loaded CLIP vision model, for the token cache."""
        key = _KEYS.get(self.clip_vision)
        if key is None:
            key = _KEYS[self.clip_vision] = uuid.uuid4().hex
        return key

    @property
    def size(self) -> int:
        return int(getattr(self.clip_vision, "image_size", 224))

    def _encode(self, images: torch.Tensor) -> dict:
        """CLIP's outputs for the batch, a few photos per forward with a Cancel check between them."""
        parts = []
        for start in range(0, images.shape[0], PHOTOS_PER_CALL):
            mm.throw_exception_if_processing_interrupted()
            with torch.no_grad():
                parts.append(self.clip_vision.encode_image(images[start:start + PHOTOS_PER_CALL, ..., :3], crop=True))
        if len(parts) == 1:
            return parts[0]
        return {key: torch.cat([part[key] for part in parts]) for key in ("penultimate_hidden_states",
                                                                          "last_hidden_state", "image_embeds")}

    def tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Penultimate hidden states (B, 1 + patches, width), float32 on the CPU."""
        return self._encode(images)["penultimate_hidden_states"].float().cpu()

    def last_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """Last hidden states (B, 1 + patches, width), float32 on the CPU (Infinite-ID's CLIP features)."""
        return self._encode(images)["last_hidden_state"].float().cpu()

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """Projected image embeddings (B, D), float32 on the CPU."""
        return self._encode(images)["image_embeds"].float().cpu()

    def cached_tokens(self, images: torch.Tensor, layer: str = "penultimate") -> tuple[torch.Tensor, int]:
        """Tokens of the photos (the penultimate or the last layer's); photos seen before with this CLIP are
        not re-encoded. Returns (tokens, number of photos encoded now)."""
        encode = self.tokens if layer == "penultimate" else self.last_tokens
        return TOKEN_CACHE.encode(images, encode, f"{self.key}:{layer}")

    def uncond_tokens(self) -> torch.Tensor:
        """Tokens (1, T, C) of an image of CLIP's mean colour (zero after normalisation): the
        unconditional input IP-Adapter projections were trained with."""
        mean = torch.tensor(getattr(self.clip_vision, "image_mean", OPENAI_MEAN), dtype=torch.float32)
        return self.cached_tokens(mean.expand(1, self.size, self.size, 3).contiguous())[0]
