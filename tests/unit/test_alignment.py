import math

import numpy as np
import pytest
import torch

from omniid.encoders.face import alignment
from omniid.encoders.face.alignment import (ARCFACE_TEMPLATE_112, estimate_similarity, render_mask,
                                            template_points, transform_points, warp_crop)
from omniid.encoders.face.types import DetectedFace


def similarity(angle_deg: float, scale: float, shift) -> np.ndarray:
    a = math.radians(angle_deg)
    rot = scale * np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    return np.hstack([rot, np.asarray(shift, dtype=np.float64)[:, None]])


def test_template_at_112_without_padding_is_arcface():
    np.testing.assert_allclose(template_points(112, 0.0), ARCFACE_TEMPLATE_112, atol=1e-9)


def test_padding_shrinks_the_template_about_the_crop_centre():
    tight = template_points(224, 0.0)
    padded = template_points(224, 0.5)
    centre = (224 - 1) / 2.0
    np.testing.assert_allclose(padded - centre, (tight - centre) / 2.0, atol=1e-9)


@pytest.mark.parametrize("angle,scale", [(0.0, 1.0), (17.0, 0.4), (-130.0, 2.5)])
def test_similarity_recovers_a_known_transform(angle, scale):
    rng = np.random.default_rng(0)
    src = rng.uniform(0, 500, size=(5, 2))
    truth = similarity(angle, scale, [12.5, -40.0])
    dst = transform_points(src, truth)
    np.testing.assert_allclose(estimate_similarity(src, dst), truth, atol=1e-9)


def test_similarity_never_reflects():
    src = np.array([[0, 0], [10, 0], [0, 10], [10, 10], [5, 7]], dtype=float)
    mirrored = src * np.array([-1.0, 1.0])
    matrix = estimate_similarity(src, mirrored)
    assert np.linalg.det(matrix[:, :2]) > 0


def test_similarity_is_the_least_squares_optimum():
    rng = np.random.default_rng(1)
    src = rng.uniform(0, 100, size=(5, 2))
    dst = transform_points(src, similarity(10, 1.3, [3, 4])) + rng.normal(0, 2.0, size=(5, 2))
    best = estimate_similarity(src, dst)

    def cost(m):
        return ((transform_points(src, m) - dst) ** 2).sum()

    base = cost(best)
    for _ in range(200):
        a, s, tx, ty = rng.normal(0, [0.02, 0.01, 0.3, 0.3])
        angle = math.atan2(best[1, 0], best[0, 0]) + a
        scale = math.hypot(best[0, 0], best[1, 0]) * (1 + s)
        nudged = similarity(math.degrees(angle), scale, best[:, 2] + [tx, ty])
        assert cost(nudged) >= base - 1e-9


def _linear_image(height, width, coeffs):
    ys, xs = torch.meshgrid(torch.arange(height, dtype=torch.float64), torch.arange(width, dtype=torch.float64),
                            indexing="ij")
    chans = [c[0] * xs + c[1] * ys + c[2] for c in coeffs]
    return torch.stack(chans, -1)


@pytest.mark.parametrize("scale", [1.7, 0.9, 0.31])
def test_warp_samples_the_source_where_the_inverse_transform_points(scale):
    """A linear image is reproduced exactly by bilinear sampling and by box supersampling."""
    coeffs = [(1e-3, 2e-3, 0.1), (-1e-3, 5e-4, 0.8), (2e-4, -1e-3, 0.6)]
    image = _linear_image(400, 500, coeffs).float()
    size = 48
    centre = np.array([250.0, 200.0])
    matrix = similarity(23.0, scale, [0, 0])
    matrix[:, 2] = (size - 1) / 2.0 - matrix[:, :2] @ centre
    crop = warp_crop(image, matrix, size).double()
    inverse = alignment.invert_affine(matrix)
    uv = np.stack(np.meshgrid(np.arange(size), np.arange(size)), -1).reshape(-1, 2).astype(float)
    src = transform_points(uv, inverse)
    expected = np.stack([c[0] * src[:, 0] + c[1] * src[:, 1] + c[2] for c in coeffs], -1)
    np.testing.assert_allclose(crop.reshape(-1, 3).numpy(), expected, atol=2e-5)


def test_an_identity_alignment_copies_the_pixels():
    """A scale of 1 - 1e-16 (the estimate of the template onto itself) is not a shrink: no supersampling blur."""
    image = torch.rand(112, 112, 3, generator=torch.Generator().manual_seed(0))
    matrix = estimate_similarity(ARCFACE_TEMPLATE_112, ARCFACE_TEMPLATE_112)
    assert torch.allclose(warp_crop(image, matrix, 112), image, atol=1e-5)


def test_warp_fills_outside_the_source_with_black():
    image = torch.ones(50, 50, 3)
    matrix = similarity(0, 1.0, [500.0, 500.0])       # the source lands far outside the crop
    assert warp_crop(image, matrix, 32).abs().max() == 0


def test_render_mask_area_matches_the_polygon():
    square = np.array([[10, 10], [50, 10], [50, 40], [10, 40]], dtype=float)
    mask = render_mask(square, 64)
    assert abs(mask.sum().item() - 40 * 30) < 40          # within one pixel ring
    assert mask[25, 30] == 1.0 and mask[2, 2] == 0.0


def test_kps5_outline_is_an_ellipse_around_the_features():
    kps = np.array([[40, 50], [80, 50], [60, 70], [45, 90], [75, 90]], dtype=float)
    face = DetectedFace(bbox=np.array([20, 20, 100, 120.0]), score=1.0, keypoints5=kps, landmarks=kps,
                        landmark_format="kps5")
    mask = render_mask(alignment.face_outline(face), 140)
    for x, y in kps.astype(int):
        assert mask[y, x] == 1.0
    assert mask[5, 5] == 0.0 and mask[135, 135] == 0.0


def test_convex_hull_keeps_the_extreme_points():
    rng = np.random.default_rng(3)
    points = rng.uniform(-1, 1, size=(200, 2))
    corners = np.array([[-2, -2], [2, -2], [2, 2], [-2, 2]], dtype=float)
    hull = alignment._convex_hull(np.vstack([points, corners]))
    assert sorted(map(tuple, hull)) == sorted(map(tuple, corners))
