"""A synthetic FLAME for the tests: FLAME's file layouts and array shapes, made-up values.

FLAME is licensed and never shipped, so the tests write a stand-in with the official
layout: ``generic_model.pkl`` (a Python-2-style pickle of chumpy arrays with a scipy CSC
joint regressor, as FLAME 2020 ships it), DECA's ``landmark_embedding.npy`` (a pickled
dict inside a .npy) and FLAME's ``flame_static_embedding.pkl``. Neither chumpy nor scipy
is needed: their classes are imitated under their import names while pickling. The
geometry is a head-shaped point cloud whose landmark triangles sit on an authored
generic face, so rendered landmarks look like a face and the jaw opens the mouth.
"""
from __future__ import annotations

import pickle
import sys
import types
from contextlib import contextmanager
from pathlib import Path

import numpy as np

VERTICES, FACES, JOINTS, COMPONENTS = 5023, 9976, 5, 400
# iBUG landmark groups that the first 3 x 8 synthetic expression components translate (1 mm per unit)
EXPRESSION_REGIONS = ([48, 60], [54, 64], [49, 50, 51, 52, 53, 61, 62, 63], [55, 56, 57, 58, 59, 65, 66, 67],
                      list(range(17, 22)), list(range(22, 27)), [40, 41], [46, 47])
MM = 1e-3


class Ch:
    """Pickles like a leaf ``chumpy.ch.Ch``: its state is a dict with the array as ``x``."""

    def __init__(self, array):
        self.x = np.asarray(array)

    def __getstate__(self):
        return {"x": self.x}


class csc_matrix:  # noqa: N801 - scipy's class name, which the pickle records
    def __init__(self, dense):
        dense = np.asarray(dense)
        cols = [np.nonzero(dense[:, c])[0] for c in range(dense.shape[1])]
        self._shape = dense.shape
        self.indices = np.concatenate(cols).astype(np.int32)
        self.indptr = np.concatenate([[0], np.cumsum([len(c) for c in cols])]).astype(np.int32)
        self.data = np.concatenate([dense[c, i] for i, c in enumerate(cols)])
        self.format, self.maxprint = "csc", 50

    def __getstate__(self):
        return dict(self.__dict__)


@contextmanager
def _imitated_modules():
    made = {"chumpy": types.ModuleType("chumpy"), "chumpy.ch": types.ModuleType("chumpy.ch")}
    made["chumpy.ch"].Ch = Ch
    sparse = types.ModuleType("scipy.sparse.csc")
    sparse.csc_matrix = csc_matrix
    saved = {name: sys.modules.get(name) for name in (*made, "scipy.sparse.csc")}
    Ch.__module__, csc_matrix.__module__ = "chumpy.ch", "scipy.sparse.csc"
    sys.modules.update(made)
    sys.modules["scipy.sparse.csc"] = sparse
    try:
        yield
    finally:
        Ch.__module__ = csc_matrix.__module__ = __name__
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module


def synthetic_flame_arrays(seed: int = 0):
    """(model arrays, landmark faces (68,), barycentric coordinates (68, 3))."""
    from omniid.encoders.flame.mean_face import LOWER_FACE, MEAN_FACE_68
    rng = np.random.default_rng(seed)
    v_template = np.empty((VERTICES, 3))
    # three vertices per landmark around the authored face point
    face_points = MEAN_FACE_68
    for k, point in enumerate(face_points):
        v_template[3 * k:3 * k + 3] = point + rng.normal(0, 0.8, (3, 3))
    # joint anchors: root, neck, jaw hinge, eyes
    anchors = np.array([[0, -60, -80], [0, -50, -80], [0, -8, -72], [-31, 33, -45], [31, 33, -45]], float)
    first_anchor = 3 * len(face_points)
    v_template[first_anchor:first_anchor + JOINTS] = anchors
    rest = np.arange(first_anchor + JOINTS, VERTICES)
    direction = rng.normal(size=(len(rest), 3))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    v_template[rest] = np.array([0, 10, -70]) + direction * np.array([80, 110, 95])
    v_template *= MM

    faces = rng.integers(0, VERTICES, size=(FACES, 3))
    lmk_faces = np.arange(68) * 97 + 11
    faces[lmk_faces] = np.arange(68 * 3).reshape(68, 3)
    bary = rng.uniform(0.2, 1.0, size=(68, 3))
    bary /= bary.sum(1, keepdims=True)

    j_regressor = np.zeros((JOINTS, VERTICES))
    j_regressor[np.arange(JOINTS), first_anchor + np.arange(JOINTS)] = 1.0
    weights = np.zeros((VERTICES, JOINTS))
    weights[:, 1] = 1.0                                     # the head follows the neck
    jaw_vertices = np.concatenate([np.arange(3 * k, 3 * k + 3) for k in LOWER_FACE])
    weights[jaw_vertices] = 0.0
    weights[jaw_vertices, 2] = 1.0
    weights[first_anchor] = np.eye(JOINTS)[0]
    expression = rng.normal(0, 0.3, (VERTICES, 3, COMPONENTS - 300))
    # like FLAME's, the leading expression components move facial regions coherently
    for r, region in enumerate(EXPRESSION_REGIONS):
        vertices = np.concatenate([np.arange(3 * k, 3 * k + 3) for k in region])
        for axis in range(3):
            expression[:, :, 3 * r + axis] *= 0.1
            expression[vertices, axis, 3 * r + axis] += 1.0
    shapedirs = np.concatenate([rng.normal(0, 0.15, (VERTICES, 3, 300)), expression], 2) * MM
    posedirs = rng.normal(0, 0.2, (VERTICES, 3, (JOINTS - 1) * 9)) * MM
    kintree = np.array([[2 ** 32 - 1, 0, 1, 1, 1], [0, 1, 2, 3, 4]], dtype=np.int64)
    arrays = {"v_template": v_template, "shapedirs": shapedirs, "posedirs": posedirs,
              "J_regressor": j_regressor, "weights": weights, "kintree_table": kintree, "f": faces.astype(np.uint32)}
    return arrays, lmk_faces, bary


def write_synthetic_flame(folder: Path, seed: int = 0) -> dict[str, Path]:
    """Writes the stand-in FLAME files into ``folder``; returns their paths by role."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays, lmk_faces, bary = synthetic_flame_arrays(seed)
    model = {k: Ch(v) for k, v in arrays.items() if k not in ("J_regressor", "kintree_table", "f")}
    model.update(J_regressor=csc_matrix(arrays["J_regressor"]), kintree_table=arrays["kintree_table"],
                 f=arrays["f"], bs_style="lbs", bs_type="lrotmin", J=Ch(arrays["J_regressor"] @ arrays["v_template"]))
    static = slice(17, 68)
    deca = {"full_lmk_faces_idx": lmk_faces[None], "full_lmk_bary_coords": bary[None],
            "static_lmk_faces_idx": lmk_faces[static], "static_lmk_bary_coords": bary[static],
            "dynamic_lmk_faces_idx": np.tile(lmk_faces[:17], (79, 1))[:, :17],
            "dynamic_lmk_bary_coords": np.tile(bary[:17][None], (79, 1, 1))}
    paths = {"model": folder / "generic_model.pkl", "embedding": folder / "landmark_embedding.npy",
             "static_embedding": folder / "flame_static_embedding.pkl"}
    with _imitated_modules():
        with open(paths["model"], "wb") as f:
            pickle.dump(model, f, protocol=2)
        with open(paths["static_embedding"], "wb") as f:
            pickle.dump({"lmk_face_idx": lmk_faces[static], "lmk_b_coords": Ch(bary[static])}, f, protocol=1)
    np.save(paths["embedding"], np.array(deca, dtype=object), allow_pickle=True)
    return paths
