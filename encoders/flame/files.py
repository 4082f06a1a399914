"""Reading the user's FLAME files in their official layouts, without unsafe unpickling.

FLAME's model (``generic_model.pkl`` of FLAME 2020, ``flame2023.pkl``) is a Python 2
pickle of chumpy arrays and a scipy sparse joint regressor; its landmark embeddings are
a pickle (``flame_static_embedding.pkl``) or a NumPy file holding a pickled dict
(``landmark_embedding.npy`` of DECA). A general unpickler would run whatever code a file
names, so these files are read by an unpickler that builds only plain arrays: numpy's own
array reconstruction, and stand-ins for chumpy's ``Ch`` and scipy's CSC/CSR matrices
that keep their data and nothing else. Anything else a file asks for is refused with
the file's name. ``.npz`` files with the same keys are read without pickle at all.
"""
from __future__ import annotations

import copyreg
import io
import os
import pickle
import zipfile

import numpy as np

MODEL_KEYS = ("v_template", "shapedirs", "posedirs", "J_regressor", "weights", "kintree_table", "f")
VERTICES = 5023
JOINTS = 5


class FlameFileError(ValueError):
    """A FLAME file that cannot be used; the message names the file and the problem."""


class _ChumpyArray:
    """Stands in for ``chumpy.ch.Ch``: a leaf Ch pickles its array as ``x``."""

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}

    def to_numpy(self, name: str) -> np.ndarray:
        if "x" not in self.state:
            raise FlameFileError(f"{name} is a chumpy expression, not a stored array")
        return np.asarray(self.state["x"])


class _SparseMatrix:
    """Stands in for scipy's CSC/CSR matrices (the joint regressor); densified on use."""
    compressed_axis = 1

    def __setstate__(self, state):
        self.state = state if isinstance(state, dict) else {}

    def to_numpy(self, name: str) -> np.ndarray:
        s = self.state
        shape = tuple(s.get("_shape", s.get("shape", ())))
        if len(shape) != 2 or not all(k in s for k in ("data", "indices", "indptr")):
            raise FlameFileError(f"{name} is a sparse matrix without data, indices, indptr and shape")
        data, indices, indptr = (np.asarray(s[k]) for k in ("data", "indices", "indptr"))
        dense = np.zeros(shape, dtype=np.float64)
        for major in range(len(indptr) - 1):
            rows = slice(int(indptr[major]), int(indptr[major + 1]))
            if self.compressed_axis == 1:
                dense[indices[rows], major] = data[rows]
            else:
                dense[major, indices[rows]] = data[rows]
        return dense


class _CsrMatrix(_SparseMatrix):
    compressed_axis = 0


def _numpy_callable(name: str):
    try:
        from numpy._core import multiarray, numeric
    except ImportError:                     # numpy 1.x
        from numpy.core import multiarray, numeric
    return {"_reconstruct": multiarray._reconstruct, "scalar": multiarray.scalar,
            "_frombuffer": numeric._frombuffer}[name]


def _allowed(module: str, name: str):
    if (module, name) in {("copy_reg", "_reconstructor"), ("copyreg", "_reconstructor")}:
        return copyreg._reconstructor
    if (module, name) in {("__builtin__", "object"), ("builtins", "object")}:
        return object
    if (module, name) == ("_codecs", "encode"):     # bytes in protocol-2 pickles written by Python 3
        import codecs
        return codecs.encode
    if module in {"numpy", "numpy.core.multiarray", "numpy._core.multiarray"} and name in {"ndarray", "dtype"}:
        return getattr(np, name)
    if module.startswith("numpy.") and module.split(".")[-1] in {"multiarray", "numeric"} \
            and name in {"_reconstruct", "scalar", "_frombuffer"}:
        return _numpy_callable(name)
    if module.startswith("numpy") and name.endswith("DType") and hasattr(np.dtypes, name):
        return getattr(np.dtypes, name)
    if module.startswith("chumpy") and name == "Ch":
        return _ChumpyArray
    if module.startswith("scipy.sparse") and name == "csc_matrix":
        return _SparseMatrix
    if module.startswith("scipy.sparse") and name == "csr_matrix":
        return _CsrMatrix
    return None


class ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists and numbers, numpy arrays, chumpy leaves and sparse matrices only."""

    def __init__(self, stream, source: str):
        super().__init__(stream, encoding="latin1")
        self.source = source

    def find_class(self, module, name):
        found = _allowed(module, name)
        if found is None:
            raise FlameFileError(
                f"{self.source}: refuses to load '{module}.{name}': FLAME files hold arrays only, "
                "so this is not a FLAME file (or it was re-saved with other objects).")
        return found


def _plain(value, name: str):
    """Stand-ins and nested containers to numpy arrays."""
    if isinstance(value, (_ChumpyArray, _SparseMatrix)):
        return value.to_numpy(name)
    if isinstance(value, dict):
        return {str(k): _plain(v, f"{name}.{k}") for k, v in value.items()}
    return value


def read_arrays(path: str) -> dict:
    """A FLAME file's top-level dict with every value as plain data (arrays where stored)."""
    base = os.path.basename(path)
    if not os.path.isfile(path):
        raise FlameFileError(f"{base}: no such file ({path})")
    try:
        if path.endswith(".npz"):
            with np.load(path, allow_pickle=False) as data:
                return {k: data[k] for k in data.files}
        with open(path, "rb") as stream:
            if path.endswith(".npy"):
                value = _read_npy(stream, base)
            else:
                value = ArrayOnlyUnpickler(stream, base).load()
    except FlameFileError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, zipfile.BadZipFile, OSError) as err:
        raise FlameFileError(f"{base}: cannot be read ({err}); the file is truncated or not a FLAME file") from err
    if isinstance(value, np.ndarray) and value.dtype == object and value.shape == ():
        value = value.item()
    if not isinstance(value, dict):
        raise FlameFileError(f"{base}: holds a {type(value).__name__}, not the dict of arrays FLAME files hold")
    return _plain(value, base)


def _read_npy(stream, base: str):
    version = np.lib.format.read_magic(stream)
    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
    if read_header is None:
        raise FlameFileError(f"{base}: unsupported .npy version {version}")
    shape, fortran, dtype = read_header(stream)
    if dtype != object:
        count = int(np.prod(shape))
        array = np.frombuffer(stream.read(count * dtype.itemsize), dtype=dtype, count=count)
        return array.reshape(shape, order="F" if fortran else "C")
    return ArrayOnlyUnpickler(io.BytesIO(stream.read()), base).load()


def load_model_arrays(path: str) -> dict[str, np.ndarray]:
    """The FLAME model's arrays, checked against FLAME's layout."""
    base = os.path.basename(path)
    raw = read_arrays(path)
    missing = [k for k in MODEL_KEYS if k not in raw]
    if missing:
        hint = (" It looks like a landmark embedding; choose it as the landmark file."
                if any("lmk" in k for k in raw) else "")
        raise FlameFileError(f"{base}: not a FLAME model, it lacks {', '.join(missing)}.{hint}")
    arrays = {k: np.asarray(raw[k]) for k in MODEL_KEYS}
    v = arrays["v_template"].shape[0]
    expected = {
        "v_template": (v, 3), "shapedirs": (v, 3, None), "posedirs": (v, 3, (JOINTS - 1) * 9),
        "J_regressor": (JOINTS, v), "weights": (v, JOINTS), "kintree_table": (2, JOINTS), "f": (None, 3),
    }
    for key, shape in expected.items():
        got = arrays[key].shape
        if len(got) != len(shape) or any(s is not None and s != g for s, g in zip(shape, got)):
            want = "x".join("*" if s is None else str(s) for s in shape)
            raise FlameFileError(f"{base}: {key} has shape {got}, FLAME's layout is {want}")
    if arrays["shapedirs"].shape[2] <= 300:
        raise FlameFileError(f"{base}: shapedirs has {arrays['shapedirs'].shape[2]} components; FLAME has "
                             "300 shape components followed by its expression components")
    return arrays


def load_landmark_embedding(path: str) -> tuple[np.ndarray, np.ndarray, str]:
    """Faces and barycentric coordinates of the landmarks: (K,), (K, 3) and the layout name.

    The full 68-point iBUG embedding is used where the file has one (DECA's
    ``full_lmk_*``); otherwise the static 51 points (iBUG 17-67, without the jaw line).
    """
    base = os.path.basename(path)
    raw = read_arrays(path)
    for faces_key, bary_key, layout in (("full_lmk_faces_idx", "full_lmk_bary_coords", "ibug68"),
                                        ("lmk_faces_idx", "lmk_bary_coords", None),
                                        ("static_lmk_faces_idx", "static_lmk_bary_coords", "ibug51"),
                                        ("lmk_face_idx", "lmk_b_coords", None)):
        if faces_key in raw and bary_key in raw:
            faces = np.asarray(raw[faces_key]).reshape(-1).astype(np.int64)
            bary = np.asarray(raw[bary_key], dtype=np.float64).reshape(-1, 3)
            count = len(faces)
            layout = layout or {68: "ibug68", 51: "ibug51"}.get(count)
            if layout is None or len(bary) != count or count != int(layout[4:]):
                raise FlameFileError(f"{base}: {count} landmarks with {len(bary)} barycentric rows; "
                                     "expected the 68-point or the 51-point iBUG embedding")
            return faces, bary, layout
    if "v_template" in raw:
        raise FlameFileError(f"{base}: this is a FLAME model, not a landmark embedding; choose it as the model")
    raise FlameFileError(f"{base}: no landmark embedding in it (expected lmk_face_idx/lmk_b_coords, "
                         "or DECA's static_/full_lmk_faces_idx with bary coords)")
