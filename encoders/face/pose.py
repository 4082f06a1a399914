"""Head pose from 2D landmarks: a scaled-orthographic fit to a generic 3D face.

The 3D points below are our own rounded anthropometric averages in millimetres,
nose tip at the origin, x to the image's right, y up, z toward the camera. A
scaled-orthographic camera is exact enough for the pose bins of dataset building
and for reports; it needs no focal length and no solver.

Angles in degrees: yaw > 0 turns the face toward the image's right, pitch > 0 tilts
it up, roll > 0 rotates it counter-clockwise as seen in the image.
R = Rz(roll) @ Ry(yaw) @ Rx(pitch) maps the template into camera space.
"""
from __future__ import annotations

import numpy as np

# keypoints5 order: eye (image left), eye (image right), nose tip, mouth corner left, right
TEMPLATE_KPS5 = np.array([
    [-31.0, 33.0, -28.0],
    [31.0, 33.0, -28.0],
    [0.0, 0.0, 0.0],
    [-24.0, -30.0, -22.0],
    [24.0, -30.0, -22.0],
])

# a subset of the iBUG 68 points that a generic head fixes well
TEMPLATE_IBUG68 = {
    0: [-70.0, 25.0, -95.0], 16: [70.0, 25.0, -95.0],
    8: [0.0, -68.0, -18.0],
    27: [0.0, 36.0, -24.0], 30: [0.0, 0.0, 0.0], 33: [0.0, -12.0, -14.0],
    36: [-45.0, 33.0, -38.0], 39: [-16.0, 33.0, -30.0],
    42: [16.0, 33.0, -30.0], 45: [45.0, 33.0, -38.0],
    48: [-24.0, -30.0, -22.0], 54: [24.0, -30.0, -22.0],
}


def rotation_from_angles(yaw: float, pitch: float, roll: float) -> np.ndarray:
    y, p, r = np.deg2rad([yaw, pitch, roll])
    rx = np.array([[1, 0, 0], [0, np.cos(p), np.sin(p)], [0, -np.sin(p), np.cos(p)]])
    ry = np.array([[np.cos(y), 0, np.sin(y)], [0, 1, 0], [-np.sin(y), 0, np.cos(y)]])
    rz = np.array([[np.cos(r), -np.sin(r), 0], [np.sin(r), np.cos(r), 0], [0, 0, 1]])
    return rz @ ry @ rx


def angles_from_rotation(rot: np.ndarray) -> np.ndarray:
    yaw = np.arcsin(np.clip(-rot[2, 0], -1.0, 1.0))
    pitch = np.arctan2(-rot[2, 1], rot[2, 2])
    roll = np.arctan2(rot[1, 0], rot[0, 0])
    return np.rad2deg(np.array([yaw, pitch, roll]))


def template_for(landmarks: np.ndarray, landmark_format: str) -> tuple[np.ndarray, np.ndarray]:
    """The 2D points and their 3D template counterparts for a landmark set."""
    if landmark_format == "ibug68":
        idx = sorted(TEMPLATE_IBUG68)
        return landmarks[idx], np.array([TEMPLATE_IBUG68[i] for i in idx])
    if landmark_format == "kps5":
        return landmarks, TEMPLATE_KPS5
    raise ValueError(f"unknown landmark format {landmark_format!r}")


def fit_scaled_orthographic(points2d: np.ndarray, points3d: np.ndarray):
    """Least-squares s, R, t with points2d ~ s * R[:2] @ X + t (image y down).

    Returns (scale, rotation 3x3, translation 2).
    """
    p = np.asarray(points2d, dtype=np.float64).copy()
    p[:, 1] = -p[:, 1]                      # to a y-up frame
    x = np.asarray(points3d, dtype=np.float64)
    pc, xc = p - p.mean(0), x - x.mean(0)
    affine = np.linalg.lstsq(xc, pc, rcond=None)[0].T          # (2, 3)
    u, sing, vt = np.linalg.svd(affine, full_matrices=False)
    rows = u @ vt                                               # nearest orthonormal rows
    rot = np.vstack([rows, np.cross(rows[0], rows[1])])
    scale = float(sing.mean())
    trans = p.mean(0) - scale * rows @ x.mean(0)
    trans[1] = -trans[1]
    return scale, rot, trans


def estimate_pose(landmarks: np.ndarray, landmark_format: str) -> np.ndarray:
    """(yaw, pitch, roll) in degrees from a face's landmarks."""
    pts2d, pts3d = template_for(np.asarray(landmarks), landmark_format)
    _, rot, _ = fit_scaled_orthographic(pts2d, pts3d)
    return angles_from_rotation(rot)
