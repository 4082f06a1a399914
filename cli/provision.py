"""Find or provision the ComfyUI that `serve`, `run`, the tests and the benchmarks share.

Two pinned hosts are supported (``HOSTS``): ComfyUI 0.33.0, the default, and 0.3.64, the oldest
supported release, each with its own environment (``.venv`` and ``.venv-0.3.64``) since they run
different torch builds. ``$OMNIID_COMFYUI_HOST`` picks one; without it, the environment running
this Python decides. ``scripts/setup.sh`` calls this module once per host; it looks, in order, at
``$COMFYUI_PATH``, the default location (/opt/ComfyUI, default host only), the host's embedded
copy (``.comfyui/ComfyUI-<version>``), then provisions that copy from the pinned archive in
``../shared/vendor/`` (checksum verified) or, where the network allows, from a clone of the
pinned commit. The choice is recorded in ``.comfyui/selected-<version>.json`` so that every later
command uses the same ComfyUI. Standard library only: it runs before any package is installed
(``python3 cli/provision.py --describe`` prints the host's environment folder and torch pins).
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
DEFAULT_COMFYUI_PATHS = ("/opt/ComfyUI",)

# The ComfyUI releases the pack supports, each pinned to a commit and the archive of that commit in
# ../shared/vendor, with the torch build it is run with. The first is the host users run today and
# the default; the others are older releases still supported and tested.
HOSTS = {
    "0.33.0": dict(commit="783545f689a0af730065994b46b382ae24844c99", archive="ComfyUI-0.33.0-783545f6.tar.gz",
                   sha256="7d3a23bfaab1d36954c62d2f03077dc816bd73455e0fae5378e5c932b06afef7",
                   torch="torch==2.11.0 torchvision==0.26.0 torchaudio==2.11.0", venv=".venv"),
    "0.3.64": dict(commit="a125cd84b054a57729b5eecab930ca9408719832", archive="ComfyUI-0.3.64-a125cd84.tar.gz",
                   sha256="25692800c23d1353e047478eb4e64f1e6084740e0768445c794b20b4c022b5a1",
                   torch="torch==2.14.1 torchvision==0.29.1", venv=".venv-0.3.64"),
}
DEFAULT_HOST = "0.33.0"
HOST_VARIABLE = "OMNIID_COMFYUI_HOST"
PIN_REPOSITORY = "https://github.com/comfyanonymous/ComfyUI.git"
PIN_MARKER = ".omniid-pin"                            # inside an embedded copy: the commit it holds
# ComfyUI's requirements that setup leaves to the host's torch pins
SKIPPED_REQUIREMENTS = ("torch", "torchvision", "torchaudio")
EXTRA_REQUIREMENTS = ("requests",)                   # imported by ComfyUI, not in its requirements


def host_name() -> str:
    """The pinned host in use: $OMNIID_COMFYUI_HOST, else the host whose environment runs this Python,
    else the default."""
    explicit = os.environ.get(HOST_VARIABLE)
    if explicit:
        if explicit not in HOSTS:
            raise ComfyUIError(f"{HOST_VARIABLE}={explicit} is not a supported ComfyUI host; choose one of "
                               + ", ".join(HOSTS))
        return explicit
    prefix = Path(sys.prefix).resolve()
    for name, pin in HOSTS.items():
        if prefix == (PACK_ROOT / pin["venv"]).resolve():
            return name
    return DEFAULT_HOST


def embedded_comfyui(name: Optional[str] = None) -> Path:
    return EMBEDDED_DIR / f"ComfyUI-{name or host_name()}"


def record_path(name: Optional[str] = None) -> Path:
    return EMBEDDED_DIR / f"selected-{name or host_name()}.json"


class ComfyUIError(RuntimeError):
    """ComfyUI could not be found, provisioned, started or reached."""


def is_comfyui(path) -> bool:
    return bool(path) and (Path(path) / "main.py").is_file() and (Path(path) / "comfy").is_dir()


def recorded(name: Optional[str] = None) -> Optional[dict]:
    """What setup chose for a host: {"path", "source", "python", "host"}, or None."""
    try:
        record = json.loads(record_path(name).read_text())
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


def embedded_is_current(name: str) -> bool:
    marker = embedded_comfyui(name) / PIN_MARKER
    return (is_comfyui(embedded_comfyui(name)) and marker.is_file()
            and marker.read_text().strip() == HOSTS[name]["commit"])


def _install_embedded(staged: Path, name: str) -> Path:
    """Move a staged ComfyUI tree into place and mark it with the pinned commit."""
    if not is_comfyui(staged):
        raise ComfyUIError(f"{staged} does not hold a ComfyUI tree (no main.py and comfy/)")
    (staged / PIN_MARKER).write_text(HOSTS[name]["commit"] + "\n")
    target = embedded_comfyui(name)
    shutil.rmtree(target, ignore_errors=True)
    shutil.move(str(staged), str(target))
    return target


def unpack_archive(archive: Path, name: str, log=print) -> Path:
    digest, expected = sha256(archive), HOSTS[name]["sha256"]
    if digest != expected:
        raise ComfyUIError(f"{archive}: sha256 {digest} is not the pinned {expected}; refusing to unpack it")
    EMBEDDED_DIR.mkdir(parents=True, exist_ok=True)
    log(f"unpacking {archive} (sha256 verified) into {embedded_comfyui(name)}")
    with tempfile.TemporaryDirectory(dir=EMBEDDED_DIR) as tmp:
        with tarfile.open(archive) as tar:
            tar.extractall(tmp, filter="data")
        return _install_embedded(Path(tmp) / "ComfyUI", name)


def clone_pinned(name: str, log=print) -> Path:
    if shutil.which("git") is None:
        raise ComfyUIError("git is not installed")
    commit = HOSTS[name]["commit"]
    EMBEDDED_DIR.mkdir(parents=True, exist_ok=True)
    log(f"cloning {PIN_REPOSITORY} at {commit[:12]} into {embedded_comfyui(name)}")
    with tempfile.TemporaryDirectory(dir=EMBEDDED_DIR) as tmp:
        tree = Path(tmp) / "ComfyUI"
        for cmd in (["git", "init", "--quiet", str(tree)],
                    ["git", "-C", str(tree), "fetch", "--quiet", "--depth", "1", PIN_REPOSITORY, commit],
                    ["git", "-C", str(tree), "checkout", "--quiet", "FETCH_HEAD"]):
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            if done.returncode != 0:
                raise ComfyUIError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-500:]}")
        shutil.rmtree(tree / ".git", ignore_errors=True)
        return _install_embedded(tree, name)


def provision(name: Optional[str] = None, log=print) -> tuple[Path, str]:
    """(ComfyUI checkout, where it came from), provisioning the host's embedded copy when needed."""
    name = name or host_name()
    explicit = os.environ.get("COMFYUI_PATH")
    if explicit:
        if not is_comfyui(explicit):
            raise ComfyUIError(f"COMFYUI_PATH={explicit} is not a ComfyUI checkout (no main.py and comfy/ there)")
        return Path(explicit).resolve(), "COMFYUI_PATH"
    if name == DEFAULT_HOST:
        for default in DEFAULT_COMFYUI_PATHS:
            if is_comfyui(default):
                return Path(default).resolve(), "default location"
    commit, archive_name = HOSTS[name]["commit"], HOSTS[name]["archive"]
    if embedded_is_current(name):
        return embedded_comfyui(name), f"embedded ComfyUI {name} ({commit[:8]})"
    problems = []
    for folder in vendor_dirs():
        archive = folder / archive_name
        if archive.is_file():
            return unpack_archive(archive, name, log), f"embedded ComfyUI {name}, from {archive}"
        problems.append(f"no {archive}")
    try:
        return clone_pinned(name, log), f"embedded ComfyUI {name}, cloned at {commit[:8]}"
    except (ComfyUIError, subprocess.TimeoutExpired) as exc:
        problems.append(f"clone of {PIN_REPOSITORY} failed: {exc}")
    raise ComfyUIError("no ComfyUI: set COMFYUI_PATH to a checkout, or provide the pinned archive "
                       f"({archive_name}, set OMNIID_VENDOR_DIR to its folder), or network access to clone it. "
                       + "; ".join(problems))


def find_comfyui(explicit: Optional[str] = None) -> Optional[Path]:
    """The ComfyUI to use: ``explicit``, else $COMFYUI_PATH, else what setup recorded for the host in
    use, else the default location (default host only), else the host's embedded copy."""
    if explicit:
        if not is_comfyui(explicit):
            raise ComfyUIError(f"{explicit} is not a ComfyUI checkout (no main.py and comfy/ there)")
        return Path(explicit).resolve()
    name = host_name()
    chosen = recorded(name)
    defaults = DEFAULT_COMFYUI_PATHS if name == DEFAULT_HOST else ()
    for candidate in (os.environ.get("COMFYUI_PATH"), chosen and chosen["path"], *defaults, embedded_comfyui(name)):
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


def record(path: Path, source: str, python: str, name: Optional[str] = None) -> None:
    EMBEDDED_DIR.mkdir(parents=True, exist_ok=True)
    record_path(name).write_text(json.dumps({"path": str(path), "source": source, "python": python,
                                             "host": name or host_name()}, indent=1) + "\n")


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
    parser.add_argument("--requirements-out", help="where to write ComfyUI's filtered requirements")
    parser.add_argument("--describe", action="store_true",
                        help="print the host's name, environment folder and torch pins, one a line, and stop")
    parser.add_argument("--host", choices=sorted(HOSTS), help=f"the pinned ComfyUI (default: ${HOST_VARIABLE}, "
                        f"else the host of this environment, else {DEFAULT_HOST})")
    args = parser.parse_args(argv)
    try:
        name = args.host or host_name()
        if args.describe:
            print(name)
            print(HOSTS[name]["venv"])
            print(HOSTS[name]["torch"])
            return 0
        if not args.requirements_out:
            parser.error("--requirements-out is required")
        path, source = provision(name, lambda message: print(f"== {message}", file=sys.stderr, flush=True))
    except ComfyUIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 3
    python = comfyui_python(path)
    record(path, source, python, name)
    Path(args.requirements_out).write_text("\n".join(requirements_for(path)) + "\n")
    print(path)
    print(python)
    print(source)
    return 0


if __name__ == "__main__":
    sys.exit(main())
