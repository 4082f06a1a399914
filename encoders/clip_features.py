"""CLIP image tokens for the identity encoders, and a cache so unchanged photos are not re-encoded.

The encoders read CLIP's penultimate hidden states (all 257 tokens at 224 px, class
token first), the features IP-Adapter Plus/Full use. Inside ComfyUI they come from
ComfyUI's CLIP_VISION (the nodes adapt it); outside ComfyUI, ``OpenCLIPTokens`` runs
an open_clip model (CLIP-H: ``ViT-H-14`` with the laion2b_s32b_b79k weights).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict
from typing import Callable, Optional

import torch
import torch.nn.functional as F

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def clip_preprocess(images: torch.Tensor, size: int = 224, mean=OPENAI_MEAN, std=OPENAI_STD) -> torch.Tensor:
    """(B, H, W, 3) in [0, 1] -> normalised (B, 3, size, size): shorter side to size, centre crop."""
    x = images[..., :3].permute(0, 3, 1, 2).float()
    height, width = x.shape[-2:]
    scale = size / min(height, width)
    new_h, new_w = max(size, round(height * scale)), max(size, round(width * scale))
    x = F.interpolate(x, size=(new_h, new_w), mode="bicubic", antialias=True, align_corners=False)
    top, left = (new_h - size) // 2, (new_w - size) // 2
    x = x[..., top:top + size, left:left + size].clamp(0.0, 1.0)
    mean_t = torch.tensor(mean, dtype=x.dtype, device=x.device)[:, None, None]
    std_t = torch.tensor(std, dtype=x.dtype, device=x.device)[:, None, None]
    return (x - mean_t) / std_t


class OpenCLIPTokens:
    """Penultimate-layer tokens (B, 1 + patches, width) of an open_clip vision tower."""

    def __init__(self, model, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.visual = model.visual
        self.device = torch.device(device)
        cfg = getattr(self.visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(cfg.get("mean", OPENAI_MEAN))
        self.std = tuple(cfg.get("std", OPENAI_STD))
        size = getattr(self.visual, "image_size", 224)
        self.size = size[0] if isinstance(size, (tuple, list)) else int(size)
        self.depth = len(self.visual.transformer.resblocks)

    @classmethod
    def load(cls, model_name: str = "ViT-H-14", checkpoint: Optional[str] = None, device="cpu") -> "OpenCLIPTokens":
        """An open_clip model from a local checkpoint file (nothing is downloaded)."""
        import open_clip
        model = open_clip.create_model(model_name, pretrained=checkpoint, device=device)
        return cls(model, device)

    @torch.no_grad()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = clip_preprocess(images.to(self.device), self.size, self.mean, self.std)
        out = self.visual.forward_intermediates(x, indices=[self.depth - 2], stop_early=True,
                                                intermediates_only=True, output_fmt="NLC",
                                                output_extra_tokens=True)
        return torch.cat([out["image_intermediates_prefix"][0], out["image_intermediates"][0]], dim=1)


def image_digest(image: torch.Tensor) -> str:
    data = image.detach().to("cpu", torch.float32).contiguous()
    return hashlib.sha1(str(tuple(data.shape)).encode() + data.numpy().tobytes()).hexdigest()


class TokenCache:
    """LRU cache of per-photo CLIP tokens, keyed by (CLIP model id, photo digest)."""

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._items: OrderedDict[tuple[str, str], torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()

    def encode(self, images: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor],
               model_key: str) -> tuple[torch.Tensor, int]:
        """Tokens (N, T, C) for ``images`` (N, H, W, 3); only photos not seen before are encoded.

        Returns (tokens, number of photos encoded now).
        """
        keys = [(model_key, image_digest(img)) for img in images]
        missing = [i for i, key in enumerate(keys) if key not in self._items]
        if missing:
            fresh = encode(images[missing]).detach().to("cpu")
            for i, tokens in zip(missing, fresh):
                self._items[keys[i]] = tokens
        result = []
        for key in keys:
            self._items.move_to_end(key)
            result.append(self._items[key])
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return torch.stack(result), len(missing)


class OpenCLIPScorer:
    """Projected image and text embeddings of an open_clip model, for CLIP-T and CLIP-I."""

    def __init__(self, model, tokenizer, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        cfg = getattr(model.visual, "preprocess_cfg", {}) or {}
        self.mean = tuple(cfg.get("mean", OPENAI_MEAN))
        self.std = tuple(cfg.get("std", OPENAI_STD))
        size = getattr(model.visual, "image_size", 224)
        self.size = size[0] if isinstance(size, (tuple, list)) else int(size)

    @classmethod
    def load(cls, model_name: str, checkpoint: Optional[str] = None, device="cpu") -> "OpenCLIPScorer":
        import open_clip
        model = open_clip.create_model(model_name, pretrained=checkpoint, device=device)
        return cls(model, open_clip.get_tokenizer(model_name), device)

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        x = clip_preprocess(images.to(self.device), self.size, self.mean, self.std)
        return self.model.encode_image(x).float().cpu()

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device)).float().cpu()
