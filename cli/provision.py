"""Find or provision the ComfyUI that `serve`, `run`, the tests and the benchmarks share.

``scripts/setup.sh`` calls ``python -m omniid.comfyui_setup`` once; it looks, in order, at
``$COMFYUI_PATH``, the default location (/opt/ComfyUI), the project's embedded copy
(``.comfyui/ComfyUI``), then provisions the embedded copy from the pinned archive in
``../shared/vendor/`` (checksum verified) or, where the network allows, from a clone of
the pinned commit. The choice is recorded in ``.comfyui/selected.json`` so that every
later command uses the same ComfyUI. Standard library only: it runs before any package
is installed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Optional

PACK_ROOT = Path(__file__).resolve().parent.parent
EMBEDDED_DIR = PACK_ROOT / ".comfyui"                 # ignored by git
EMBEDDED_COMFYUI = EMBEDDED_DIR / "ComfyUI"
RECORD = EMBEDDED_DIR / "selected.json"
DEFAULT_COMFYUI_PATHS = ("/opt/ComfyUI",)

PIN_COMMIT = "a125cd84b054a57729b5eecab930ca9408719832"
PIN_VERSION = "0.3.64"
PIN_ARCHIVE = "ComfyUI-0.3.64-a125cd84.tar.gz"
PIN_SHA256 = "25692800c23d1353e047478eb4e64f1e6084740e0768445c794b20b4c022b5a1"
PIN_REPOSITORY = "https://github.com/comfyanonymous/ComfyUI.git"
PIN_MARKER = ".omniid-pin"                            # inside an embedded copy: the commit it holds
# ComfyUI's requirements that setup leaves to its own pins (torch) or leaves out (audio nodes only)
SKIPPED_REQUIREMENTS = ("torch", "torchvision", "torchaudio")
EXTRA_REQUIREMENTS = ("requests",)                   # imported by ComfyUI, not in its requirements


class ComfyUIError(RuntimeError):
    """ComfyUI could not be found, provisioned, started or reached."""


def is_comfyui(path) -> bool:
    return bool(path) and (Path(path) / "main.py").is_file() and (Path(path) / "comfy").is_dir()


def recorded() -> Optional[dict]:
    """What setup chose: {"path", "source", "python"}, or None."""
    try:
        record = json.loads(RECORD.read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) and is_comfyui(record.get("path")) else None


def vendor_dirs() -> list[Path]:
    explicit = os.environ.get("OMNIID_VENDOR_DIR")
    return [Path(explicit)] if explicit else [PACK_ROOT.parent / "shared" / "vendor"]


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def embedded_is_current() -> bool:
    marker = EMBEDDED_COMFYUI / PIN_MARKER
    return is_comfyui(EMBEDDED_COMFYUI) and marker.is_file() and marker.read_text().strip() == PIN_COMMIT


def _install_embedded(staged: Path) -> Path:
    """Move a staged ComfyUI tree into place and mark it with the pinned commit."""
    if not is_comfyui(staged):
        raise ComfyUIError(f"{staged} does not hold a ComfyUI tree (no main.py and comfy/)")
    (staged / PIN_MARKER).write_text(PIN_COMMIT + "\n")
    shutil.rmtree(EMBEDDED_COMFYUI, ignore_errors=True)
    shutil.move(str(staged), str(EMBEDDED_COMFYUI))
    return EMBEDDED_COMFYUI


def unpack_archive(archive: Path, log=print) -> Path:
    digest = sha256(archive)
    if digest != PIN_SHA256:
        raise ComfyUIError(f"{archive}: sha256 {digest} is not the pinned {PIN_SHA256}; refusing to unpack it")
    EMBEDDED_DIR.mkdir(parents=True, exist_ok=True)
    log(f"unpacking {archive} (sha256 verified) into {EMBEDDED_COMFYUI}")
    with tempfile.TemporaryDirectory(dir=EMBEDDED_DIR) as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        return _install_embedded(Path(tmp) / "ComfyUI")


def clone_pinned(log=print) -> Path:
    if shutil.which("git") is None:
        raise ComfyUIError("git is not installed")
    EMBEDDED_DIR.mkdir(parents=True, exist_ok=True)
    log(f"cloning {PIN_REPOSITORY} at {PIN_COMMIT[:12]} into {EMBEDDED_COMFYUI}")
    with tempfile.TemporaryDirectory(dir=EMBEDDED_DIR) as tmp:
        tree = Path(tmp) / "ComfyUI"
        for cmd in (["git", "init", "--quiet", str(tree)],
                    ["git", "-C", str(tree), "fetch", "--quiet", "--depth", "1", PIN_REPOSITORY, PIN_COMMIT],
                    ["git", "-C", str(tree), "checkout", "--quiet", "FETCH_HEAD"]):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                raise ComfyUIError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
        shutil.rmtree(tree / ".git", ignore_errors=True)
        return _install_embedded(tree)


def provision(log=print) -> tuple[Path, str]:
    """(ComfyUI checkout, where it came from), provisioning the embedded copy when needed."""
    explicit = os.environ.get("COMFYUI_PATH")
    if explicit:
        if not is_comfyui(explicit):
            raise ComfyUIError(f"COMFYUI_PATH={explicit} is not a ComfyUI checkout (no main.py and comfy/ there)")
        return Path(explicit).resolve(), "COMFYUI_PATH"
    for default in DEFAULT_COMFYUI_PATHS:
        if is_comfyui(default):
            return Path(default).resolve(), "default location"
    if embedded_is_current():
        return EMBEDDED_COMFYUI, f"embedded ComfyUI {PIN_VERSION} ({PIN_COMMIT[:8]})"
    problems = []
    for folder in vendor_dirs():
        archive = folder / PIN_ARCHIVE
        if archive.is_file():
            return unpack_archive(archive, log), f"embedded ComfyUI {PIN_VERSION}, from {archive}"
        problems.append(f"no {archive}")
    try:
        return clone_pinned(log), f"embedded ComfyUI {PIN_VERSION}, cloned at {PIN_COMMIT[:8]}"
    except (ComfyUIError, subprocess.TimeoutExpired) as exc:
        problems.append(f"clone of {PIN_REPOSITORY} failed: {exc}")
    raise ComfyUIError("no ComfyUI: set COMFYUI_PATH to a checkout, or provide the pinned archive "
                         f"({PIN_ARCHIVE}, set OMNIID_VENDOR_DIR to its folder), or network access to clone it. "
                         + "; ".join(problems))


def find_comfyui(explicit: Optional[str] = None) -> Optional[Path]:
    """The ComfyUI to use: ``explicit``, else $COMFYUI_PATH, else what setup recorded, else the
    default location, else the embedded copy."""
    if explicit:
        if not is_comfyui(explicit):
            raise ComfyUIError(f"{explicit} is not a ComfyUI checkout (no main.py and comfy/ there)")
        return Path(explicit).resolve()
    chosen = recorded()
    for candidate in (os.environ.get("COMFYUI_PATH"), chosen and chosen["path"], *DEFAULT_COMFYUI_PATHS,
                      EMBEDDED_COMFYUI):
        if is_comfyui(candidate):
            return Path(candidate).resolve()
    return None


def comfyui_python(comfyui: Path) -> str:
    """The interpreter that runs ComfyUI: $COMFYUI_PYTHON, the one setup recorded for this checkout,
    the checkout's own venv, else this one."""
    if os.environ.get("COMFYUI_PYTHON"):
        return os.environ["COMFYUI_PYTHON"]
    chosen = recorded()
    if chosen and Path(chosen["path"]).resolve() == Path(comfyui).resolve() and os.path.exists(chosen["python"]):
        return chosen["python"]
    for venv in (".venv", "venv"):
        for rel in ("bin/python", "Scripts/python.exe"):
            candidate = Path(comfyui) / venv / rel
            if candidate.exists():
                return str(candidate)
    return sys.executable


def record(path: Path, source: str, python: str) -> None:
    EMBEDDED_DIR.mkdir(parents=True, exist_ok=True)
    RECORD.write_text(json.dumps({"path": str(path), "source": source, "python": python}, indent=1) + "\n")


def requirements_for(comfyui: Path) -> list[str]:
    """ComfyUI's requirements.txt without torch/torchvision/torchaudio, plus what it imports unlisted."""
    lines = []
    for line in (comfyui / "requirements.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        name = line.replace(">", "=").replace("<", "=").replace("~", "=").replace("!", "=").split("=")[0].strip()
        if line and name.lower() not in SKIPPED_REQUIREMENTS:
            lines.append(line)
    return lines + list(EXTRA_REQUIREMENTS)


def main(argv=None) -> int:
    """Provision and record; print the checkout, its interpreter and where it came from, one a line."""
    import argparse
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requirements-out", required=True, help="where to write ComfyUI's filtered requirements")
    args = parser.parse_args(argv)
    try:
        path, source = provision(lambda message: print(f"== {message}", file=sys.stderr, flush=True))
    except ComfyUIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    python = comfyui_python(path)
    record(path, source, python)
    Path(args.requirements_out).write_text("\n".join(requirements_for(path)) + "\n")
    print(path)
    print(python)
    print(source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
