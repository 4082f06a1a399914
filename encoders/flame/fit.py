"""Fitting FLAME to landmarks: one shape code per identity, pose and expression per photo.

Camera: scaled orthographic, as for head pose in ``face/pose.py``. A model point X
(metres; x right, y up, z toward the camera) lands at ``s * (x, -y) + t`` in image
pixels (y down), or at ``s * (x, -y, -z) + t`` for 3D landmarks given in an image frame
(x right, y down, z into the scene). Unknowns: the shape code (shared by all photos);
per photo the expression code, the global and jaw rotations, log scale and translation.

The problem is least squares: landmark residuals in units of each photo's interocular
distance, plus Gaussian priors on the codes (FLAME's codes are in standard deviations,
so ``prior * NOISE**2 * |code|^2`` is the MAP penalty for landmark noise of NOISE
interocular distances). It is solved by Levenberg-Marquardt with exact Jacobians from
torch.func (``jacobian``), from a rigid start found in closed form.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..face.pose import fit_scaled_orthographic
from .mean_face import interocular
from .model import FlameModel, FlamePose, matrix_to_axis_angle

NOISE = 0.02          # assumed landmark noise, interocular distances
IMAGE_FRAME = torch.tensor([1.0, -1.0, -1.0], dtype=torch.float64)


class FlameFitError(ValueError):
    """Landmarks that cannot be fitted; the message says why."""


@dataclass
class FlameParams:
    """FLAME_PARAMS: an identity's shape code and, per fitted photo, how it was posed."""
    shape: torch.Tensor                   # (S,)
    expression: torch.Tensor              # (P, E)
    global_pose: torch.Tensor             # (P, 3)
    jaw_pose: torch.Tensor                # (P, 3)
    scale: torch.Tensor                   # (P,) pixels per metre
    translation: torch.Tensor             # (P, 2) or (P, 3)
    model_name: str = ""
    image_sizes: list[tuple[int, int]] = field(default_factory=list)
    residual_iod: list[float] = field(default_factory=list)   # RMS landmark error per photo

    @property
    def photos(self) -> int:
        return self.expression.shape[0]

    def posed(self, index: int | None = None) -> FlamePose:
        """The identity in photo ``index``'s pose and expression (all photos when None)."""
        rows = slice(None) if index is None else slice(index, index + 1)
        count = self.expression[rows].shape[0]
        return FlamePose(self.shape[None].expand(count, -1), self.expression[rows],
                         self.global_pose[rows], self.jaw_pose[rows])

    def summary(self) -> dict:
        return {"model": self.model_name, "photos": self.photos,
                "shape_code_norm": round(float(self.shape.norm()), 4),
                "residual_interocular": [round(r, 5) for r in self.residual_iod]}


def project(points: torch.Tensor, scale: torch.Tensor, translation: torch.Tensor) -> torch.Tensor:
    """Model points (B, K, 3) to image coordinates (B, K, D) with D = translation's width."""
    dims = translation.shape[-1]
    frame = IMAGE_FRAME.to(points.dtype)[:dims]
    return scale[:, None, None] * points[..., :dims] * frame + translation[:, None, :]


def model_rows(model: FlameModel, observed_layout: str) -> list[int]:
    """Which rows of 68-point iBUG observations the model's landmarks correspond to."""
    if observed_layout != "ibug68":
        raise FlameFitError(
            f"FLAME fitting needs 68 landmarks; the face analysis gave '{observed_layout}'. Use the dlib "
            "backend or an insightface pack with a 68-point landmark model (e.g. buffalo_l's 1k3d68).")
    return list(range(68)) if model.landmark_layout == "ibug68" else list(range(17, 68))


LANDMARK_MODES = ("3d when available", "2d")


def observations(model: FlameModel, faces: list, mode: str = LANDMARK_MODES[0]) -> tuple[list[np.ndarray], str]:
    """Each face's landmarks in the model's rows, and whether they are "3d" or "2d".

    The appendix fits FLAME to 3D landmarks: they are used when every face has them (insightface's
    68-point 3D landmarks) unless ``mode`` is "2d"; the 2D landmarks (dlib) are the fallback."""
    if mode not in LANDMARK_MODES:
        raise ValueError(f"landmarks must be one of {LANDMARK_MODES}, not {mode!r}")
    for face in faces:
        rows = model_rows(model, face.landmark_format)
    use_3d = mode != "2d" and all(getattr(f, "landmarks_3d", None) is not None for f in faces)
    points = [np.asarray(f.landmarks_3d if use_3d else f.landmarks, dtype=np.float64)[rows] for f in faces]
    return points, "3d" if use_3d else "2d"


def _rigid_start(model: FlameModel, observed: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Rotation (axis-angle), scale and translation of the mean face onto the landmarks."""
    mean = model.landmarks(model.neutral())[0].numpy()
    if observed.shape[1] == 2:
        scale, rotation, _ = fit_scaled_orthographic(observed, mean)
    else:
        world = observed * IMAGE_FRAME.numpy()                 # back to y up, z toward camera
        a, b = mean - mean.mean(0), world - world.mean(0)
        u, sing, vt = np.linalg.svd(b.T @ a)
        d = np.sign(np.linalg.det(u @ vt))
        rotation = u @ np.diag([1, 1, d]) @ vt
        scale = float((sing * [1, 1, d]).sum() / (a ** 2).sum())
    return matrix_to_axis_angle(rotation), scale, rotation


def fit_flame(model: FlameModel, observations: list[np.ndarray], *, shape_prior: float = 1.0,
              expression_prior: float = 1.0, jaw_prior: float = 1.0, iterations: int = 40,
              fit_expression: bool = True, image_sizes: list[tuple[int, int]] | None = None) -> FlameParams:
    """Least-squares FLAME fit to the model's landmarks seen in one or more photos.

    ``observations``: per photo an array (K, 2) or (K, 3) in the order of the model's
    landmarks (68 iBUG points, or iBUG 17-67 for a 51-point embedding).
    """
    if not observations:
        raise FlameFitError("no landmarks to fit: no face was found in any photo")
    dims = {o.shape[1] for o in observations}
    if len(dims) != 1 or dims.pop() not in (2, 3):
        raise FlameFitError("landmarks must all be 2D or all 3D")
    k = model.landmark_count
    for i, o in enumerate(observations):
        if o.shape[0] != k:
            raise FlameFitError(f"photo {i}: {o.shape[0]} landmarks, the model's embedding has {k}")
    dtype = model.dtype
    obs = torch.as_tensor(np.stack(observations), dtype=dtype)          # (P, K, D)
    photos, _, d = obs.shape
    layout = model.landmark_layout
    norms = torch.tensor([interocular(o, layout) for o in observations], dtype=dtype)
    if (norms <= 0).any():
        raise FlameFitError("degenerate landmarks: the outer eye corners coincide")

    n_s, n_e = model.n_shape, (model.n_expression if fit_expression else 0)
    per_photo = n_e + 3 + 3 + 1 + d
    start = torch.zeros(n_s + photos * per_photo, dtype=dtype)
    for p, o in enumerate(observations):
        axis_angle, scale, _ = _rigid_start(model, o)
        base = n_s + p * per_photo + n_e
        start[base:base + 3] = torch.as_tensor(axis_angle)
        start[base + 6] = float(np.log(scale))
        pose = model.neutral()
        pose.global_pose = start[base:base + 3][None].clone()
        placed = project(model.landmarks(pose), torch.tensor([scale], dtype=dtype), torch.zeros(1, d, dtype=dtype))
        start[base + 7:base + 7 + d] = (obs[p] - placed[0]).mean(0)

    def unpack(x):
        shape = x[:n_s]
        rows = x[n_s:].reshape(photos, per_photo)
        expression = rows[:, :n_e]
        return shape, expression, rows[:, n_e:n_e + 3], rows[:, n_e + 3:n_e + 6], rows[:, n_e + 6], rows[:, n_e + 7:]

    weights = torch.tensor([shape_prior, expression_prior, jaw_prior], dtype=dtype).clamp_min(0).sqrt() * NOISE

    def residuals(x):
        shape, expression, global_pose, jaw, log_scale, translation = unpack(x)
        pose = FlamePose(shape[None].expand(photos, -1), expression, global_pose, jaw)
        predicted = project(model.landmarks(pose), torch.exp(log_scale), translation)
        data = ((predicted - obs) / norms[:, None, None]).reshape(-1)
        return torch.cat([data, weights[0] * shape, weights[1] * expression.reshape(-1), weights[2] * jaw.reshape(-1)])

    x = levenberg_marquardt(residuals, start, iterations)
    shape, expression, global_pose, jaw, log_scale, translation = (t.detach().clone() for t in unpack(x))
    with torch.no_grad():
        pose = FlamePose(shape[None].expand(photos, -1), expression, global_pose, jaw)
        err = (project(model.landmarks(pose), torch.exp(log_scale), translation) - obs) / norms[:, None, None]
        rms = err.pow(2).sum(-1).mean(-1).sqrt().tolist()
    if n_e == 0:
        expression = torch.zeros(photos, model.n_expression, dtype=dtype)
    return FlameParams(shape, expression, global_pose, jaw, torch.exp(log_scale), translation,
                       model_name=model.name, image_sizes=list(image_sizes or []), residual_iod=rms)


def jacobian(function, x: torch.Tensor) -> torch.Tensor:
    """The exact Jacobian of ``function`` (a vector of any length) at ``x``, by forward-mode AD.

    ComfyUI runs every node under ``torch.inference_mode()``, which switches forward-mode AD off.
    torch 2.14's torch.func copes; on torch 2.11 it fails or lies whatever ``function`` computes:
    jacfwd's own ``_make_dual`` of ``x`` raises "Batching rule not implemented for aten::_make_dual",
    and jacrev returns zeros. So the derivatives are taken with inference mode off, as outside
    ComfyUI. Inference tensors (a model loaded by a node, the fit's observations) may be read there;
    they are never written, and as nothing requires grad, nothing is saved for backward."""
    with torch.inference_mode(False):
        return torch.func.jacfwd(function)(x.clone())


def levenberg_marquardt(residuals, x: torch.Tensor, iterations: int, tolerance: float = 1e-15) -> torch.Tensor:
    """Minimises |residuals(x)|^2 with exact Jacobians (forward mode)."""
    damping = 1e-3
    r = residuals(x)
    cost = float(r @ r)
    for _ in range(iterations):
        jac = jacobian(residuals, x)
        gradient = jac.T @ r
        normal = jac.T @ jac
        diagonal = torch.diagonal(normal).clamp_min(1e-12)
        improved = False
        for _attempt in range(10):
            step = torch.linalg.solve(normal + damping * torch.diag(diagonal), -gradient)
            candidate = x + step
            r_new = residuals(candidate)
            new_cost = float(r_new @ r_new)
            if new_cost < cost:
                improved = cost - new_cost > tolerance * max(cost, 1e-30)
                x, r, cost = candidate, r_new, new_cost
                damping = max(damping / 3, 1e-9)
                break
            damping *= 4
        if not improved:
            break
    return x
