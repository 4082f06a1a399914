"""Expression and pose templates: re-posing an identity's FLAME shape.

A template is a head rotation (yaw, pitch, roll), a jaw opening and an expression. The
bundled grid (``templates_grid.json``) states expressions as landmark offsets on a
generic face, so they hold for any FLAME model: each is turned into the model's
expression code by regularised least squares. Templates fitted from driving photos
carry their FLAME codes directly.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..face.pose import rotation_from_angles
from .fit import FlameParams, jacobian
from .mean_face import MEAN_FACE_68, interocular
from .model import FlameModel, FlamePose, matrix_to_axis_angle

GRID_FILE = Path(__file__).with_name("templates_grid.json")


@dataclass
class Template:
    label: str
    yaw: float = 0.0
    pitch: float = 0.0
    roll: float = 0.0
    jaw: float = 0.0
    offsets: dict[int, list[float]] | None = None       # iBUG index -> mm on the generic face
    expression_code: torch.Tensor | None = None          # a driving photo's code
    global_pose: torch.Tensor | None = None              # a driving photo's axis-angle
    jaw_pose: torch.Tensor | None = None


def load_grid(path: Path = GRID_FILE) -> list[Template]:
    data = json.loads(Path(path).read_text())
    out = []
    for cell in data["grid"]:
        expression = data["expressions"][cell["expression"]]
        out.append(Template(
            label=f"{cell['expression']} yaw {cell['yaw']:+g}", yaw=cell["yaw"], pitch=cell["pitch"],
            roll=cell["roll"], jaw=expression["jaw"],
            offsets={int(k): v for k, v in expression["offsets"].items()}))
    return out


def single_template(yaw: float, pitch: float, roll: float, jaw_open: float, smile: float) -> Template:
    """A template from sliders: ``smile`` scales the grid's smile offsets (0..1)."""
    data = json.loads(GRID_FILE.read_text())["expressions"]["smile"]
    offsets = {int(k): [smile * c for c in v] for k, v in data["offsets"].items()} if smile else None
    return Template(label=f"yaw {yaw:+g} pitch {pitch:+g} roll {roll:+g}", yaw=yaw, pitch=pitch, roll=roll,
                    jaw=jaw_open + smile * data["jaw"], offsets=offsets)


def templates_from_params(params: FlameParams, prefix: str = "photo") -> list[Template]:
    """Each fitted photo's pose and expression as a template (driving photos)."""
    return [Template(label=f"{prefix} {i}", expression_code=params.expression[i],
                     global_pose=params.global_pose[i], jaw_pose=params.jaw_pose[i])
            for i in range(params.photos)]


def rotation_axis_angle(yaw: float, pitch: float, roll: float) -> torch.Tensor:
    return torch.as_tensor(matrix_to_axis_angle(rotation_from_angles(yaw, pitch, roll)))


def expression_for_offsets(model: FlameModel, shape: torch.Tensor, offsets: dict[int, list[float]],
                           jaw: float = 0.0, regularisation: float = 1e-2) -> torch.Tensor:
    """The expression code whose landmarks move by ``offsets`` (scaled to this face)."""
    if not offsets:
        return torch.zeros(model.n_expression, dtype=model.dtype)
    first = 0 if model.landmark_layout == "ibug68" else 17
    pose = model.neutral()
    pose.shape = shape[None].to(model.dtype)
    pose.jaw_pose[0, 0] = jaw
    base = model.landmarks(pose)[0]
    face_scale = interocular(base.numpy(), model.landmark_layout) / interocular(MEAN_FACE_68)
    target = torch.zeros_like(base)
    for index, offset in offsets.items():
        if index >= first:
            target[index - first] = torch.as_tensor(offset, dtype=model.dtype) * face_scale

    def moved(code):
        p = model.neutral()
        p.shape, p.expression = pose.shape, code[None]
        p.jaw_pose = pose.jaw_pose
        return model.landmarks(p)[0] - base

    zero = torch.zeros(model.n_expression, dtype=model.dtype)
    basis = jacobian(lambda c: moved(c).reshape(-1), zero)                    # (K*3, E)
    normal = basis.T @ basis
    damping = regularisation * torch.diagonal(normal).mean()
    return torch.linalg.solve(normal + damping * torch.eye(len(zero), dtype=model.dtype),
                              basis.T @ target.reshape(-1))


def repose(model: FlameModel, shape: torch.Tensor, templates: list[Template]) -> FlamePose:
    """The identity (shape code) in every template's pose and expression: a batch."""
    expression, global_pose, jaw_pose = [], [], []
    for t in templates:
        if t.expression_code is not None:
            code = torch.zeros(model.n_expression, dtype=model.dtype)
            n = min(len(code), len(t.expression_code))
            code[:n] = t.expression_code[:n]
            expression.append(code)
            global_pose.append(t.global_pose.to(model.dtype))
            jaw_pose.append(t.jaw_pose.to(model.dtype))
            continue
        expression.append(expression_for_offsets(model, shape, t.offsets or {}, jaw=t.jaw))
        global_pose.append(rotation_axis_angle(t.yaw, t.pitch, t.roll).to(model.dtype))
        jaw_pose.append(torch.tensor([t.jaw, 0.0, 0.0], dtype=model.dtype))
    count = len(templates)
    return FlamePose(shape[None].to(model.dtype).expand(count, -1), torch.stack(expression),
                     torch.stack(global_pose), torch.stack(jaw_pose))
