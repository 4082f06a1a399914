"""facexlib's BiSeNet face parsing network (the code behind ``parsing_bisenet.pth``), its IR-SE50 ArcFace (the
code behind ``recognition_arcface_ir_se50.pth``) and the PuLID authors' background rule, as references for the
tests; nothing of them is copied into the product.

- ``reference_bisenet_module()``: ``facexlib/parsing/bisenet.py`` (with its ``resnet.py``) of the pinned wheel,
  fetched once with ``pip download --no-deps`` from PyPI into the test cache (sha256 checked) and imported on
  its own: facexlib's package ``__init__`` (cv2, numba, filterpy) is never run, and none of its dependencies
  is installed;
- ``reference_arcface_module()``: the same wheel's ``facexlib/recognition/arcface_arch.py`` (it imports only
  torch), without ``recognition/__init__.py``; ``init_recognition_model()`` is that ``__init__``'s loader,
  compiled from the wheel's source and run on the CPU with a given file instead of its download;
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
RECOGNITION_FILES = ("arcface_arch.py", "__init__.py")    # the __init__ is read as source, never imported
PACKAGE = "facexlib_reference_parsing"        # imported under this name, never as ``facexlib``
RECOGNITION_PACKAGE = "facexlib_reference_recognition"


def facexlib_parsing_sources() -> Path:
    """A folder holding facexlib 0.3.0's ``parsing/bisenet.py`` and ``parsing/resnet.py`` (fetched once)."""
    return facexlib_sources("parsing", PARSING_FILES)


def facexlib_sources(folder: str, files: tuple) -> Path:
    """A folder holding ``files`` of facexlib 0.3.0's ``facexlib/<folder>/`` (the wheel fetched once)."""
    target = cache_dir() / "vendor" / "facexlib-0.3.0" / folder
    if all((target / name).is_file() for name in files):
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
        staging = Path(tmp) / folder
        staging.mkdir()
        with zipfile.ZipFile(wheel) as archive:
            for name in files:
                (staging / name).write_bytes(archive.read(f"facexlib/{folder}/{name}"))
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


def reference_arcface_module():
    """facexlib's ``recognition/arcface_arch.py`` as a module (``Backbone``, ``bottleneck_IR_SE``, ...)."""
    if RECOGNITION_PACKAGE not in sys.modules:
        package = types.ModuleType(RECOGNITION_PACKAGE)
        package.__path__ = [str(facexlib_sources("recognition", RECOGNITION_FILES))]
        sys.modules[RECOGNITION_PACKAGE] = package
    return importlib.import_module(f"{RECOGNITION_PACKAGE}.arcface_arch")


class _OnTheCpu(ast.NodeTransformer):
    """``x.to('cuda')`` and ``x.cuda()`` become ``x`` (the reference code is run here on the CPU)."""

    def visit_Call(self, node):
        self.generic_visit(node)
        f = node.func
        if isinstance(f, ast.Attribute) and not node.keywords and (
                (f.attr == "cuda" and not node.args) or
                (f.attr == "to" and len(node.args) == 1 and isinstance(node.args[0], ast.Constant)
                 and node.args[0].value == "cuda")):
            return f.value
        return node


def source_function(path: Path, name: str, namespace: dict):
    """The function ``name`` of the Python file ``path``, compiled from its source with ``namespace`` as its
    globals, its ``.cuda()`` / ``.to('cuda')`` calls dropped."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            module = ast.fix_missing_locations(_OnTheCpu().visit(ast.Module(body=[node], type_ignores=[])))
            exec(compile(module, f"{path.name}:{name}", "exec"), namespace)
            return namespace[name]
    raise AssertionError(f"{path} has no {name}")


def init_recognition_model(path: Path):
    """facexlib's own ``init_recognition_model('arcface', device='cpu')`` (its ``Backbone(num_layers=50,
    drop_ratio=0.6, mode='ir_se')``, ``load_state_dict(torch.load(file), strict=True)``), reading ``path``
    where it downloads ``recognition_arcface_ir_se50.pth``."""
    namespace = {"torch": torch, "Backbone": reference_arcface_module().Backbone,
                 "load_file_from_url": lambda url, **kwargs: str(path)}
    source = facexlib_sources("recognition", RECOGNITION_FILES) / "__init__.py"
    return source_function(source, "init_recognition_model", namespace)("arcface", device="cpu")


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


def reference_arcface(seed: int = 0):
    """(facexlib's IR-SE50 as ``init_recognition_model`` builds it, in eval mode with every parameter and batch-norm
    statistic random and PReLU slopes ~ 0.25 +- 0.1, its state dict as ``recognition_arcface_ir_se50.pth`` is
    keyed: ``model.state_dict()``, which facexlib loads with ``strict=True`` and no renaming)."""
    model = reference_arcface_module().Backbone(num_layers=50, drop_ratio=0.6, mode="ir_se")
    generator = torch.Generator().manual_seed(seed)
    randomise_all(model, generator)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.PReLU):
                module.weight.copy_(0.25 + 0.1 * torch.randn(module.weight.shape, generator=generator))
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
