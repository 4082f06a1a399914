"""A small client for ComfyUI's HTTP and websocket API (stdlib + websocket-client).

Nothing here can block for long, whatever the server does: every HTTP request ends by a
deadline (its own ``timeout``, and the client's ``deadline`` when one is set), counted over
the whole request rather than per socket read, and the websocket is read on a daemon thread
that the caller only ever waits on with a bound (see transport.py).
"""
from __future__ import annotations

import http.client
import json
import mimetypes
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from .transport import DeadlineConnection, EventStream


FILE_KEYS = ("images", "gifs", "audio", "video", "files", "embeds")


class ComfyClientError(RuntimeError):
    pass


class PromptRejected(ComfyClientError):
    """ComfyUI refused the prompt at validation (HTTP 400)."""

    def __init__(self, error: dict, node_errors: dict):
        self.error = error or {}
        self.node_errors = node_errors or {}
        lines = [self.error.get("message", "prompt rejected")]
        if self.error.get("details"):
            lines.append(str(self.error["details"]))
        for node_id, info in self.node_errors.items():
            for err in info.get("errors", []):
                details = str(err.get("details", ""))
                if err.get("type") == "custom_validation_failed" and " - " in details:
                    details = details.split(" - ", 1)[1]     # ComfyUI repeats a node's message once per input
                line = f"node {node_id} ({info.get('class_type', '?')}): {err.get('message')}: {details}".rstrip(": ")
                if line not in lines:
                    lines.append(line)
        super().__init__("\n".join(lines))


class ExecutionFailed(ComfyClientError):
    """The prompt ran and stopped with an error or an interrupt."""

    def __init__(self, prompt_id: str, status: dict):
        self.prompt_id = prompt_id
        self.status = status or {}
        self.interrupted = False
        self.error: dict = {}
        for kind, data in self.status.get("messages", []):
            if kind == "execution_error":
                self.error = data
            elif kind == "execution_interrupted":
                self.interrupted = True
        if self.error:
            message = (f"node {self.error.get('node_id')} ({self.error.get('node_type')}) failed: "
                       f"{self.error.get('exception_type')}: {self.error.get('exception_message', '').strip()}")
        elif self.interrupted:
            message = "the prompt was interrupted"
        else:
            message = f"the prompt ended with status {self.status.get('status_str')!r}"
        super().__init__(message)


@dataclass
class RunResult:
    prompt_id: str
    history: dict

    @property
    def outputs(self) -> dict:
        return self.history.get("outputs", {})

    def cached_nodes(self) -> set[str]:
        """Nodes whose outputs came from ComfyUI's cache instead of running."""
        for kind, data in self.history.get("status", {}).get("messages", []):
            if kind == "execution_cached":
                return {str(n) for n in data.get("nodes", [])}
        return set()

    def files(self) -> list[dict]:
        """Every file an output node reported: node, filename, subfolder, type."""
        found = []
        for node_id, output in self.outputs.items():
            for key in FILE_KEYS:
                for item in output.get(key, []) or []:
                    if isinstance(item, dict) and "filename" in item:
                        found.append({"node": node_id, **item})
        return found


class ComfyClient:
    """ComfyUI's API. Each request ends within ``timeout`` seconds, and none outlives
    ``deadline`` (a ``time.monotonic()`` value) when it is set: past it they raise TimeoutError."""

    def __init__(self, url: str, client_id: Optional[str] = None, timeout: float = 30.0,
                 deadline: Optional[float] = None):
        self.url = url.rstrip("/")
        self.client_id = client_id or uuid.uuid4().hex
        self.timeout = timeout
        self.deadline = deadline
        parts = urllib.parse.urlsplit(self.url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ComfyClientError(f"not an http(s) URL of a ComfyUI server: {url!r}")
        self._tls = parts.scheme == "https"
        self._host = parts.hostname
        self._port = parts.port or (443 if self._tls else 80)
        self._prefix = parts.path

    # -- plain HTTP ---------------------------------------------------------------
    def _request(self, path: str, data: Optional[bytes] = None, headers: Optional[dict] = None,
                 method: Optional[str] = None, deadline: Optional[float] = None):
        method = method or ("GET" if data is None else "POST")
        own_limit = time.monotonic() + self.timeout
        limit = min(d for d in (own_limit, deadline, self.deadline) if d is not None)
        connection = DeadlineConnection(self._host, self._port, limit, self._tls)
        response = None
        try:
            connection.request(method, self._prefix + path, body=data, headers=headers or {})
            response = connection.getresponse()
            return response.status, response.read()
        except TimeoutError:
            if limit < own_limit:
                raise TimeoutError(f"{method} {path} had no complete answer from {self.url} before the deadline") from None
            raise ComfyClientError(f"ComfyUI at {self.url} did not answer {method} {path} within {self.timeout:g}s") from None
        except (http.client.HTTPException, OSError) as exc:
            raise ComfyClientError(f"cannot reach ComfyUI at {self.url}: {exc}") from exc
        finally:
            if response is not None:
                response.close()
            connection.close()

    def get_json(self, path: str, deadline: Optional[float] = None) -> Any:
        status, body = self._request(path, deadline=deadline)
        if status != 200:
            raise ComfyClientError(f"GET {path} answered {status}: {body[:300]!r}")
        try:
            return json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ComfyClientError(f"GET {path} answered something that is not JSON: {body[:300]!r}") from exc

    def post_json(self, path: str, payload: Any) -> tuple[int, Any]:
        status, body = self._request(path, json.dumps(payload).encode(), {"Content-Type": "application/json"})
        try:
            return status, json.loads(body) if body else None
        except json.JSONDecodeError:
            return status, body.decode(errors="replace")

    def system_stats(self) -> dict:
        return self.get_json("/system_stats")

    def object_info(self, node_type: Optional[str] = None) -> dict:
        return self.get_json("/object_info" + (f"/{node_type}" if node_type else ""))

    def history(self, prompt_id: str) -> Optional[dict]:
        return self.get_json(f"/history/{prompt_id}").get(prompt_id)

    def queue_state(self) -> dict:
        return self.get_json("/queue")

    def interrupt(self) -> None:
        self.post_json("/interrupt", {})

    def cancel(self, prompt_id: str) -> None:
        """Stop one prompt: drop it from the queue if it waits there, interrupt it if it runs (never another)."""
        self.post_json("/queue", {"delete": [prompt_id]})
        self.post_json("/interrupt", {"prompt_id": prompt_id})

    def free(self, unload_models: bool = True, reset_cache: bool = True, settle: float = 1.0) -> None:
        """Ask ComfyUI to unload models and drop its cache of node outputs (applied between prompts)."""
        self.post_json("/free", {"unload_models": unload_models, "free_memory": reset_cache})
        time.sleep(settle)

    def queue_prompt(self, prompt: dict) -> str:
        status, body = self.post_json("/prompt", {"prompt": prompt, "client_id": self.client_id})
        if status == 200 and isinstance(body, dict) and "prompt_id" in body:
            return body["prompt_id"]
        if isinstance(body, dict):
            raise PromptRejected(body.get("error", {}), body.get("node_errors", {}))
        raise ComfyClientError(f"POST /prompt answered {status}: {body!r}")

    def view(self, file: dict) -> bytes:
        query = urllib.parse.urlencode({k: file.get(k, "") for k in ("filename", "subfolder", "type")})
        status, body = self._request(f"/view?{query}")
        if status != 200:
            raise ComfyClientError(f"cannot fetch {file.get('filename')}: HTTP {status}")
        return body

    def upload_image(self, path: str | Path, overwrite: bool = True) -> str:
        """Upload a file to ComfyUI's input folder; returns the name LoadImage takes."""
        path = Path(path)
        boundary = uuid.uuid4().hex
        mime = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        parts = [
            f'--{boundary}\r\nContent-Disposition: form-data; name="overwrite"\r\n\r\n'
            f'{"true" if overwrite else "false"}\r\n'.encode(),
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="{path.name}"\r\n'
            f'Content-Type: {mime}\r\n\r\n'.encode() + path.read_bytes() + b"\r\n",
            f"--{boundary}--\r\n".encode(),
        ]
        status, body = self._request("/upload/image", b"".join(parts),
                                     {"Content-Type": f"multipart/form-data; boundary={boundary}"})
        if status != 200:
            raise ComfyClientError(f"upload of {path} failed: HTTP {status}: {body[:300]!r}")
        info = json.loads(body)
        return f"{info['subfolder']}/{info['name']}" if info.get("subfolder") else info["name"]

    # -- running prompts ----------------------------------------------------------
    def open_events(self, wait: float = 10.0) -> Optional[EventStream]:
        """This client's websocket events, or None: no websocket-client, refused, or no handshake
        within ``wait`` seconds (bounded by the deadline too). Progress is optional; runs go on without."""
        try:
            import websocket  # noqa: F401 (websocket-client)
        except ImportError:
            return None
        ws_url = self.url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
        stream = EventStream(f"{ws_url}/ws?clientId={self.client_id}", self.timeout)
        if self.deadline is not None:
            wait = min(wait, max(0.0, self.deadline - time.monotonic()))
        if stream.wait_connected(wait):
            return stream
        stream.close(wait=0)
        return None

    def run(self, prompt: dict, timeout: float = 600.0,
            on_event: Optional[Callable[[str, dict], None]] = None) -> RunResult:
        """Queue ``prompt``, wait for it, and return its history entry.

        ``on_event(type, data)`` receives the websocket messages about this prompt
        (progress, executing, executed, ...) when websocket-client is installed.
        Raises PromptRejected, ExecutionFailed, or TimeoutError.
        """
        events = self.open_events() if on_event is not None else None
        try:
            prompt_id = self.queue_prompt(prompt)
            return self.wait(prompt_id, timeout, on_event, events)
        finally:
            if events is not None:
                events.close()

    def wait(self, prompt_id: str, timeout: float = 600.0,
             on_event: Optional[Callable[[str, dict], None]] = None,
             events: Optional[EventStream] = None) -> RunResult:
        """Poll the prompt's history until it ends, handing ``events`` to ``on_event`` meanwhile.

        Returns or raises within ``timeout`` seconds (and by the client's deadline):
        ExecutionFailed, TimeoutError, or ComfyClientError when the server stops answering.
        """
        start = time.monotonic()
        deadline = min(d for d in (start + timeout, self.deadline) if d is not None)
        interval = 1.0 if events is not None else 0.2
        while True:
            try:
                entry = self.get_json(f"/history/{prompt_id}", deadline).get(prompt_id)
            except TimeoutError:
                entry = None
            if entry is not None and entry.get("status"):
                if entry["status"].get("status_str") == "success":
                    return RunResult(prompt_id, entry)
                raise ExecutionFailed(prompt_id, entry["status"])
            next_poll = min(time.monotonic() + interval, deadline)
            if events is not None:
                events.deliver(prompt_id, on_event, until=next_poll)
            else:
                time.sleep(max(0.0, next_poll - time.monotonic()))
            if time.monotonic() >= deadline:
                raise TimeoutError(f"prompt {prompt_id} did not finish within {time.monotonic() - start:.0f}s")
