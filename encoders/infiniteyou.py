"""InfiniteYou (Jiang et al., ByteDance, 2025): the image projection that turns an ArcFace embedding into the
identity tokens InfuseNet reads, in the published file's layout (``image_proj_model.bin``: a Resampler
under ``image_proj``), and the five-keypoint control image.

The authors' pipeline: the largest face's ArcFace embedding (512) goes through the Resampler (8 learned
queries x 1280, 4 layers of perceiver attention with 20 heads of 64, feed-forward x4, projection to 4096
and a LayerNorm): 8 identity tokens of width 4096, FLUX's text width. InfuseNet (a FLUX ControlNet in
diffusers' layout) reads them in place of the text tokens; ComfyUI runs it (comfy_host.infiniteyou).

Pure torch / numpy.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch
from torch import nn

from .face.types import NoFaceFoundError
from .perceiver import feed_forward
from .tensor_files import file_name, read_tensors

PROJ_KEY = "image_proj"
COMBINE_MODES = ("embeddings", "tokens")     # several photos: average the embeddings, or the tokens
HEAD_WIDTH = 64                              # the published Resampler's channels per head
# the authors' keypoint colours (eyes, nose, mouth corners) and limbs (each keypoint to the nose)
KEYPOINT_COLORS = ((255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255))
LIMBS = ((0, 2), (1, 2), (3, 2), (4, 2))
LIMB_HALF_WIDTH = 4
KEYPOINT_RADIUS = 10
LIMB_SHADE = 0.6


class InfiniteYouFileError(ValueError):
    """The file is not InfiniteYou's image projection (or a damaged one); the message says what is wrong."""


@dataclass(frozen=True)
class ResamplerConfig:
    dim: int = 1280
    depth: int = 4
    heads: int = 20
    dim_head: int = 64
    num_queries: int = 8
    embedding_dim: int = 512
    output_dim: int = 4096
    ff_mult: int = 4

    def describe(self) -> str:
        return (f"Resampler {self.depth} layers x {self.dim}: ArcFace {self.embedding_dim} -> "
                f"{self.num_queries} tokens x {self.output_dim}")


class PerceiverAttention(nn.Module):
    """The latents attend to [inputs; latents]; q and k each scaled by d^-1/4 (stable in half precision)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        x, latents = self.norm1(x), self.norm2(latents)
        b, length, _ = latents.shape
        k, v = self.to_kv(torch.cat((x, latents), dim=-2)).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], self.heads, -1).transpose(1, 2) for t in (self.to_q(latents), k, v))
        scale = q.shape[-1] ** -0.25
        weight = (q * scale) @ (k * scale).transpose(-2, -1)
        weight = torch.softmax(weight.float(), dim=-1).to(weight.dtype)
        return self.to_out((weight @ v).permute(0, 2, 1, 3).reshape(b, length, -1))


class Resampler(nn.Module):
    """InfiniteYou's image projection: learned queries refined by perceiver attention over the projected
    embedding; parameter names are the published ``image_proj`` ones."""

    def __init__(self, config: ResamplerConfig = ResamplerConfig()):
        super().__init__()
        c = self.config = config
        self.latents = nn.Parameter(torch.randn(1, c.num_queries, c.dim) / c.dim ** 0.5)
        self.proj_in = nn.Linear(c.embedding_dim, c.dim)
        self.proj_out = nn.Linear(c.dim, c.output_dim)
        self.norm_out = nn.LayerNorm(c.output_dim)
        self.layers = nn.ModuleList(
            nn.ModuleList([PerceiverAttention(c.dim, c.heads, c.dim_head), feed_forward(c.dim, c.ff_mult)])
            for _ in range(c.depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, embedding_dim) -> (B, num_queries, output_dim)."""
        latents = self.latents.repeat(x.shape[0], 1, 1)
        x = self.proj_in(x)
        for attention, ff in self.layers:
            latents = attention(x, latents) + latents
            latents = ff(latents) + latents
        return self.norm_out(self.proj_out(latents))

    def describe(self) -> str:
        return f"InfiniteYou image projection: {self.config.describe()}"

    def models(self) -> list:
        return [self]


def identity_tokens(model: Resampler, arcface: torch.Tensor, combine: str = "embeddings") -> torch.Tensor:
    """(1, num_queries, output_dim) identity tokens of N photos of one person from their ArcFace embeddings
    (N, 512), as the authors feed one: ``(1, 1, 512)`` through the Resampler. Several photos: ``embeddings``
    averages the embeddings first, ``tokens`` averages each photo's tokens."""
    if arcface.ndim != 2 or arcface.shape[-1] != model.config.embedding_dim:
        raise ValueError(f"ArcFace embeddings must be (N, {model.config.embedding_dim}), not {tuple(arcface.shape)}")
    p = next(model.parameters())
    arcface = arcface.to(p.device, p.dtype)
    with torch.no_grad():
        if combine == "embeddings":
            return model(arcface.mean(dim=0, keepdim=True)[:, None])
        if combine == "tokens":
            return model(arcface[:, None]).mean(dim=0, keepdim=True)
    raise ValueError(f"combine must be one of {COMBINE_MODES}, not {combine!r}")


def arcface_embeddings(images: torch.Tensor, analyzer, recognizer: Optional[nn.Module] = None,
                       name: str = "face analysis"):
    """(embeddings (N, 512) L2-normalised, kept photo indices, skipped indices) of each photo's largest face:
    from ``recognizer`` (facexlib's IR-SE50, on the face aligned as the authors align it) when given, else the
    face analysis' own ArcFace embedding."""
    from .arcface_ir_se import aligned_faces
    from .face.crop import to_uint8
    embeddings, kept, skipped = [], [], []
    for index, photo in enumerate(images):
        faces = analyzer.detect(to_uint8(photo[..., :3]), with_embedding=recognizer is None)
        if not faces:
            skipped.append(index)
            continue
        face = max(faces, key=lambda f: f.area)
        if recognizer is not None:
            p = next(recognizer.parameters())
            with torch.no_grad():
                embedding = recognizer(aligned_faces(photo, [face.keypoints5]).to(p.device, p.dtype))[0]
            embeddings.append(embedding.float().cpu())
        elif face.embedding is None or face.embedding_kind != "arcface512":
            raise InfiniteYouFileError(f"InfiniteYou needs ArcFace embeddings, but {name} gives "
                                       f"{face.embedding_kind or 'none'}: load facexlib's ArcFace in InfiniteYou Loader, "
                                       "or an insightface pack (antelopev2), or the dlib backend with antelopev2's "
                                       "glintr100.onnx, in Face Analysis Loader")
        else:
            embeddings.append(torch.from_numpy(np.asarray(face.embedding, dtype=np.float32)))
        kept.append(index)
    if not kept:
        raise NoFaceFoundError(f"{name} found no face in any of the {len(images)} photo(s) given to InfiniteYou")
    embeds = torch.stack(embeddings)
    return embeds / embeds.norm(dim=-1, keepdim=True), kept, skipped


# -- files -----------------------------------------------------------------------------------
def projection_state(state: dict) -> dict:
    """The Resampler's tensors of a file: the authors' ``{'image_proj': {...}}``, ``image_proj.*`` keys, or bare."""
    if isinstance(state.get(PROJ_KEY), dict):
        return state[PROJ_KEY]
    prefixed = {k[len(PROJ_KEY) + 1:]: v for k, v in state.items() if k.startswith(PROJ_KEY + ".")}
    return prefixed or state


def config_from_state(state: dict) -> ResamplerConfig:
    try:
        latents = state["latents"]
        dim = latents.shape[-1]
        inner = state["layers.0.0.to_q.weight"].shape[0]
        depth = len({k.split(".")[1] for k in state if k.startswith("layers.")})
        return ResamplerConfig(dim=dim, depth=depth, heads=max(1, inner // HEAD_WIDTH),
                               dim_head=inner // max(1, inner // HEAD_WIDTH), num_queries=latents.shape[1],
                               embedding_dim=state["proj_in.weight"].shape[1],
                               output_dim=state["proj_out.weight"].shape[0],
                               ff_mult=state["layers.0.1.1.weight"].shape[0] // dim)
    except (KeyError, IndexError, AttributeError) as exc:
        raise InfiniteYouFileError(f"not InfiniteYou's image projection: missing {exc}") from exc


def load_state(state: dict, name: str = "image_proj_model") -> Resampler:
    """A Resampler holding ``state`` (the published layout); every key must fit, nothing may be left over."""
    state = projection_state(state)
    if not all(torch.is_tensor(v) for v in state.values()) or "latents" not in state:
        sample = ", ".join(sorted(map(str, state))[:4]) or "no tensors"
        raise InfiniteYouFileError(f"'{name}' is not InfiniteYou's image projection (image_proj_model.bin): it has no "
                                   f"image_proj latents / proj_in / layers (keys: {sample}, ...)")
    config = config_from_state(state)
    with torch.device("meta"):
        model = Resampler(config)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(k for k in expected if k in state and tuple(state[k].shape) != tuple(expected[k].shape))
    if missing or unexpected or wrong:
        raise InfiniteYouFileError(f"'{name}' does not have the InfiniteYou image projection layout: missing "
                                   f"{missing[:4]}, unexpected {unexpected[:4]}, wrong shapes {wrong[:4]}")
    dtype = state["latents"].dtype
    model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=True, assign=True)
    return model.eval().requires_grad_(False)


def load_file(path: str, name: Optional[str] = None) -> Resampler:
    """``image_proj_model.bin`` (read with ``torch.load(weights_only=True)``: tensors only) or a safetensors copy."""
    name = file_name(path, name)
    state = read_tensors(path, name, InfiniteYouFileError)
    if not isinstance(state, dict):
        raise InfiniteYouFileError(f"'{name}' holds a {type(state).__name__}, not InfiniteYou's image projection")
    return load_state(state, name)


# -- the five-keypoint control image --------------------------------------------------------------
def _fill(canvas: np.ndarray, inside: np.ndarray, color) -> None:
    canvas[inside] = color


def draw_keypoints(keypoints: np.ndarray, width: int, height: int) -> np.ndarray:
    """The authors' control image: on black, a limb from each eye and mouth corner to the nose (a filled
    ellipse 4 px half-wide in the keypoint's colour at 60%), then a filled disc of radius 10 on each
    keypoint. ``keypoints`` (5, 2) in pixels, insightface's order; returns (height, width, 3) uint8."""
    kps = np.asarray(keypoints, dtype=np.float64).reshape(5, 2)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float64)
    canvas = np.zeros((height, width, 3), dtype=np.float64)
    for a, b in LIMBS:
        x, y = kps[[a, b], 0], kps[[a, b], 1]
        length = math.hypot(x[0] - x[1], y[0] - y[1])
        angle = math.radians(int(math.degrees(math.atan2(y[0] - y[1], x[0] - x[1]))))
        cx, cy = int(np.mean(x)), int(np.mean(y))
        semi_major, semi_minor = max(int(length / 2), 0), LIMB_HALF_WIDTH
        u = (xs - cx) * math.cos(angle) + (ys - cy) * math.sin(angle)
        v = -(xs - cx) * math.sin(angle) + (ys - cy) * math.cos(angle)
        inside = (u / (semi_major + 0.5)) ** 2 + (v / (semi_minor + 0.5)) ** 2 <= 1.0
        _fill(canvas, inside, KEYPOINT_COLORS[a])
    canvas = (canvas * LIMB_SHADE).astype(np.uint8)
    for (x, y), color in zip(kps, KEYPOINT_COLORS):
        inside = (xs - int(x)) ** 2 + (ys - int(y)) ** 2 <= KEYPOINT_RADIUS ** 2
        _fill(canvas, inside, color)
    return canvas


def fit_to_canvas(image: torch.Tensor, width: int, height: int) -> np.ndarray:
    """The authors' ``resize_and_pad_image``: (H, W, 3) in [0, 1] scaled with Lanczos so its width (portrait or
    square canvas) or height (landscape) fills the canvas, centred on white; returns (height, width, 3) uint8."""
    from PIL import Image
    from .face.crop import to_uint8
    source = Image.fromarray(to_uint8(image))
    w, h = source.size
    if width <= height:
        size = (width, int(width * (h / w)))
    else:
        size = (int(height * (w / h)), height)
    canvas = Image.new("RGB", (width, height), (255, 255, 255))
    canvas.paste(source.resize(size, Image.LANCZOS), ((width - size[0]) // 2, (height - size[1]) // 2))
    return np.asarray(canvas)


def control_image(photo: Optional[torch.Tensor], analyzer, width: int, height: int,
                  name: str = "face analysis") -> tuple[torch.Tensor, str]:
    """(1, height, width, 3) control image in [0, 1] and a note: the five keypoints of the largest face in
    ``photo`` (fitted to the canvas as the authors do), or black when no photo is given."""
    if photo is None:
        return torch.zeros(1, height, width, 3), "no control image: black (the authors' default)"
    faces = analyzer.detect(fit_to_canvas(photo[..., :3], width, height))
    if not faces:
        raise NoFaceFoundError(f"{name} found no face in the control image: give one with a face (its five keypoints "
                               "set the pose), or leave control_image unconnected for the authors' black image")
    face = max(faces, key=lambda f: f.area)
    drawn = draw_keypoints(np.asarray(face.keypoints5), width, height)
    return torch.from_numpy(drawn).float()[None] / 255.0, "control image: five keypoints of its largest face"
