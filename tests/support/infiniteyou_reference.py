"""The authors' InfiniteYou code (bytedance/InfiniteYou, vendored archive), unpacked into the test cache and
imported as the reference; nothing of it is copied into the product.

- ``reference_module(name)``: ``pipelines.resampler`` or ``pipelines.pipeline_flux_infusenet`` of the archive
  (the latter imports ``diffusers.models.controlnet_flux``, which newer diffusers moved to
  ``diffusers.models.controlnets.controlnet_flux``: the same module is registered under the old name);
- ``reference_resampler(...)``: their Resampler with random weights (every parameter) and its state dict as
  ``image_proj_model.bin`` holds it (``{"image_proj": ...}``);
- ``draw_kps``, ``resize_and_pad_image``: their keypoint drawing and canvas fit, from
  ``pipelines/pipeline_infu_flux.py`` (its other imports, which download or need CUDA-only packages, are given
  empty stand-ins while it is imported);
- ``authors_arcface_embedding()``: their ``extract_arcface_bgr_embedding`` (same file) compiled alone, with the
  installed insightface's ``face_align`` (``insightface_face_align()``, imported without insightface's
  ``__init__``), run on the CPU.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from pathlib import Path

import torch

from .assets import unpacked_vendor_archive

ARCHIVE = Path(__file__).resolve().parents[2].parent / "shared" / "vendor" / "InfiniteYou-aaa6ea5f.tar.gz"
COMMIT = "aaa6ea5f"
# a tiny Resampler: 64 channels per head, as published (1280 = 20 x 64)
TINY = dict(dim=128, depth=2, dim_head=64, heads=2, num_queries=8, embedding_dim=512, output_dim=48, ff_mult=4)


def source_root() -> Path:
    return unpacked_vendor_archive(ARCHIVE, f"InfiniteYou-{COMMIT}", "InfiniteYou/pipelines/resampler.py") / "InfiniteYou"


def reference_module(name: str):
    root = str(source_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    if name.startswith("pipelines.pipeline_") and "diffusers.models.controlnet_flux" not in sys.modules:
        try:
            importlib.import_module("diffusers.models.controlnet_flux")
        except ImportError:
            sys.modules["diffusers.models.controlnet_flux"] = importlib.import_module(
                "diffusers.models.controlnets.controlnet_flux")
    return importlib.import_module(name)


def draw_kps():
    """The authors' ``draw_kps`` (OpenCV)."""
    return infu_pipeline_module().draw_kps


def resize_and_pad_image():
    """The authors' ``resize_and_pad_image`` (PIL)."""
    return infu_pipeline_module().resize_and_pad_image


def infu_pipeline_module():
    """Their ``pipelines/pipeline_infu_flux.py``, imported with stand-ins for its imports that this environment
    lacks (facexlib, optimum-quanto, ...); the stand-ins are removed again right after."""
    import importlib.machinery
    name = "pipelines.pipeline_infu_flux"
    if name in sys.modules:
        return sys.modules[name]
    added = []
    for missing in ("facexlib", "facexlib.recognition", "optimum", "optimum.quanto", "insightface",
                    "insightface.app", "insightface.utils", "huggingface_hub", "transformers"):
        if missing in sys.modules or importlib.util.find_spec(missing.split(".")[0]) is not None and \
                _importable(missing):
            continue
        stub = types.ModuleType(missing)
        stub.__spec__ = importlib.machinery.ModuleSpec(missing, None)
        for attr in ("init_recognition_model", "freeze", "qint8", "quantize", "FaceAnalysis", "face_align",
                     "snapshot_download", "T5EncoderModel"):
            setattr(stub, attr, None)
        sys.modules[missing] = stub
        added.append(missing)
    try:
        return reference_module(name)
    finally:
        for missing in added:
            sys.modules.pop(missing, None)


def _importable(name: str) -> bool:
    try:
        importlib.import_module(name)
        return True
    except Exception:
        return False


def randomise(module: torch.nn.Module, seed: int, scale: float = 1.0) -> torch.nn.Module:
    """Every parameter random: matrices ~ N(0, 1/fan_in), norm weights ~ 1 +- 0.1, other vectors ~ +- 0.1."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                p.copy_(torch.randn(p.shape, generator=generator) * scale * p[0].numel() ** -0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=generator))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=generator))
    return module.eval()


def reference_resampler(seed: int = 0, **sizes):
    """(their Resampler with random weights, ``{"image_proj": state dict}`` as image_proj_model.bin holds it)."""
    resampler = reference_module("pipelines.resampler").Resampler(**{**TINY, **sizes})
    randomise(resampler, seed)
    return resampler, {"image_proj": {k: v.clone() for k, v in resampler.state_dict().items()}}


def arcface(photos: int, seed: int = 1) -> torch.Tensor:
    """Random L2-normalised ArcFace embeddings (photos, 512), as facexlib's recogniser returns them."""
    e = torch.randn(photos, 512, generator=torch.Generator().manual_seed(seed))
    return e / e.norm(dim=-1, keepdim=True)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def authors_arcface_embedding():
    """The authors' ``extract_arcface_bgr_embedding`` (``pipelines/pipeline_infu_flux.py``: insightface's
    ``face_align.norm_crop`` to 112 px of the BGR photo, ``/ 255``, ``2x - 1``, the recogniser, its first row),
    compiled from the archive's source with insightface's own ``face_align`` and run on the CPU (its ``.cuda()``
    dropped)."""
    import numpy as np
    from .facexlib_reference import source_function
    namespace = {"np": np, "torch": torch, "face_align": insightface_face_align(), "init_recognition_model": None}
    return source_function(source_root() / "pipelines" / "pipeline_infu_flux.py", "extract_arcface_bgr_embedding",
                           namespace)


def insightface_face_align():
    """The installed insightface's ``utils/face_align.py`` (``norm_crop``: scikit-image's similarity estimate and
    OpenCV's warp), imported on its own: insightface's package ``__init__`` (onnxruntime, ...) is not run.
    ``None`` where insightface, OpenCV or scikit-image is not installed."""
    name = "insightface_reference_face_align"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.find_spec("insightface")
    if spec is None or not spec.submodule_search_locations or any(
            importlib.util.find_spec(m) is None for m in ("cv2", "skimage")):
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "utils" / "face_align.py"
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    sys.modules[name] = module
    return module
