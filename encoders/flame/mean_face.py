"""A generic face's 68 iBUG landmarks in 3D, authored for this pack.

Millimetres, nose tip at the origin, x toward the image's right, y up, z toward the
camera (the frame of ``face/pose.py``, whose sparse template these points extend).
Round anthropometric averages, not measurements of anyone; used to state template
expressions in a model-free way and to build the synthetic FLAME of the tests.
"""
from __future__ import annotations

import numpy as np


def _jaw() -> list[list[float]]:
    angles = np.linspace(0.0, np.pi, 17)
    return [[-70.0 * np.cos(a), 25.0 - 93.0 * np.sin(a), -95.0 + 77.0 * np.sin(a)] for a in angles]


_LEFT_BROW = [[-58, 42, -45], [-47, 50, -33], [-35, 53, -25], [-23, 52, -20], [-12, 48, -17]]
_NOSE_BRIDGE = [[0, 36, -24], [0, 24, -14], [0, 12, -6], [0, 0, 0]]
_NOSE_BASE = [[-14, -10, -16], [-7, -12, -11], [0, -13, -9], [7, -12, -11], [14, -10, -16]]
_LEFT_EYE = [[-45, 33, -38], [-38, 37, -33], [-25, 37, -31], [-16, 33, -30], [-25, 30, -31], [-38, 30, -33]]
_MOUTH_OUTER = [[-24, -30, -22], [-15, -25, -13], [-6, -23, -9], [0, -24, -8], [6, -23, -9], [15, -25, -13],
                [24, -30, -22], [15, -37, -14], [6, -40, -10], [0, -41, -9], [-6, -40, -10], [-15, -37, -14]]
_MOUTH_INNER = [[-20, -30, -19], [-6, -28, -10], [0, -28, -9], [6, -28, -10], [20, -30, -19],
                [6, -32, -10], [0, -32, -9], [-6, -32, -10]]


def _mirror(points, order):
    return [[-points[i][0], points[i][1], points[i][2]] for i in order]


MEAN_FACE_68 = np.array(
    _jaw() + _LEFT_BROW + _mirror(_LEFT_BROW, [4, 3, 2, 1, 0]) + _NOSE_BRIDGE + _NOSE_BASE
    + _LEFT_EYE + _mirror(_LEFT_EYE, [3, 2, 1, 0, 5, 4]) + _MOUTH_OUTER + _MOUTH_INNER,
    dtype=np.float64)

# iBUG index groups
JAW = list(range(0, 17))
LOWER_FACE = list(range(3, 14)) + [55, 56, 57, 58, 59, 65, 66, 67]   # moves with the jaw
EYE_LEFT, EYE_RIGHT = list(range(36, 42)), list(range(42, 48))
OUTER_EYE_CORNERS = (36, 45)


def interocular(points: np.ndarray, layout: str = "ibug68") -> float:
    """Distance between the outer eye corners of a (68 or 51, 2|3) point set."""
    offset = 0 if layout == "ibug68" else 17
    a, b = (i - offset for i in OUTER_EYE_CORNERS)
    return float(np.linalg.norm(points[b] - points[a]))

