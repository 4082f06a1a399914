"""`python -m omniid run ...` in a subprocess, with its stderr read as it comes.

Tests act on what the command has printed (``wait_for``) or what a server has seen, never
on a sleep, and a command that hangs fails the test instead of stalling the suite.
"""
from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from typing import Optional


# Set SIGINT's disposition, then become `python -m omniid ...`: an ignored signal stays ignored
# across exec, as it does for a job that a non-interactive shell starts in the background.
EXEC_WITH_SIGINT = """\
import os, signal, sys
signal.signal(signal.SIGINT, signal.Handlers(int(sys.argv[1])))
os.execv(sys.executable, [sys.executable, "-m", "omniid", *sys.argv[2:]])
"""


class CliRun:
    def __init__(self, args: list[str], cwd, sigint=signal.SIG_DFL, env: Optional[dict] = None):
        """``sigint``: the SIGINT disposition the command inherits (a shell's background job gets SIG_IGN)."""
        self.args = args
        self.stderr: list[str] = []
        self.stdout: list[str] = []
        self._lines: queue.Queue = queue.Queue()
        self.started = time.monotonic()
        self.process = subprocess.Popen([sys.executable, "-c", EXEC_WITH_SIGINT, str(int(sigint)), *args], cwd=cwd,
                                        env={**os.environ, **(env or {})}, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        self._readers = [threading.Thread(target=self._read, args=(self.process.stderr, self.stderr, True), daemon=True),
                         threading.Thread(target=self._read, args=(self.process.stdout, self.stdout, False), daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read(self, stream, lines: list[str], announce: bool) -> None:
        for line in stream:
            lines.append(line)
            if announce:
                self._lines.put(line)
        if announce:
            self._lines.put(None)

    def wait_for(self, text: str, timeout: float = 120.0) -> str:
        """The first stderr line that contains ``text``; fails if the command ends or ``timeout`` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self._lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"no {text!r} on stderr within {timeout:g}s:\n{''.join(self.stderr)}") from None
            if line is None:
                raise AssertionError(f"the command ended before printing {text!r}:\n{''.join(self.stderr)}")
            if text in line:
                return line

    def interrupt(self) -> float:
        """Send SIGINT (what Ctrl-C sends); returns when it was sent."""
        self.process.send_signal(signal.SIGINT)
        return time.monotonic()

    def finish(self, within: float) -> tuple[int, str]:
        """Exit code and stderr; fails (and kills it) if the command has not exited ``within`` seconds."""
        try:
            self.process.wait(within)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            for reader in self._readers:
                reader.join(5)
            raise AssertionError(f"`omniid {' '.join(self.args)}` still ran after {within:g}s; stderr:\n"
                                 f"{''.join(self.stderr)}") from None
        for reader in self._readers:
            reader.join(5)
        return self.process.returncode, "".join(self.stderr)
