"""Face alignment to the ArcFace five-point template, crop warping and face masks.

Template: insightface's ArcFace reference points for a 112 x 112 crop (the layout
every ArcFace, IP-Adapter FaceID and InstantID pipeline aligns to). A crop of
``crop_size`` pixels with ``padding`` p shows the ArcFace 112 square shrunk to
1 / (1 + 2p) of the crop, centred: p = 0 is the tight ArcFace crop, p = 0.25 leaves
a quarter of the ArcFace square free on each side (hair, chin and ears for CLIP).
Pixel centres sit at integer coordinates, in the source and in the crop.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

from .types import DetectedFace

ARCFACE_TEMPLATE_112 = np.array([
    [38.2946, 51.6963],
    [73.5318, 51.5014],
    [56.0252, 71.7366],
    [41.5493, 92.3655],
    [70.7299, 92.2041],
])

MAX_SUPERSAMPLE = 4


def template_points(crop_size: int, padding: float) -> np.ndarray:
    """The five template points for a crop of ``crop_size`` with ``padding``."""
    unit = (ARCFACE_TEMPLATE_112 + 0.5) / 112.0 - 0.5       # centred, in ArcFace squares
    return (unit / (1.0 + 2.0 * padding) + 0.5) * crop_size - 0.5


def estimate_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Least-squares similarity transform (rotation, uniform scale, shift) src -> dst.

    Umeyama's closed form without reflection; returns a (2, 3) matrix.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    mu_s, mu_d = src.mean(0), dst.mean(0)
    sc, dc = src - mu_s, dst - mu_d
    cov = dc.T @ sc / len(src)
    u, sing, vt = np.linalg.svd(cov)
    sign = np.eye(2)
    if np.linalg.det(u) * np.linalg.det(vt) < 0:
        sign[1, 1] = -1.0
    rot = u @ sign @ vt
    var_s = (sc ** 2).sum() / len(src)
    scale = float(np.trace(np.diag(sing) @ sign) / var_s)
    shift = mu_d - scale * rot @ mu_s
    return np.hstack([scale * rot, shift[:, None]])


def transform_points(points: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    points = np.asarray(points, dtype=np.float64)
    return points @ matrix[:, :2].T + matrix[:, 2]


def invert_affine(matrix: np.ndarray) -> np.ndarray:
    full = np.vstack([matrix, [0.0, 0.0, 1.0]])
    return np.linalg.inv(full)[:2]


def matrix_scale(matrix: np.ndarray) -> float:
    return math.sqrt(abs(np.linalg.det(matrix[:, :2])))


def warp_crop(image: torch.Tensor, matrix: np.ndarray, crop_size: int) -> torch.Tensor:
    """Warp ``image`` (H, W, C) with the source->crop ``matrix`` into (S, S, C).

    When the crop shrinks the source, it is rendered at up to 4x and box-filtered
    down, so large photos do not alias (a scale within round-off of 1, 1/2, ... counts as
    that scale: an identity alignment is a copy). Outside the source is black.
    """
    height, width, _ = image.shape
    shrink = 1.0 / max(matrix_scale(matrix), 1e-6)
    factor = int(min(MAX_SUPERSAMPLE, max(1, math.ceil(shrink - 1e-6))))
    size = crop_size * factor
    inverse = invert_affine(matrix)
    coords = (np.arange(size, dtype=np.float64) + 0.5) / factor - 0.5
    gx, gy = np.meshgrid(coords, coords)
    src = np.stack([gx, gy], -1) @ inverse[:, :2].T + inverse[:, 2]
    grid = np.empty_like(src)
    grid[..., 0] = (2.0 * src[..., 0] + 1.0) / width - 1.0
    grid[..., 1] = (2.0 * src[..., 1] + 1.0) / height - 1.0
    grid_t = torch.from_numpy(grid).to(image.device, torch.float32)[None]
    chw = image.permute(2, 0, 1)[None].float()
    out = F.grid_sample(chw, grid_t, mode="bilinear", padding_mode="zeros", align_corners=False)
    if factor > 1:
        out = F.avg_pool2d(out, factor)
    return out[0].permute(1, 2, 0).clamp(0.0, 1.0).to(image.dtype)


def face_outline(face: DetectedFace) -> np.ndarray:
    """A polygon around the face (source pixels): jaw and lifted brows, or an ellipse."""
    kps = np.asarray(face.keypoints5, dtype=np.float64)
    eyes_mid = (kps[0] + kps[1]) / 2.0
    mouth_mid = (kps[3] + kps[4]) / 2.0
    iod = float(np.linalg.norm(kps[1] - kps[0]))
    down = mouth_mid - eyes_mid
    down /= max(np.linalg.norm(down), 1e-6)
    if face.landmark_format == "ibug68":
        lm = np.asarray(face.landmarks, dtype=np.float64)
        brows = lm[17:27] - down * 0.5 * iod
        return _convex_hull(np.vstack([lm[0:17], brows]))
    right = np.array([-down[1], down[0]])
    centre = eyes_mid + down * 0.45 * iod
    angles = np.linspace(0.0, 2.0 * np.pi, 48, endpoint=False)
    return centre + np.outer(np.cos(angles), right * 1.05 * iod) + np.outer(np.sin(angles), down * 1.45 * iod)


def render_mask(polygon: np.ndarray, size: int, supersample: int = 4) -> torch.Tensor:
    """Rasterise a polygon (crop pixels) to a soft-edged (size, size) mask in [0, 1]."""
    big = Image.new("L", (size * supersample, size * supersample), 0)
    scaled = (np.asarray(polygon) + 0.5) * supersample
    ImageDraw.Draw(big).polygon([tuple(p) for p in scaled.tolist()], fill=255)
    mask = torch.from_numpy(np.asarray(big, dtype=np.float32) / 255.0)
    return F.avg_pool2d(mask[None, None], supersample)[0, 0]


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """Andrew's monotone chain; returns the hull counter-clockwise."""
    pts = sorted(map(tuple, np.asarray(points, dtype=np.float64)))
    if len(pts) < 3:
        return np.array(pts)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1])
