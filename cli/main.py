"""Command line: `serve` a ComfyUI with this pack, `run` an API-format workflow on one, `convert` an
IPAdapter_plus workflow to this pack's nodes.

Exit codes (stable, for scripts):
  0 success · 2 bad arguments or workflow file · 3 ComfyUI not found, not started or
  unreachable · 4 prompt rejected at validation · 5 a node failed · 6 interrupted ·
  7 timed out
"""
from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Optional

from .client import FILE_KEYS, ComfyClient, ComfyClientError, ExecutionFailed, PromptRejected
from .server import ComfyServer, ComfyUIError, find_comfyui

EXIT_OK, EXIT_USAGE, EXIT_COMFYUI, EXIT_REJECTED, EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TIMEOUT = 0, 2, 3, 4, 5, 6, 7


class UsageError(Exception):
    pass


def load_api_workflow(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"workflow file not found: {path}")
    except json.JSONDecodeError as exc:
        raise UsageError(f"{path} is not valid JSON: {exc}")
    if isinstance(data, dict) and "nodes" in data and "links" in data:
        raise UsageError(f"{path} is a UI-format workflow; use its API-format twin (workflows/api/), or "
                         "export one from the editor with Workflow > Export (API)")
    if isinstance(data, dict) and "prompt" in data and isinstance(data["prompt"], dict):
        data = data["prompt"]
    if not isinstance(data, dict) or not all(isinstance(n, dict) and "class_type" in n for n in data.values()):
        raise UsageError(f"{path} is not an API-format workflow (a map of node id -> {{class_type, inputs}})")
    return data


def _parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def apply_overrides(prompt: dict, overrides: list[str]) -> dict:
    """Apply ``NODE.INPUT=VALUE`` edits; NODE is a node id, its title or its class_type."""
    for item in overrides:
        target, sep, value = item.partition("=")
        node_key, dot, input_name = target.rpartition(".")
        if not sep or not dot or not node_key or not input_name:
            raise UsageError(f"--set {item!r}: expected NODE.INPUT=VALUE")
        matches = [nid for nid, node in prompt.items()
                   if node_key in (nid, node.get("class_type"), node.get("_meta", {}).get("title"))]
        if not matches:
            raise UsageError(f"--set {item!r}: no node with id, title or type {node_key!r}")
        for nid in matches:
            prompt[nid].setdefault("inputs", {})[input_name] = _parse_value(value)
    return prompt


def _print_event(kind: str, data: dict, prompt: dict) -> None:
    if kind == "executing" and data.get("node") is not None:
        node = prompt.get(str(data["node"]), {})
        title = node.get("_meta", {}).get("title") or node.get("class_type", "?")
        print(f"  running node {data['node']} ({title})", file=sys.stderr, flush=True)
    elif kind == "progress":
        value, total = data.get("value", 0), data.get("max", 0) or 1
        bar = "#" * int(30 * value / total)
        print(f"\r    [{bar:<30}] {value}/{total}", end="\n" if value >= total else "", file=sys.stderr, flush=True)
    elif kind == "execution_cached" and data.get("nodes"):
        print(f"  cached: {', '.join(map(str, data['nodes']))}", file=sys.stderr, flush=True)


def save_outputs(client: ComfyClient, result, output_dir: Path) -> list[Path]:
    output_dir.mkdir(parents=True, exist_ok=True)
    saved = []
    for file in result.files():
        if file.get("type") not in ("output", "temp"):
            continue
        name = f"{file['node']}_{Path(file['filename']).name}"
        target = output_dir / name
        target.write_bytes(client.view(file))
        saved.append(target)
    texts = {nid: out for nid, out in result.outputs.items()
             if any(k not in FILE_KEYS for k in out)}
    if texts:
        (output_dir / "outputs.json").write_text(json.dumps(texts, indent=2, default=str))
        saved.append(output_dir / "outputs.json")
    return saved


CANCEL_SECONDS = 5.0   # the best-effort cancel on the way out: the server may be why we are leaving
STOP_SECONDS = 3.0     # a ComfyUI that `run` started gets this long after SIGTERM, then SIGKILL


def cmd_run(args) -> int:
    prompt = apply_overrides(load_api_workflow(Path(args.workflow)), args.set or [])
    missing = [image for image in args.upload or [] if not Path(image).is_file()]
    if missing:
        raise UsageError(f"--upload: no such file: {', '.join(missing)}")
    with _signals_interrupt():
        try:
            return _run(args, prompt)
        except KeyboardInterrupt:      # one more signal while winding down
            return EXIT_INTERRUPTED


def _run(args, prompt: dict) -> int:
    """Everything from here ends by ``--timeout``: starting ComfyUI, every request, the wait."""
    deadline = time.monotonic() + args.timeout
    server: Optional[ComfyServer] = None
    client: Optional[ComfyClient] = None
    prompt_id: Optional[str] = None
    try:
        if args.server:
            url = args.server
        else:
            server = _new_server(args)
            print(f"starting ComfyUI from {server.comfyui} ...", file=sys.stderr, flush=True)
            _start(server, deadline)
            url = server.url
        client = ComfyClient(url, deadline=deadline)
        client.system_stats()
        for image in args.upload or []:
            name = client.upload_image(image)
            print(f"uploaded {image} as {name}", file=sys.stderr, flush=True)
        on_event = None if args.quiet else (lambda kind, data: _print_event(kind, data, prompt))
        events = client.open_events() if on_event is not None else None
        try:
            prompt_id = client.queue_prompt(prompt)
            print(f"queued {args.workflow} on {url} as {prompt_id}", file=sys.stderr, flush=True)
            result = client.wait(prompt_id, args.timeout, on_event, events)
        finally:
            if events is not None:
                events.close()
        output_dir = Path(args.output) / result.prompt_id
        for path in save_outputs(client, result, output_dir):
            print(path)
        print(f"done: prompt {result.prompt_id}, outputs in {output_dir}", file=sys.stderr)
        return EXIT_OK
    except PromptRejected as exc:
        print(f"error: ComfyUI rejected the workflow:\n{exc}", file=sys.stderr)
        return EXIT_REJECTED
    except ExecutionFailed as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INTERRUPTED if exc.interrupted and not exc.error else EXIT_FAILED
    except TimeoutError as exc:
        _ignore_signals()
        print(f"error: timed out (--timeout {args.timeout:g}s): {exc}", file=sys.stderr, flush=True)
        _wind_down(client, prompt_id, server)
        return EXIT_TIMEOUT
    except KeyboardInterrupt:
        _ignore_signals()
        print("interrupted", file=sys.stderr, flush=True)
        _wind_down(client, prompt_id, server)
        return EXIT_INTERRUPTED
    except (ComfyUIError, ComfyClientError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_COMFYUI
    finally:
        if server is not None:
            _ignore_signals()
            server.cleanup()


def _new_server(args) -> ComfyServer:
    comfyui = find_comfyui(args.comfyui)
    if comfyui is None:
        raise ComfyUIError("no ComfyUI found: pass --server URL of a running one, or --comfyui PATH "
                           "(or set COMFYUI_PATH) to start one")
    return ComfyServer(comfyui, base_directory=Path(args.base_directory) if args.base_directory else None,
                       cpu=not args.gpu, stop_timeout=STOP_SECONDS)


def _start(server: ComfyServer, deadline: float, most: float = 180.0) -> None:
    left = deadline - time.monotonic()
    try:
        server.start(timeout=min(most, left))
    except ComfyUIError as exc:
        if left < most and time.monotonic() >= deadline:
            raise TimeoutError(str(exc)) from None
        raise


def _wind_down(client: Optional[ComfyClient], prompt_id: Optional[str], server: Optional[ComfyServer]) -> None:
    """Say what happens to the prompt; cancel it on a server we did not start (a few seconds at most)."""
    if server is not None:
        print("stopping the ComfyUI that run started", file=sys.stderr, flush=True)
        return
    if client is None or prompt_id is None:
        return
    client.deadline = time.monotonic() + CANCEL_SECONDS
    try:
        client.cancel(prompt_id)
        print(f"cancelled prompt {prompt_id} on the server", file=sys.stderr)
    except (ComfyClientError, OSError) as exc:
        print(f"warning: could not cancel prompt {prompt_id} on the server: {exc}", file=sys.stderr)


def _raise_keyboard_interrupt(*_args) -> None:
    raise KeyboardInterrupt


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def _signals_interrupt():
    """SIGINT and SIGTERM raise KeyboardInterrupt inside the block; the old handlers come back after.

    SIGINT is set explicitly because a process that a non-interactive shell starts in the
    background inherits SIGINT ignored: Python then keeps ignoring it, and neither Ctrl-C nor
    ``kill -INT`` would stop a run until its --timeout.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    saved = {sig: signal.getsignal(sig) for sig in STOP_SIGNALS}
    for sig in STOP_SIGNALS:
        signal.signal(sig, _raise_keyboard_interrupt)
    try:
        yield
    finally:
        for sig, handler in saved.items():
            if handler is not None:
                signal.signal(sig, handler)


def _ignore_signals() -> None:
    """While winding down (bounded: a cancel, stopping a server), another Ctrl-C must not cut the
    cleanup short and leave a ComfyUI running."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


def cmd_serve(args) -> int:
    comfyui = find_comfyui(args.comfyui)
    if comfyui is None:
        raise ComfyUIError("no ComfyUI found: run ./scripts/setup.sh (it provisions the pinned ComfyUI), pass --comfyui PATH or set COMFYUI_PATH")
    server = ComfyServer(comfyui, port=args.port, listen=args.listen, cpu=not args.gpu,
                         base_directory=Path(args.base_directory) if args.base_directory else None,
                         extra_args=list(args.comfy_args or []), console=True)
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        server.start()
        print(f"ComfyUI with OmniIdentity is serving on {server.url}  (models: {server.models_dir()}; "
              "Ctrl-C stops)", flush=True)
        return server.process.wait()
    except KeyboardInterrupt:
        return EXIT_OK
    finally:
        server.cleanup()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m omniid", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="start ComfyUI (the one setup provisioned, or COMFYUI_PATH) with this pack loaded")
    serve.add_argument("--comfyui", help="ComfyUI checkout (default: $COMFYUI_PATH, else the one scripts/setup.sh recorded)")
    serve.add_argument("--port", type=int, default=8188)
    serve.add_argument("--listen", default="127.0.0.1")
    serve.add_argument("--base-directory", help="ComfyUI base directory for models/input/output/custom_nodes")
    serve.add_argument("--gpu", action="store_true", help="use the GPU (default: --cpu)")
    serve.add_argument("comfy_args", nargs="*", help="extra ComfyUI arguments, after --")

    run = sub.add_parser("run", help="queue an API-format workflow and save its outputs")
    run.add_argument("workflow", help="API-format workflow JSON (e.g. workflows/*.api.json)")
    run.add_argument("--server", help="URL of a running ComfyUI; without it one is started and stopped")
    run.add_argument("--comfyui", help="ComfyUI checkout to start (default: $COMFYUI_PATH, else the one scripts/setup.sh recorded)")
    run.add_argument("--base-directory", help="base directory for a started ComfyUI")
    run.add_argument("--gpu", action="store_true", help="let a started ComfyUI use the GPU")
    run.add_argument("--set", action="append", metavar="NODE.INPUT=VALUE",
                     help="override an input; NODE is a node id, title or class_type; VALUE is JSON or text")
    run.add_argument("--upload", action="append", metavar="IMAGE", help="upload an image to ComfyUI's input folder first")
    run.add_argument("--output", default="omniid-output", help="folder for the outputs (a subfolder per prompt)")
    run.add_argument("--timeout", type=float, default=3600.0,
                     help="seconds the whole run may take (starting ComfyUI, uploads, the prompt, downloads); "
                          "at the end the prompt is cancelled and run exits with code 7")
    run.add_argument("--quiet", action="store_true", help="no progress on stderr")
    from .train import add_parser
    add_parser(sub)
    from .convert import add_parser as add_convert_parser
    add_convert_parser(sub)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "train":
            from .train import cmd_train
            return cmd_train(args)
        if args.command == "convert":
            from .convert import cmd_convert
            return cmd_convert(args)
        return cmd_serve(args) if args.command == "serve" else cmd_run(args)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ComfyUIError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_COMFYUI
