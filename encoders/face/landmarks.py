"""Landmark conversions between the point sets the backends give."""
from __future__ import annotations

import numpy as np

IBUG68_LEFT_EYE = slice(36, 42)    # the eye on the image's left (the subject's right)
IBUG68_RIGHT_EYE = slice(42, 48)
IBUG68_NOSE_TIP = 30
IBUG68_MOUTH_LEFT = 48
IBUG68_MOUTH_RIGHT = 54


def ibug68_to_kps5(landmarks: np.ndarray) -> np.ndarray:
    """Eye centres, nose tip and mouth corners from iBUG 68 points, in kps5 order."""
    lm = np.asarray(landmarks, dtype=np.float64)
    return np.stack([
        lm[IBUG68_LEFT_EYE].mean(0),
        lm[IBUG68_RIGHT_EYE].mean(0),
        lm[IBUG68_NOSE_TIP],
        lm[IBUG68_MOUTH_LEFT],
        lm[IBUG68_MOUTH_RIGHT],
    ])
