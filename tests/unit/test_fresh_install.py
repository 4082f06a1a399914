"""`pip install -r requirements.txt` works without a compiler, and the pack then runs its dlib path.

A fresh venv stands in for a ComfyUI environment: torch and torchvision (ComfyUI's own, never
replaced by this pack) are made visible from the development venv, everything else installs from
requirements.txt with no C/C++ compiler reachable (PATH holds only the venv, and CC/CXX point
nowhere). insightface, which compiles C++, lives in requirements-insightface.txt, not here.
"""
import os
import re
import shutil
import subprocess
import sys
import venv
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = r'''
import sys
import numpy as np
from PIL import Image
import torch
from omniid.encoders.face import create_analyzer, crop_faces
photo = np.asarray(Image.open(sys.argv[1]).convert("RGB"))
result = crop_faces(torch.from_numpy(photo.copy()).float()[None] / 255, create_analyzer("dlib"), crop_size=112)
print("faces", len(result.faces.records))
'''


def _closure(*names: str) -> set[str]:
    """Installed distributions ``names`` need, recursively (their normalised names)."""
    seen, todo = set(), list(names)
    while todo:
        name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for requirement in dist.requires or []:
            if "extra ==" not in requirement:
                todo.append(re.split(r"[ ;<>=!~\[(]", requirement, maxsplit=1)[0])
    return seen


def _expose(names: set[str], shown: Path) -> Path:
    """A folder of links to exactly these distributions' files, for a .pth file."""
    shown.mkdir(parents=True)
    for name in names:
        dist = metadata.distribution(name)
        tops = {Path(str(f)).parts[0] for f in dist.files or [] if not str(f).startswith("..")}
        for top in tops:
            source = Path(dist.locate_file(top))
            if source.exists() and not (shown / top).exists():
                (shown / top).symlink_to(source)
    return shown


def test_requirements_install_without_a_compiler_and_the_dlib_path_runs(tmp_path, photos):
    target = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(target)
    python = target / "bin" / "python"
    site = Path(subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    shown = _expose(_closure("torch", "torchvision"), tmp_path / "comfyui-torch")
    (site / "comfyui_torch.pth").write_text(f"{shown}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(PATH=str(target / "bin"), CC="/nonexistent/cc", CXX="/nonexistent/c++")
    assert not any(shutil.which(tool, path=env["PATH"]) for tool in ("gcc", "cc", "g++", "c++", "clang"))
    done = subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                           "-r", str(ROOT / "requirements.txt")], env=env, capture_output=True, text=True,
                          timeout=1200)
    assert done.returncode == 0, done.stderr[-3000:]
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "omniid").symlink_to(ROOT)
    run = subprocess.run([str(python), "-c", PROBE, str(photos / "obama.jpg")], capture_output=True, text=True,
                         env={**env, "PYTHONPATH": str(pack)}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert "faces 1" in run.stdout
    missing = subprocess.run([str(python), "-c", "import insightface"], capture_output=True, env=env)
    assert missing.returncode != 0                                     # the optional backend stayed optional
    assert sys.prefix != str(target)
