"""The pack's structure: the rules of DESIGN.md that a file scan can check."""
import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = ("encoders", "guidance", "training")
PACK_PACKAGES = ("nodes", *CORE)
COMFY_MODULES = {"comfy", "comfy_api", "comfy_execution", "comfy_extras", "folder_paths", "server",
                 "execution", "nodes", "node_helpers", "latent_preview"}


def python_files(*folders):
    for folder in folders:
        yield from sorted((ROOT / folder).rglob("*.py"))


def imports(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield 0, alias.name
        elif isinstance(node, ast.ImportFrom):
            yield node.level, node.module or ""


def test_core_never_imports_comfyui():
    for path in python_files(*CORE):
        for level, module in imports(path):
            if level == 0:
                assert module.split(".")[0] not in COMFY_MODULES, f"{path.relative_to(ROOT)} imports {module}"


def test_pack_imports_its_own_modules_relatively():
    """The folder must work under any name in custom_nodes/."""
    for path in python_files(*PACK_PACKAGES):
        for level, module in imports(path):
            top = module.split(".")[0]
            if level == 0 and top in CORE + ("omni_identity", "omniid"):
                raise AssertionError(f"{path.relative_to(ROOT)} imports {module} absolutely")


def test_root_registers_through_the_v3_entry_point_only():
    source = (ROOT / "__init__.py").read_text()
    tree = ast.parse(source)
    names = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
    assert "NODE_CLASS_MAPPINGS" not in names and "NODE_DISPLAY_NAME_MAPPINGS" not in names
    assert any(isinstance(n, ast.AsyncFunctionDef) and n.name == "comfy_entrypoint" for n in tree.body)
    for path in python_files(*PACK_PACKAGES):
        assert "NODE_CLASS_MAPPINGS" not in path.read_text(), f"{path} mixes the V1 API in"


def _requirement_lines(text):
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_pyproject_dependencies_equal_requirements_txt():
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["dependencies"] == _requirement_lines((ROOT / "requirements.txt").read_text())
    assert "tool" in pyproject and "comfy" in pyproject["tool"]


def test_declared_stack():
    names = {re.split(r"[<>=!;\s]", line)[0].lower() for line in _requirement_lines((ROOT / "requirements.txt").read_text())}
    for needed in ("torch", "numpy", "diffusers", "open_clip_torch", "insightface", "onnxruntime-gpu",
                   "onnxruntime", "comfyui-frontend-package", "safetensors", "dlib-bin", "face_recognition_models"):
        assert needed in names, needed


def test_weights_are_never_unpickled_unsafely():
    for path in python_files(*PACK_PACKAGES, "omniid"):
        text = path.read_text()
        assert "pickle.load" not in text, path
        assert not re.search(r"np\.load\([^)]*allow_pickle=True", text), path
        if "pickle.Unpickler" in text:          # only with a find_class that whitelists
            assert "def find_class" in text and "encoding=\"latin1\"" in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"


def _tracked_files():
    import subprocess
    done = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True)
    return [Path(line) for line in done.stdout.splitlines()]


def test_no_wheel_archive_or_generated_cache_is_committed():
    for path in _tracked_files():
        assert path.suffix not in (".whl", ".gz", ".zip", ".tar", ".pt", ".ckpt", ".pyc"), path
        assert path.parts[0] not in (".comfyui", ".venv", ".cache"), path


def test_workflows_folder_holds_only_workflows_and_their_thumbnails():
    """ComfyUI's template browser lists every workflows/*.json as a template."""
    import json
    for path in sorted((ROOT / "workflows").iterdir()):
        if path.is_dir():
            assert path.name == "api", path
        elif path.suffix == ".json":
            data = json.loads(path.read_text())
            assert "nodes" in data and "links" in data, f"{path.name} is not an editor workflow"
        else:
            assert path.suffix == ".jpg" and path.with_suffix(".json").is_file() or path.name == "notes.toml", path


def test_registry_archive_leaves_out_tests_and_benchmarks():
    ignored = {line.strip().rstrip("/") for line in (ROOT / ".comfyignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {"tests", "benchmarks", "scripts", ".ci"} <= ignored
    includes = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["comfy"]["includes"]
    assert not any(p.strip("/").split("/")[0] in ignored for p in includes)
