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


def _registered_name(model_name: str) -> str:
    """An open_clip model name; a config .json is registered under its file stem first."""
    if model_name.endswith(".json"):
        import open_clip
        from pathlib import Path
        open_clip.add_model_config(model_name)
        return Path(model_name).stem
    return model_name


def create_open_clip(model_name: str, checkpoint: Optional[str] = None, device="cpu"):
    import open_clip
    return open_clip.create_model(_registered_name(model_name), pretrained=checkpoint, device=device)


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
        self.width = self.visual.transformer.width

    @classmethod
    def load(cls, model_name: str = "ViT-H-14", checkpoint: Optional[str] = None, device="cpu") -> "OpenCLIPTokens":
        """An open_clip model from a local checkpoint file (nothing is downloaded; without a checkpoint
        the weights are random). ``model_name``: an open_clip model name, or a model config .json."""
        return cls(create_open_clip(model_name, checkpoint, device), device)

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
    """LRU cache of per-photo CLIP features, with a bound on the number of photos kept.

    Keys name a photo for one CLIP model: (CLIP model id, photo digest) for images in memory,
    (token function id, file path) for training photos on disk. When more than ``capacity``
    photos are held, the least recently used are dropped (and recomputed if asked again).
    """

    def __init__(self, capacity: int = 256):
        self.capacity = capacity
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()

    def forget(self, model_key: str) -> None:
        """Drop every photo held for one model (its keys' first part starts with ``model_key``)."""
        for key in [key for key in self._items if str(key[0]).startswith(model_key)]:
            self._items.pop(key, None)

    def lookup(self, keys: list[tuple], compute: Callable[[list[int]], torch.Tensor]) -> tuple[torch.Tensor, int]:
        """Features (N, ...) for ``keys``; ``compute(indices)`` makes those of the keys not held.

        Returns (features, number computed now)."""
        missing = [i for i, key in enumerate(keys) if key not in self._items]
        if missing:
            for i, tokens in zip(missing, compute(missing).detach().to("cpu")):
                self._items[keys[i]] = tokens
        result = []
        for key in keys:
            self._items.move_to_end(key)
            result.append(self._items[key])
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)
        return torch.stack(result), len(missing)

    def encode(self, images: torch.Tensor, encode: Callable[[torch.Tensor], torch.Tensor],
               model_key: str) -> tuple[torch.Tensor, int]:
        """Tokens (N, T, C) for ``images`` (N, H, W, 3); only photos not seen before are encoded.

        Returns (tokens, number of photos encoded now).
        """
        keys = [(model_key, image_digest(img)) for img in images]
        return self.lookup(keys, lambda missing: encode(images[missing]))


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
        model = create_open_clip(model_name, checkpoint, device)
        return cls(model, open_clip.get_tokenizer(_registered_name(model_name)), device)

    @torch.no_grad()
    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        x = clip_preprocess(images.to(self.device), self.size, self.mean, self.std)
        return self.model.encode_image(x).float().cpu()

    @torch.no_grad()
    def text_embeds(self, texts: list[str]) -> torch.Tensor:
        return self.model.encode_text(self.tokenizer(texts).to(self.device)).float().cpu()
