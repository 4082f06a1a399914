"""FLAME in pure torch: shape and expression blendshapes, pose correctives, skinning.

FLAME (Li et al., SIGGRAPH Asia 2017) is a linear blend skinning model with five
joints (0 global/root, 1 neck, 2 jaw, 3 left eye, 4 right eye). Coordinates are metres,
x toward the image's right for a face looking at the camera, y up, z toward the camera.
The shape basis has 300 components and the expression basis follows it in
``shapedirs``; both are scaled so that a code of 1 is one standard deviation.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from .files import load_landmark_embedding, load_model_arrays

SHAPE_COMPONENTS = 300
POSE_JOINTS = ("global", "neck", "jaw", "eye_left", "eye_right")


def axis_angle_to_matrix(axis_angle: torch.Tensor) -> torch.Tensor:
    """Rodrigues' formula: (..., 3) axis-angle -> (..., 3, 3), smooth through zero."""
    angle_sq = (axis_angle * axis_angle).sum(-1, keepdim=True)
    angle = torch.sqrt(angle_sq + 1e-16)
    # sin(a)/a and (1-cos(a))/a^2 with their Taylor series near zero
    small = angle_sq < 1e-8
    sin_a = torch.where(small, 1 - angle_sq / 6, torch.sin(angle) / angle)
    cos_a = torch.where(small, 0.5 - angle_sq / 24, (1 - torch.cos(angle)) / (angle_sq + 1e-30))
    x, y, z = axis_angle.unbind(-1)
    zero = torch.zeros_like(x)
    k = torch.stack([zero, -z, y, z, zero, -x, -y, x, zero], -1).reshape(*axis_angle.shape[:-1], 3, 3)
    eye = torch.eye(3, dtype=axis_angle.dtype, device=axis_angle.device)
    return eye + sin_a[..., None] * k + cos_a[..., None] * (k @ k)


def matrix_to_axis_angle(rotation: np.ndarray) -> np.ndarray:
    """(3, 3) rotation matrix -> axis-angle (3,), numpy."""
    rotation = np.asarray(rotation, dtype=np.float64)
    cos = np.clip((np.trace(rotation) - 1) / 2, -1.0, 1.0)
    angle = np.arccos(cos)
    vec = np.array([rotation[2, 1] - rotation[1, 2], rotation[0, 2] - rotation[2, 0],
                    rotation[1, 0] - rotation[0, 1]])
    if angle < 1e-6:
        return vec / 2
    if np.pi - angle < 1e-4:                # near 180 degrees: axis from the symmetric part
        axis = np.sqrt(np.clip((np.diag(rotation) + 1) / 2, 0, None))
        signs = np.sign(vec)
        axis = axis * np.where(signs == 0, 1, signs)
        return axis / np.linalg.norm(axis) * angle
    return vec / (2 * np.sin(angle)) * angle


@dataclass
class FlamePose:
    """Codes for one posed face; tensors with a leading batch dimension B."""
    shape: torch.Tensor           # (B, n_shape)
    expression: torch.Tensor      # (B, n_expression)
    global_pose: torch.Tensor     # (B, 3) axis-angle about the root joint
    jaw_pose: torch.Tensor        # (B, 3)
    neck_pose: torch.Tensor | None = None   # (B, 3)
    eye_pose: torch.Tensor | None = None    # (B, 6)

    def full_pose(self) -> torch.Tensor:
        b = self.shape.shape[0]
        zeros = self.shape.new_zeros(b, 3)
        neck = self.neck_pose if self.neck_pose is not None else zeros
        eyes = self.eye_pose if self.eye_pose is not None else self.shape.new_zeros(b, 6)
        return torch.cat([self.global_pose, neck, self.jaw_pose, eyes], -1).reshape(b, 5, 3)


class FlameModel:
    """A loaded FLAME model with its landmark embedding.

    ``n_shape`` and ``n_expression`` choose how many leading components are used (the
    fits use 100 and 50, as DECA does, by default).
    """

    def __init__(self, arrays: dict[str, np.ndarray], lmk_faces: np.ndarray, lmk_bary: np.ndarray,
                 landmark_layout: str, n_shape: int = 100, n_expression: int = 50, name: str = "flame",
                 dtype: torch.dtype = torch.float64):
        total = arrays["shapedirs"].shape[2]
        self.max_expression = total - SHAPE_COMPONENTS
        if not 1 <= n_shape <= SHAPE_COMPONENTS:
            raise ValueError(f"n_shape must be 1..{SHAPE_COMPONENTS}, got {n_shape}")
        if not 0 <= n_expression <= self.max_expression:
            raise ValueError(f"n_expression must be 0..{self.max_expression} for {name}, got {n_expression}")
        self.name, self.n_shape, self.n_expression = name, n_shape, n_expression
        self.landmark_layout = landmark_layout
        t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=dtype)
        dirs = np.concatenate([arrays["shapedirs"][:, :, :n_shape],
                               arrays["shapedirs"][:, :, SHAPE_COMPONENTS:SHAPE_COMPONENTS + n_expression]], 2)
        self.v_template = t(arrays["v_template"])                       # (V, 3)
        self.dirs = t(dirs)                                              # (V, 3, S+E)
        v = self.v_template.shape[0]
        self.posedirs = t(arrays["posedirs"]).reshape(v * 3, -1).T.contiguous()   # (36, V*3)
        self.j_regressor = t(arrays["J_regressor"])                     # (5, V)
        self.weights = t(arrays["weights"])                              # (V, 5)
        parents = np.asarray(arrays["kintree_table"])[0].astype(np.int64)
        parents[0] = -1
        self.parents = parents.tolist()
        self.faces = torch.as_tensor(np.asarray(arrays["f"], dtype=np.int64))
        if lmk_faces.max(initial=0) >= len(self.faces):
            raise ValueError(f"{name}: the landmark embedding names face {int(lmk_faces.max())}, "
                             f"the model has {len(self.faces)} faces: they are not from the same FLAME")
        self.lmk_faces = torch.as_tensor(lmk_faces)
        self.lmk_bary = t(lmk_bary)
        # landmark vertices only: fitting skins these few instead of all 5023
        self.lmk_vertex_ids, inverse = torch.unique(self.faces[self.lmk_faces].reshape(-1), return_inverse=True)
        self.lmk_corner_index = inverse.reshape(-1, 3)
        self.j_template = self.j_regressor @ self.v_template                          # (5, 3)
        self.j_dirs = torch.einsum("jv,vcl->jcl", self.j_regressor, self.dirs)       # (5, 3, S+E)

    @classmethod
    def from_files(cls, model_path: str, embedding_path: str, **kwargs) -> "FlameModel":
        import os
        arrays = load_model_arrays(model_path)
        faces, bary, layout = load_landmark_embedding(embedding_path)
        kwargs.setdefault("name", os.path.basename(model_path))
        return cls(arrays, faces, bary, layout, **kwargs)

    @property
    def dtype(self) -> torch.dtype:
        return self.v_template.dtype

    @property
    def landmark_count(self) -> int:
        return len(self.lmk_faces)

    def _codes(self, pose: FlamePose) -> torch.Tensor:
        def fit(x, n):
            x = x.to(self.dtype)
            if x.shape[-1] >= n:
                return x[..., :n]
            return torch.cat([x, x.new_zeros(*x.shape[:-1], n - x.shape[-1])], -1)
        return torch.cat([fit(pose.shape, self.n_shape), fit(pose.expression, self.n_expression)], -1)

    def _skin(self, pose: FlamePose, vertex_ids: torch.Tensor | None) -> torch.Tensor:
        codes = self._codes(pose)                                       # (B, S+E)
        b = codes.shape[0]
        rows = slice(None) if vertex_ids is None else vertex_ids
        v_template = self.v_template[rows]
        v_shaped = v_template + torch.einsum("bl,vcl->bvc", codes, self.dirs[rows])
        joints = self.j_template + torch.einsum("bl,jcl->bjc", codes, self.j_dirs)   # (B, 5, 3)
        rotations = axis_angle_to_matrix(pose.full_pose().to(self.dtype))            # (B, 5, 3, 3)
        eye = torch.eye(3, dtype=self.dtype)
        pose_feature = (rotations[:, 1:] - eye).reshape(b, -1)                       # (B, 36)
        posedirs = self.posedirs.reshape(-1, self.v_template.shape[0], 3)[:, rows]   # (36, v, 3)
        v_posed = v_shaped + torch.einsum("bp,pvc->bvc", pose_feature, posedirs)
        # world transforms of the kinematic chain, then relative to each joint's rest position
        world_r, world_t = [rotations[:, 0]], [joints[:, 0]]
        for j in range(1, len(self.parents)):
            p = self.parents[j]
            world_r.append(world_r[p] @ rotations[:, j])
            world_t.append(world_t[p] + (world_r[p] @ (joints[:, j] - joints[:, p])[..., None])[..., 0])
        world_r = torch.stack(world_r, 1)                                # (B, 5, 3, 3)
        world_t = torch.stack(world_t, 1)                                # (B, 5, 3)
        rest_t = world_t - (world_r @ joints[..., None])[..., 0]
        weights = self.weights[rows]                                     # (v, 5)
        blend_r = torch.einsum("vj,bjxy->bvxy", weights, world_r)
        blend_t = torch.einsum("vj,bjx->bvx", weights, rest_t)
        return (blend_r @ v_posed[..., None])[..., 0] + blend_t

    def vertices(self, pose: FlamePose) -> torch.Tensor:
        """All posed vertices (B, V, 3)."""
        return self._skin(pose, None)

    def landmarks_from_vertices(self, vertices: torch.Tensor) -> torch.Tensor:
        corners = vertices[:, self.faces[self.lmk_faces]]                # (B, K, 3, 3)
        return (corners * self.lmk_bary[None, :, :, None]).sum(2)

    def landmarks(self, pose: FlamePose) -> torch.Tensor:
        """The posed 3D landmarks (B, K, 3), skinning only the vertices they need."""
        verts = self._skin(pose, self.lmk_vertex_ids)
        corners = verts[:, self.lmk_corner_index]                        # (B, K, 3, 3)
        return (corners * self.lmk_bary[None, :, :, None]).sum(2)

    def neutral(self, batch: int = 1) -> FlamePose:
        z = lambda n: torch.zeros(batch, n, dtype=self.dtype)
        return FlamePose(z(self.n_shape), z(self.n_expression), z(3), z(3))

    def describe(self) -> str:
        return (f"FLAME {self.name}: {self.v_template.shape[0]} vertices, shape {self.n_shape}/"
                f"{SHAPE_COMPONENTS}, expression {self.n_expression}/{self.max_expression}, "
                f"{self.landmark_count} landmarks ({self.landmark_layout})")
