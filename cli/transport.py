"""Network I/O that ends by a deadline, whatever the server does (for client.py).

A plain socket timeout restarts with every read, so a server that answers a byte at a time,
or stalls mid-response, could hold a request forever; a websocket read can do the same, or
never return while messages keep coming. Here an HTTP request's every step only gets the
time left to one deadline, and the websocket is read on a daemon thread.
"""
from __future__ import annotations

import http.client
import io
import json
import queue
import socket
import ssl
import threading
import time
from typing import Callable, Optional


def _time_left(deadline: float) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise TimeoutError("deadline passed")
    return left


class _DeadlineSocket:
    """A connected socket whose sends and receives all end by one deadline: each call only
    gets the time that is left."""

    def __init__(self, sock: socket.socket, deadline: float):
        self._sock = sock
        self._deadline = deadline
        self._open_files = 0
        self._closed = False

    def sendall(self, data) -> None:
        self._sock.settimeout(_time_left(self._deadline))
        self._sock.sendall(data)

    def recv_into(self, buffer) -> int:
        self._sock.settimeout(_time_left(self._deadline))
        return self._sock.recv_into(buffer)

    def makefile(self, mode: str = "rb"):
        self._open_files += 1
        return io.BufferedReader(_SocketReader(self))

    def close(self) -> None:
        self._closed = True
        self._close_if_unused()

    def file_closed(self) -> None:
        self._open_files -= 1
        self._close_if_unused()

    def _close_if_unused(self) -> None:
        # as with socket.makefile: http.client closes a "Connection: close" connection before
        # its response is read, so the socket stays open until the response's file is closed too
        if self._closed and self._open_files == 0:
            self._sock.close()


class _SocketReader(io.RawIOBase):
    def __init__(self, sock: _DeadlineSocket):
        self._sock = sock

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        return self._sock.recv_into(buffer)

    def close(self) -> None:
        if not self.closed:
            self._sock.file_closed()
        super().close()


class DeadlineConnection(http.client.HTTPConnection):
    """One HTTP(S) request's connection: connect, send and every read end by ``deadline``."""

    def __init__(self, host: str, port: int, deadline: float, tls: bool):
        super().__init__(host, port)
        self._deadline = deadline
        self._tls = tls

    def connect(self) -> None:
        sock = socket.create_connection((self.host, self.port), timeout=_time_left(self._deadline))
        if self._tls:
            sock = ssl.create_default_context().wrap_socket(sock, server_hostname=self.host)
        self.sock = _DeadlineSocket(sock, self._deadline)


class EventStream:
    """ComfyUI's websocket messages for one client, read on a daemon thread into a queue.

    The thread owns the socket and the caller only takes from the queue with a bound, so a
    websocket that stalls, floods or dies never holds the caller up (progress just stops).
    """

    def __init__(self, ws_url: str, timeout: float, max_pending: int = 10000):
        self._messages: queue.Queue = queue.Queue(max_pending)
        self._settled = threading.Event()     # connected, or failed to
        self._stop = threading.Event()
        self._ws = None
        self.connected = False
        self._thread = threading.Thread(target=self._read, args=(ws_url, timeout), daemon=True,
                                        name="comfyui-events")
        self._thread.start()

    def wait_connected(self, timeout: float) -> bool:
        self._settled.wait(timeout)
        return self.connected

    def _read(self, ws_url: str, timeout: float) -> None:
        import websocket
        try:
            ws = websocket.create_connection(ws_url, timeout=timeout)
        except Exception:
            self._settled.set()
            return
        self._ws, self.connected = ws, True
        self._settled.set()
        ws.settimeout(1.0)                    # wake up now and then to see close()
        try:
            while not self._stop.is_set():
                try:
                    message = ws.recv()
                except websocket.WebSocketTimeoutException:
                    continue
                if isinstance(message, str):  # binary frames are previews
                    try:
                        self._messages.put_nowait(message)
                    except queue.Full:        # nobody is reading them fast enough: progress is optional
                        pass
        except Exception:
            pass                              # closed, by close() or by the server
        finally:
            ws.shutdown()

    def deliver(self, prompt_id: str, on_event: Optional[Callable[[str, dict], None]], until: float) -> None:
        """Hand the events about ``prompt_id`` to ``on_event`` until the monotonic time ``until``."""
        while True:
            left = until - time.monotonic()
            if left <= 0:
                return
            try:
                message = self._messages.get(timeout=left)
            except queue.Empty:
                return
            try:
                event = json.loads(message)
            except json.JSONDecodeError:
                continue
            if not isinstance(event, dict) or not isinstance(event.get("data") or {}, dict):
                continue
            data = event.get("data") or {}
            if data.get("prompt_id") in (None, prompt_id) and on_event is not None:
                on_event(event.get("type", ""), data)

    def close(self, wait: float = 1.0) -> None:
        """Stop the reader; waits at most ``wait`` seconds (it is a daemon thread either way)."""
        self._stop.set()
        ws = self._ws
        if ws is not None:
            ws.abort()                        # shutdown() wakes a blocked recv; the thread closes the socket
        self._thread.join(wait)
