"""facexlib's BiSeNet face parsing network (the code behind ``parsing_bisenet.pth``) and the PuLID authors'
background rule, as references for the tests; nothing of either is copied into the product.

- ``reference_bisenet_module()``: ``facexlib/parsing/bisenet.py`` (with its ``resnet.py``) of the pinned wheel,
  fetched once with ``pip download --no-deps`` from PyPI into the test cache (sha256 checked) and imported on
  its own: facexlib's package ``__init__`` (cv2, numba, filterpy) is never run, and none of its dependencies
  is installed;
- ``authors_whitening()``: the lines of the authors' ``get_id_embedding`` (vendored PuLID archive,
  ``pulid/pipeline_flux.py``) from the parsing call to the grey face on white, with their ``to_gray``,
  compiled from the archive's source and run on a given parsing model.
"""
from __future__ import annotations

import ast
import hashlib
import importlib
import shutil
import subprocess
import sys
import tempfile
import types
import zipfile
from pathlib import Path

import torch

from .assets import AssetError, cache_dir
from .pulid_reference import source_root

FACEXLIB = "facexlib==0.3.0"
FACEXLIB_WHEEL = "facexlib-0.3.0-py3-none-any.whl"
FACEXLIB_SHA256 = "245d58861537b820c616e8b3ef618ccfad2a24724a2d74be2b0542643c01a878"
PARSING_FILES = ("bisenet.py", "resnet.py")
PACKAGE = "facexlib_reference_parsing"        # imported under this name, never as ``facexlib``


def facexlib_parsing_sources() -> Path:
    """A folder holding facexlib 0.3.0's ``parsing/bisenet.py`` and ``parsing/resnet.py`` (fetched once)."""
    target = cache_dir() / "vendor" / "facexlib-0.3.0" / "parsing"
    if all((target / name).is_file() for name in PARSING_FILES):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--only-binary", ":all:", FACEXLIB, "-d", tmp]
        done = subprocess.run(cmd, capture_output=True, text=True)
        wheel = Path(tmp) / FACEXLIB_WHEEL
        if done.returncode != 0 or not wheel.is_file():
            raise AssetError(f"could not fetch facexlib's wheel ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != FACEXLIB_SHA256:
            raise AssetError(f"{FACEXLIB_WHEEL}: sha256 {digest} is not the pinned {FACEXLIB_SHA256}")
        staging = Path(tmp) / "parsing"
        staging.mkdir()
        with zipfile.ZipFile(wheel) as archive:
            for name in PARSING_FILES:
                (staging / name).write_bytes(archive.read(f"facexlib/parsing/{name}"))
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(staging), str(target))
    return target


def reference_bisenet_module():
    """facexlib's ``parsing/bisenet.py`` as a module (its ``from .resnet import ResNet18`` resolves to the
    wheel's ``resnet.py``)."""
    if PACKAGE not in sys.modules:
        package = types.ModuleType(PACKAGE)
        package.__path__ = [str(facexlib_parsing_sources())]
        sys.modules[PACKAGE] = package
    return importlib.import_module(f"{PACKAGE}.bisenet")


def randomise_all(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Every parameter and batch-norm statistic random: convolutions ~ N(0, 1/fan_in), norm weights and
    running variances ~ 1 + 0.1 |N|, norm biases and running means ~ 0.1 N."""
    with torch.no_grad():
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if name.endswith("num_batches_tracked"):
                continue
            if tensor.ndim >= 2:
                fan_in = tensor[0].numel()
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * fan_in ** -0.5)
            elif name.endswith(("weight", "running_var")):
                tensor.copy_(1.0 + 0.1 * torch.randn(tensor.shape, generator=generator).abs())
            else:
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))


def reference_bisenet(seed: int = 0, num_class: int = 19):
    """(facexlib's BiSeNet in eval mode with every weight random, its state dict as ``parsing_bisenet.pth``
    holds it: ``model.state_dict()`` saved by ``torch.save``)."""
    model = reference_bisenet_module().BiSeNet(num_class=num_class)
    randomise_all(model, torch.Generator().manual_seed(seed))
    return model.eval(), {k: v.clone() for k, v in model.state_dict().items()}


def _authors_get_id_embedding() -> ast.FunctionDef:
    tree = ast.parse((source_root() / "pulid" / "pipeline_flux.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "get_id_embedding":
            return node
    raise AssertionError("the PuLID archive's pipeline_flux.py has no get_id_embedding")


def _authors_function(name: str):
    tree = ast.parse((source_root() / "pulid" / "pipeline_flux.py").read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            namespace = {"torch": torch}
            exec(compile(ast.Module(body=[node], type_ignores=[]), f"PuLID pipeline_flux.py:{name}", "exec"),
                 namespace)
            return namespace[name]
    raise AssertionError(f"the PuLID archive's pipeline_flux.py has no {name}")


def authors_whitening(parse: torch.nn.Module):
    """A function: aligned faces (B, 3, S, S) RGB in [0, 1] -> (labels (B, 1, S, S), the grey face on white)
    computed by the authors' own statements of ``get_id_embedding``, from ``parsing_out = ...face_parse(...)``
    to ``face_features_image = torch.where(...)``, with ``parse`` as ``self.face_helper.face_parse``."""
    from torchvision.transforms.functional import normalize
    body = _authors_get_id_embedding().body

    def assigns(statement, name):
        return isinstance(statement, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name
                                                         for t in statement.targets)
    start = next(i for i, s in enumerate(body) if assigns(s, "parsing_out"))
    end = next(i for i, s in enumerate(body) if i > start and assigns(s, "face_features_image"))
    code = compile(ast.Module(body=body[start:end + 1], type_ignores=[]), "PuLID get_id_embedding (parsing)", "exec")
    to_gray = _authors_function("to_gray")

    def run(faces: torch.Tensor):
        pipeline = types.SimpleNamespace(face_helper=types.SimpleNamespace(face_parse=parse))
        pipeline.to_gray = lambda img: to_gray(pipeline, img)
        namespace = {"torch": torch, "normalize": normalize, "self": pipeline, "input": faces}
        with torch.no_grad():
            exec(code, namespace)
        return namespace["parsing_out"], namespace["face_features_image"]
    return run
