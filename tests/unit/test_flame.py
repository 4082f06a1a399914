"""FLAME on the synthetic model: file reading, skinning, fitting, re-posing and rendering."""
import pickle

import numpy as np
import pytest
import torch

from omniid.encoders.face.pose import rotation_from_angles
from omniid.encoders.flame import (FlameFileError, FlameModel, fit_flame, frame_face, load_grid,
                                   load_landmark_embedding, load_model_arrays, project, render_conditions,
                                   repose, single_template)
from omniid.encoders.flame.mean_face import MEAN_FACE_68
from omniid.encoders.flame.model import axis_angle_to_matrix
from omniid.encoders.flame.render import draw_points
from support.flame_fixture import synthetic_flame_arrays, write_synthetic_flame

TINY = dict(shape_prior=1e-8, expression_prior=1e-8, jaw_prior=1e-8)


@pytest.fixture(scope="module")
def flame_files(tmp_path_factory):
    return write_synthetic_flame(tmp_path_factory.mktemp("flame"))


@pytest.fixture(scope="module")
def model(flame_files):
    return FlameModel.from_files(str(flame_files["model"]), str(flame_files["embedding"]),
                                 n_shape=100, n_expression=30)


def random_pose(model, seed=0, shape=None):
    g = torch.Generator().manual_seed(seed)
    pose = model.neutral()
    pose.shape[0] = torch.randn(model.n_shape, generator=g, dtype=torch.float64) if shape is None else shape
    pose.expression[0] = torch.randn(model.n_expression, generator=g, dtype=torch.float64)
    pose.global_pose[0] = torch.tensor([0.1, 0.3, 0.05])
    pose.jaw_pose[0, 0] = 0.15
    return pose


def test_official_layouts_load_as_plain_arrays(flame_files):
    arrays = load_model_arrays(str(flame_files["model"]))
    expected, faces, bary = synthetic_flame_arrays()
    for key, value in expected.items():
        np.testing.assert_array_equal(arrays[key], value)     # chumpy leaves and the CSC regressor, densified
    lmk_faces, lmk_bary, layout = load_landmark_embedding(str(flame_files["embedding"]))
    assert layout == "ibug68" and np.array_equal(lmk_faces, faces) and np.allclose(lmk_bary, bary)
    static_faces, _, static_layout = load_landmark_embedding(str(flame_files["static_embedding"]))
    assert static_layout == "ibug51" and np.array_equal(static_faces, faces[17:])


def test_npz_files_are_read_without_pickle(tmp_path, flame_files):
    arrays = load_model_arrays(str(flame_files["model"]))
    np.savez(tmp_path / "flame.npz", **arrays)
    assert np.array_equal(load_model_arrays(str(tmp_path / "flame.npz"))["shapedirs"], arrays["shapedirs"])


class Exploit:
    def __reduce__(self):
        import os
        return os.system, ("echo owned",)


def test_pickles_that_run_code_are_refused_by_name(tmp_path):
    path = tmp_path / "generic_model.pkl"
    path.write_bytes(pickle.dumps({"v_template": Exploit()}))
    with pytest.raises(FlameFileError, match=r"generic_model.pkl: refuses to load '(posix|os)\.system'"):
        load_model_arrays(str(path))


def test_truncated_and_swapped_files_are_named(tmp_path, flame_files):
    data = flame_files["model"].read_bytes()
    truncated = tmp_path / "cut.pkl"
    truncated.write_bytes(data[:len(data) // 2])
    with pytest.raises(FlameFileError, match="cut.pkl: cannot be read .*truncated"):
        load_model_arrays(str(truncated))
    with pytest.raises(FlameFileError, match="landmark_embedding.npy: not a FLAME model.*landmark embedding"):
        load_model_arrays(str(flame_files["embedding"]))
    with pytest.raises(FlameFileError, match="generic_model.pkl: this is a FLAME model, not a landmark embedding"):
        load_landmark_embedding(str(flame_files["model"]))
    bad = dict(load_model_arrays(str(flame_files["model"])))
    bad["posedirs"] = bad["posedirs"][:, :, :30]
    np.savez(tmp_path / "bad.npz", **bad)
    with pytest.raises(FlameFileError, match=r"bad.npz: posedirs has shape \(5023, 3, 30\), FLAME's layout is 5023x3x36"):
        load_model_arrays(str(tmp_path / "bad.npz"))


def test_rest_pose_landmarks_are_the_embedded_points(model):
    landmarks = model.landmarks(model.neutral())[0].numpy()
    assert np.abs(landmarks * 1000 - MEAN_FACE_68).max() < 3.0      # the synthetic face sits on the generic one


def test_skinning_matches_an_independent_reference(model):
    pose = random_pose(model)
    vertices = model.vertices(pose)[0]
    arrays, _, _ = synthetic_flame_arrays()
    dirs = np.concatenate([arrays["shapedirs"][:, :, :100], arrays["shapedirs"][:, :, 300:330]], 2)
    codes = torch.cat([pose.shape[0], pose.expression[0]]).numpy()
    shaped = arrays["v_template"] + dirs @ codes
    joints = arrays["J_regressor"] @ shaped
    rot = axis_angle_to_matrix(pose.full_pose()[0]).numpy()
    posed = shaped + (arrays["posedirs"] @ (rot[1:] - np.eye(3)).reshape(-1))
    # synthetic skinning: the head follows the neck, the lower face follows the jaw
    neck_world = rot[0] @ rot[1]
    neck_origin = joints[0] + rot[0] @ (joints[1] - joints[0])
    jaw_world = neck_world @ rot[2]
    jaw_origin = neck_origin + neck_world @ (joints[2] - joints[1])
    weights = arrays["weights"]
    for v in (0, 3 * 10, 3 * 57, 4000):
        joint = int(np.argmax(weights[v]))
        if joint == 1:
            expected = neck_world @ (posed[v] - joints[1]) + neck_origin
        else:
            assert joint == 2
            expected = jaw_world @ (posed[v] - joints[2]) + jaw_origin
        np.testing.assert_allclose(vertices[v].numpy(), expected, atol=1e-12)
    sparse = model.landmarks(pose)
    np.testing.assert_allclose(sparse.numpy(), model.landmarks_from_vertices(vertices[None]).numpy(), atol=1e-14)


def test_fit_recovers_a_known_shape_from_its_3d_landmarks(model):
    pose = random_pose(model, seed=1)
    observed = project(model.landmarks(pose), torch.tensor([3000.0]), torch.tensor([[256.0, 256.0, 5.0]]))[0]
    fitted = fit_flame(model, [observed.numpy()], **TINY)
    assert (fitted.shape - pose.shape[0]).abs().max() < 1e-3
    assert (fitted.expression[0] - pose.expression[0]).abs().max() < 1e-3
    assert fitted.residual_iod[0] < 1e-6


def test_fit_recovers_a_known_shape_from_2d_landmarks_of_three_views(model):
    pose = random_pose(model, seed=2)
    views = []
    for yaw in (-0.5, 0.0, 0.45):
        pose.global_pose[0] = torch.tensor([0.05, yaw, -0.03])
        views.append(project(model.landmarks(pose), torch.tensor([2500.0]), torch.tensor([[300.0, 260.0]]))[0].numpy())
    fitted = fit_flame(model, views, **TINY)
    assert (fitted.shape - pose.shape[0]).abs().max() < 1e-3
    assert fitted.global_pose[2, 1] == pytest.approx(0.45, abs=1e-5)


def test_fit_to_noisy_landmarks_stays_plausible(model):
    pose = random_pose(model, seed=3)
    observed = project(model.landmarks(pose), torch.tensor([2500.0]), torch.tensor([[256.0, 256.0]]))[0].numpy()
    noisy = observed + np.random.default_rng(0).normal(0, 2.0, observed.shape)
    fitted = fit_flame(model, [noisy])
    assert fitted.residual_iod[0] < 0.03                   # within the noise (2 px of ~225 px)
    assert fitted.shape.abs().max() < 4                    # the prior keeps codes in range


def test_reposing_keeps_the_shape_and_turns_the_head_by_the_template_angles(model):
    shape = random_pose(model, seed=4).shape[0]
    templates = [single_template(0, 0, 0, 0, 0), single_template(30, -10, 5, 0, 0)]
    posed = repose(model, shape, templates)
    assert torch.equal(posed.shape[0], shape) and torch.equal(posed.shape[1], shape)
    a, b = (x.numpy() for x in model.landmarks(posed))
    ca, cb = a - a.mean(0), b - b.mean(0)
    u, _, vt = np.linalg.svd(cb.T @ ca)
    recovered = u @ vt
    np.testing.assert_allclose(recovered, rotation_from_angles(30, -10, 5), atol=1e-9)
    # and the same shape code comes back from the re-posed landmarks
    observed = project(model.landmarks(posed)[1:], torch.tensor([3000.0]), torch.tensor([[0.0, 0.0, 0.0]]))[0]
    assert (fit_flame(model, [observed.numpy()], **TINY).shape - shape).abs().max() < 1e-3


def test_fit_and_templates_work_under_comfyui_inference_mode(flame_files, model):
    """ComfyUI runs every node under torch.inference_mode(), which turns forward-mode AD off: there
    torch.func's jacfwd failed on torch 2.11 ("Batching rule not implemented for aten::_make_dual") and
    jacrev returns zeros. A model loaded, fitted and re-posed inside it gives what it gives outside."""
    pose = random_pose(model, seed=6)
    observed = project(model.landmarks(pose), torch.tensor([3000.0]), torch.tensor([[256.0, 256.0, 5.0]]))[0].numpy()
    templates = [single_template(20, -5, 0, 0.1, 1.0)]                # offsets: solved for an expression code
    outside = fit_flame(model, [observed], **TINY)
    outside_posed = repose(model, outside.shape, templates)
    with torch.inference_mode():
        loaded = FlameModel.from_files(str(flame_files["model"]), str(flame_files["embedding"]),
                                       n_shape=100, n_expression=30)
        inside = fit_flame(loaded, [observed], **TINY)
        inside_posed = repose(loaded, inside.shape, templates)
    assert (inside.shape - pose.shape[0]).abs().max() < 1e-3
    for name in ("shape", "expression", "global_pose", "jaw_pose", "scale", "translation"):
        torch.testing.assert_close(getattr(inside, name), getattr(outside, name), rtol=0, atol=1e-12)
    assert outside_posed.expression.abs().max() > 0.1                 # the smile's code is not zero
    torch.testing.assert_close(inside_posed.expression, outside_posed.expression, rtol=0, atol=1e-12)


def test_bundled_grid_expressions_move_the_mouth(model):
    grid = load_grid()
    assert len(grid) == 9 and {t.yaw for t in grid} == {-30, 0, 30}
    shape = torch.zeros(model.n_shape, dtype=torch.float64)
    frontal = [t for t in grid if t.yaw == 0]
    neutral, smile, jaw_open = (model.landmarks(repose(model, shape, [t]))[0].numpy() for t in frontal)
    corners = [48, 54]
    assert (smile[corners, 1] - neutral[corners, 1]).min() > 1e-3 * 1.5       # corners rise by > 1.5 mm
    gap = lambda lm: lm[62, 1] - lm[66, 1]
    assert gap(jaw_open) - gap(neutral) > 5e-3                                 # the mouth opens by > 5 mm


def test_rendering_hits_the_projected_pixels(model):
    shape = random_pose(model, seed=5).shape[0]
    landmarks = model.landmarks(repose(model, shape, load_grid()[:2]))
    framing = frame_face(landmarks[0].numpy(), 320, 240, 0.6)
    points = framing.project(landmarks.numpy())
    extent = np.ptp(points[0], axis=0).max()
    assert extent == pytest.approx(0.6 * 240)
    single = render_conditions(points, "ibug68", 320, 240, radius=0)
    from omniid.encoders.flame.render import with_pupils
    for frame, pts in zip(single, points):
        expected = {(int(x), int(y)) for x, y in np.rint(with_pupils(pts, "ibug68"))}
        ys, xs = np.nonzero(frame[..., 0].numpy())
        assert set(zip(xs.tolist(), ys.tolist())) == expected
        assert torch.equal(frame[..., 0], frame[..., 2])


def test_discs_are_centred_on_the_rounded_point():
    canvas = draw_points(np.array([[20.4, 30.6], [70.5, 10.2]]), 100, 50, radius=3)
    for cx, cy in ((20, 31), (70, 10)):
        ys, xs = np.nonzero(canvas[cy - 5:cy + 6, cx - 5:cx + 6])
        assert (xs.mean() + cx - 5, ys.mean() + cy - 5) == (cx, cy)
        assert canvas[cy, cx + 3] == 1 and canvas[cy, cx + 4] == 0
    assert draw_points(np.array([[-10.0, -10.0]]), 10, 10, 2).sum() == 0       # off canvas: clipped


def test_photo_path_draws_detected_landmarks(photos):
    from omniid.encoders.face import create_analyzer
    from omniid.encoders.flame.photos import photo_conditions
    from support.assets import load_photo
    pixels = load_photo(photos / "obama.jpg")
    image = torch.from_numpy(pixels.copy()).float().div(255)[None]
    analyzer = create_analyzer("dlib")
    conditions, faceless = photo_conditions(image, analyzer)
    assert faceless == [] and conditions.shape == image.shape
    face = analyzer.detect(pixels, with_embedding=False)[0]
    for x, y in np.rint(face.landmarks).astype(int):
        assert conditions[0, y, x, 0] == 1.0


def test_flame_fit_uses_3d_landmarks_when_the_face_analysis_has_them(model):
    """Appendix: FLAME is fitted to 3D landmarks. insightface's 68 3D landmarks (z in pixels, whichever way
    it points) reach the fit as 3D, in the image frame, and pin the shape down from one photo; dlib's 2D
    landmarks stay the fallback, and 2D can still be asked for."""
    from omniid.encoders.face.insightface_backend import convert_insightface_face
    from omniid.encoders.face.types import DetectedFace
    from omniid.encoders.flame import observations

    class InsightFace(dict):                                       # insightface's Face: a dict with attributes
        __getattr__ = dict.__getitem__

    pose = random_pose(model, seed=5)
    image_frame = project(model.landmarks(pose), torch.tensor([2800.0]), torch.tensor([[256.0, 250.0, 0.0]]))[0]
    toward_camera = image_frame.numpy() * np.array([1.0, 1.0, -1.0])   # a z that points the other way
    kps = image_frame.numpy()[[36, 45, 30, 48, 54], :2]
    face = convert_insightface_face(InsightFace(bbox=np.array([100.0, 80.0, 420.0, 430.0]), kps=kps,
                                                det_score=0.9, landmark_3d_68=toward_camera))
    np.testing.assert_allclose(face.landmarks_3d, image_frame.numpy())
    observed, dims = observations(model, [face])
    assert dims == "3d" and observed[0].shape == (68, 3)
    fitted = fit_flame(model, observed, **TINY)
    assert (fitted.shape - pose.shape[0]).abs().max() < 1e-3
    flat, dims = observations(model, [face], "2d")
    assert dims == "2d" and flat[0].shape == (68, 2)
    dlib_face = DetectedFace(face.bbox, 0.9, kps, face.landmarks, "ibug68")
    assert observations(model, [face, dlib_face])[1] == "2d"        # 3D only when every face has them
