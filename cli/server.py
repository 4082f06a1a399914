"""Start and stop a real ComfyUI with this pack loaded (for `serve`, `run` and the tests).

The pack is made visible to ComfyUI without copying or touching the checkout:
with ``base_directory`` it is linked into ``<base>/custom_nodes``; otherwise an
extra-model-paths file adds a folder that holds only a link to this pack.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .client import ComfyClient, ComfyClientError
from .provision import PACK_ROOT, ComfyUIError, comfyui_python, find_comfyui  # noqa: F401 (re-exported)

PACK_LINK_NAME = "ComfyUI-OmniIdentity"
PACK_MODEL_FOLDERS = ("omni_identity", "ipadapter", "insightface/models", "flame")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _pack_installed_in(custom_nodes: Path) -> bool:
    if not custom_nodes.is_dir():
        return False
    return any(entry.resolve() == PACK_ROOT for entry in custom_nodes.iterdir() if entry.is_dir())


def link_pack(custom_nodes: Path) -> None:
    """Make ``custom_nodes`` contain this pack (a symlink), unless it already does."""
    custom_nodes.mkdir(parents=True, exist_ok=True)
    if _pack_installed_in(custom_nodes):
        return
    link = custom_nodes / PACK_LINK_NAME
    if link.is_symlink() or link.exists():
        raise ComfyUIError(f"{link} exists and is not this pack ({PACK_ROOT}); move it away first")
    os.symlink(PACK_ROOT, link, target_is_directory=True)


@dataclass
class ComfyServer:
    comfyui: Path
    port: int = 0
    listen: str = "127.0.0.1"
    base_directory: Optional[Path] = None
    cpu: bool = True
    extra_args: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    log_path: Optional[Path] = None
    console: bool = False                 # ComfyUI's output to this terminal instead of log_path
    stop_timeout: float = 20.0            # stop(): seconds between SIGTERM and SIGKILL
    process: Optional[subprocess.Popen] = None
    _tempdir: Optional[str] = None

    @property
    def url(self) -> str:
        host = "127.0.0.1" if self.listen in ("0.0.0.0", "::") else self.listen
        return f"http://{host}:{self.port}"

    def command(self) -> list[str]:
        cmd = [comfyui_python(self.comfyui), "main.py", "--listen", self.listen, "--port", str(self.port),
               "--disable-auto-launch"]
        if self.cpu:
            cmd.append("--cpu")
        if self.base_directory is not None:
            link_pack(self.base_directory / "custom_nodes")
            cmd += ["--base-directory", str(self.base_directory)]
        elif not _pack_installed_in(self.comfyui / "custom_nodes"):
            cmd += ["--extra-model-paths-config", self._extra_paths_file()]
        return cmd + list(self.extra_args)

    def models_dir(self) -> Path:
        return (self.base_directory or self.comfyui) / "models"

    def _extra_paths_file(self) -> str:
        self._tempdir = self._tempdir or tempfile.mkdtemp(prefix="omniid-")
        link_pack(Path(self._tempdir) / "custom_nodes")
        path = Path(self._tempdir) / "extra_model_paths.yaml"
        path.write_text(f"omni_identity_pack:\n    custom_nodes: {Path(self._tempdir) / 'custom_nodes'}\n")
        return str(path)

    def start(self, timeout: float = 180.0) -> "ComfyServer":
        if self.port == 0:
            self.port = free_port()
        for name in PACK_MODEL_FOLDERS:
            (self.models_dir() / name).mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **self.env}
        if self.console:
            self.process = subprocess.Popen(self.command(), cwd=self.comfyui, env=env)
        else:
            if self.log_path is None:
                self._tempdir = self._tempdir or tempfile.mkdtemp(prefix="omniid-")
                self.log_path = Path(self._tempdir) / "comfyui.log"
            with open(self.log_path, "w", encoding="utf-8") as log:
                self.process = subprocess.Popen(self.command(), cwd=self.comfyui, stdout=log,
                                                stderr=subprocess.STDOUT, env=env, start_new_session=True)
        self.wait_ready(timeout)
        return self

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        probe = ComfyClient(self.url, timeout=2.0, deadline=deadline)
        while time.monotonic() < deadline:
            if self.process is not None and self.process.poll() is not None:
                raise ComfyUIError(f"ComfyUI exited with code {self.process.returncode} while starting; "
                                   f"log tail:\n{self.log_tail()}")
            try:
                probe.system_stats()
                return
            except (ComfyClientError, TimeoutError):
                pass
            time.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        self.stop()
        raise ComfyUIError(f"ComfyUI did not answer on {self.url} within {timeout:.0f}s; log tail:\n{self.log_tail()}")

    def log_text(self) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self, timeout: Optional[float] = None) -> None:
        """Terminate ComfyUI, kill it if it is still there after ``timeout`` seconds (default
        ``stop_timeout``); returns within twice that even if the process cannot be reaped."""
        timeout = self.stop_timeout if timeout is None else timeout
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                try:
                    self.process.wait(timeout)
                except subprocess.TimeoutExpired:
                    pass
        self.process = None

    def cleanup(self) -> None:
        """Stop, and remove the temporary folder (extra-paths file, default log)."""
        self.stop()
        if self._tempdir:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
