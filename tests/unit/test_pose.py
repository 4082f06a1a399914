import numpy as np
import pytest

from omniid.encoders.face.pose import (TEMPLATE_IBUG68, TEMPLATE_KPS5, angles_from_rotation,
                                       estimate_pose, rotation_from_angles)


def project(points3d, yaw, pitch, roll, scale=2.0, shift=(320.0, 240.0)):
    """Scaled orthographic projection into image pixels (y down), written out by hand."""
    rot = rotation_from_angles(yaw, pitch, roll)
    cam = points3d @ rot.T
    return np.stack([scale * cam[:, 0] + shift[0], -scale * cam[:, 1] + shift[1]], -1)


def test_rotation_is_orthonormal_and_angles_round_trip():
    for yaw, pitch, roll in [(0, 0, 0), (30, -12, 7), (-65, 40, -25), (10, 80, 3)]:
        rot = rotation_from_angles(yaw, pitch, roll)
        np.testing.assert_allclose(rot @ rot.T, np.eye(3), atol=1e-12)
        assert np.linalg.det(rot) == pytest.approx(1.0)
        np.testing.assert_allclose(angles_from_rotation(rot), [yaw, pitch, roll], atol=1e-9)


@pytest.mark.parametrize("yaw,pitch,roll", [(0, 0, 0), (25, -10, 5), (-40, 15, -12)])
def test_pose_recovered_from_noise_free_kps5(yaw, pitch, roll):
    kps = project(TEMPLATE_KPS5, yaw, pitch, roll)
    np.testing.assert_allclose(estimate_pose(kps, "kps5"), [yaw, pitch, roll], atol=1e-6)


def test_pose_recovered_from_noise_free_ibug68():
    landmarks = np.zeros((68, 2))
    idx = sorted(TEMPLATE_IBUG68)
    landmarks[idx] = project(np.array([TEMPLATE_IBUG68[i] for i in idx]), 18, 9, -4)
    np.testing.assert_allclose(estimate_pose(landmarks, "ibug68"), [18, 9, -4], atol=1e-6)


def test_sign_conventions_match_the_image():
    nose_tip, eye_mid = 2, [0, 1]
    turned = project(TEMPLATE_KPS5, 30, 0, 0)
    frontal = project(TEMPLATE_KPS5, 0, 0, 0)
    # yaw > 0: the nose moves toward the image's right relative to the eyes
    assert turned[nose_tip, 0] - turned[eye_mid, 0].mean() > frontal[nose_tip, 0] - frontal[eye_mid, 0].mean()
    looking_up = project(TEMPLATE_KPS5, 0, 20, 0)
    # pitch > 0: the nose moves up (smaller y) relative to the eyes
    assert looking_up[nose_tip, 1] - looking_up[eye_mid, 1].mean() < frontal[nose_tip, 1] - frontal[eye_mid, 1].mean()
