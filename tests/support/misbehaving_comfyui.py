"""Fake ComfyUI servers that misbehave, for the tests that `omniid run` never waits unbounded.

Stdlib only, on 127.0.0.1, each in daemon threads: usable in a test process, or as the
``main.py`` of a fake ComfyUI checkout that ``run`` starts itself (see ``fake_checkout``).
Events tell a test what the server has seen, so it can act on them instead of sleeping.
"""
from __future__ import annotations

import base64
import hashlib
import json
import socket
import struct
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

PROMPT_ID = "fake-prompt-1"
WS_GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


class StallingServer:
    """Accepts connections and reads each request's head, then, by ``mode``:
    "silent" answers nothing; "partial" sends the headers and half the body, then nothing;
    "trickle" sends an endless answer one byte every ``interval`` seconds (each read gets data,
    so a per-read socket timeout never fires)."""

    def __init__(self, mode: str = "silent", interval: float = 0.1):
        self.mode, self.interval = mode, interval
        self.request_seen = threading.Event()
        self.requests: list[str] = []
        self._closed = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.2)
        self._connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._listener.getsockname()[1]}"

    def _accept(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._listener.accept()
            except (TimeoutError, OSError):
                continue
            self._connections.append(conn)
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        head = b""
        try:
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(4096)
                if not chunk:
                    return
                head += chunk
            self.requests.append(head.split(b"\r\n", 1)[0].decode(errors="replace"))
            self.request_seen.set()
            if self.mode == "partial":
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n"
                             + b'{"system": {')
            elif self.mode == "trickle":
                answer = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 100000000\r\n\r\n{"
                for byte in answer:
                    conn.sendall(bytes([byte]))
                    if self._closed.wait(self.interval):
                        return
                while not self._closed.wait(self.interval):
                    conn.sendall(b" ")
            self._closed.wait()
        except OSError:
            pass                              # the client hung up

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        for conn in self._connections:
            conn.close()


def _ws_frame(text: str) -> bytes:
    payload = text.encode()
    if len(payload) < 126:
        return bytes([0x81, len(payload)]) + payload
    return bytes([0x81, 126]) + struct.pack("!H", len(payload)) + payload


class NeverFinishingComfyUI(ThreadingHTTPServer):
    """Answers like ComfyUI (system stats, queues the prompt) but the prompt never finishes.

    ws: "silent" accepts the websocket and sends nothing; "flood" sends a status message every
    few milliseconds, forever; "none" refuses it (404).
    cancel: "stall" never answers POST /queue and /interrupt; "answer" answers them.
    """

    daemon_threads = True
    block_on_close = False

    def __init__(self, ws: str = "silent", cancel: str = "stall", port: int = 0):
        super().__init__(("127.0.0.1", port), _Handler)
        self.ws, self.cancel = ws, cancel
        self.prompt_queued = threading.Event()
        self.cancel_seen = threading.Event()
        self.posts: list[tuple[str, object]] = []
        self.stopped = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def start(self) -> "NeverFinishingComfyUI":
        threading.Thread(target=self.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
        return self

    def close(self) -> None:
        self.stopped.set()
        self.shutdown()
        self.server_close()


class _Handler(BaseHTTPRequestHandler):
    server: NeverFinishingComfyUI

    def log_message(self, *args) -> None:
        pass

    def _json(self, data, status: int = 200) -> None:
        body = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        if self.path == "/system_stats":
            self._json({"system": {"os": "fake"}, "devices": []})
        elif self.path.startswith("/history/"):
            self._json({})                    # never in the history: never finished
        elif self.path.startswith("/ws") and self.server.ws != "none":
            self._websocket()
        else:
            self._json({"error": "not found"}, 404)

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        payload = json.loads(body) if body else None
        self.server.posts.append((self.path, payload))
        if self.path == "/prompt":
            self._json({"prompt_id": PROMPT_ID, "number": 1, "node_errors": {}})
            self.server.prompt_queued.set()
        elif self.path in ("/queue", "/interrupt"):
            self.server.cancel_seen.set()
            if self.server.cancel == "stall":
                self.server.stopped.wait()
            else:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()
        else:
            self._json({"error": "not found"}, 404)

    def _websocket(self) -> None:
        key = self.headers.get("Sec-WebSocket-Key", "")
        accept = base64.b64encode(hashlib.sha1((key + WS_GUID).encode()).digest()).decode()
        self.send_response(101)
        self.send_header("Upgrade", "websocket")
        self.send_header("Connection", "Upgrade")
        self.send_header("Sec-WebSocket-Accept", accept)
        self.end_headers()
        self.wfile.flush()
        if self.server.ws == "flood":
            message = _ws_frame(json.dumps({"type": "status", "data": {"status": {"exec_info": {"queue_remaining": 1}}}}))
            try:
                while not self.server.stopped.wait(0.005):
                    self.wfile.write(message)
                    self.wfile.flush()
            except OSError:
                pass                          # the client hung up
        else:
            self.server.stopped.wait()
        self.close_connection = True


FAKE_MAIN = '''\
"""A fake ComfyUI whose prompt never finishes and that ignores SIGTERM."""
import signal
import sys
sys.path.insert(0, {tests!r})
from support.misbehaving_comfyui import NeverFinishingComfyUI

signal.signal(signal.SIGTERM, signal.SIG_IGN)
port = int(sys.argv[sys.argv.index("--port") + 1])
with open({pid_file!r}, "w") as f:
    f.write(str(__import__("os").getpid()))
NeverFinishingComfyUI(ws="silent", cancel="stall", port=port).serve_forever(poll_interval=0.1)
'''


def fake_checkout(folder: Path) -> Path:
    """A folder that `run --comfyui` takes for a ComfyUI checkout; its server writes its pid to
    ``folder/server.pid``, never finishes a prompt and ignores SIGTERM."""
    (folder / "comfy").mkdir(parents=True, exist_ok=True)
    tests = str(Path(__file__).resolve().parents[1])
    (folder / "main.py").write_text(FAKE_MAIN.format(tests=tests, pid_file=str(folder / "server.pid")))
    return folder
