"""`omniid run` returns soon after its --timeout or a Ctrl-C, whatever the server does (no ComfyUI needed).

The command runs in a subprocess against a fake server (support.misbehaving_comfyui) that
accepts and never answers, answers a byte at a time, or queues the prompt and never finishes
it. SIGINT is sent once the server has seen the request it stalls on, or once the command
says its prompt is queued; never after a sleep. The INHERITED_SIGINT tests also run with
SIGINT inherited ignored, as a shell's background job gets it: `run` must still stop on it.
"""
import contextlib
import json
import os
import signal
import sys
import threading
import time

import pytest

from omniid.cli import main as cli
from omniid.cli.client import ComfyClient, ComfyClientError
from support.cli_run import CliRun
from support.misbehaving_comfyui import PROMPT_ID, NeverFinishingComfyUI, StallingServer, fake_checkout

BOUND = 10.0        # seconds allowed after the deadline or the signal; the exit itself takes well under 1 s
TIMEOUT = 2.0       # the runs' --timeout
SERVER_SAW = 60.0   # generous: how long the server may take to see the command's request (a slow start)

PROMPT = {"1": {"class_type": "LoadImage", "inputs": {"image": "a.png"}}}
INHERITED_SIGINT = pytest.mark.parametrize("inherited", [signal.SIG_DFL, signal.SIG_IGN], ids=["sigint", "sigint-ignored"])


@pytest.fixture
def workflow(tmp_path):
    path = tmp_path / "wf.json"
    path.write_text(json.dumps(PROMPT))
    return str(path)


@pytest.fixture
def stalling(request):
    server = StallingServer(request.param)
    yield server
    server.close()


def never_finishing(**kwargs):
    return NeverFinishingComfyUI(**kwargs).start()


def assert_exits_after_timeout(run: CliRun) -> str:
    code, err = run.finish(TIMEOUT + BOUND)
    assert code == cli.EXIT_TIMEOUT, err
    assert f"error: timed out (--timeout {TIMEOUT:g}s)" in err
    return err


def within(seconds, fn):
    """Run ``fn`` on a thread: its result or exception, failing if it is still blocked after ``seconds``."""
    outcome = {}

    def target():
        try:
            outcome["result"] = fn()
        except BaseException as exc:          # noqa: B902 (handed back to the test)
            outcome["error"] = exc

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    thread.join(seconds)
    assert not thread.is_alive(), f"still blocked after {seconds}s"
    return outcome


# -- the client on its own --------------------------------------------------------------------
@pytest.mark.parametrize("stalling", ["silent", "partial", "trickle"], indirect=True)
def test_a_request_ends_by_the_client_timeout_whatever_the_server_sends(stalling):
    outcome = within(BOUND, lambda: ComfyClient(stalling.url, timeout=1).system_stats())
    assert isinstance(outcome.get("error"), ComfyClientError), outcome
    assert "did not answer GET /system_stats within 1s" in str(outcome["error"])


@pytest.mark.parametrize("stalling", ["trickle"], indirect=True)
def test_a_request_past_the_client_deadline_is_a_timeout(stalling):
    client = ComfyClient(stalling.url, deadline=time.monotonic() + 1)
    outcome = within(BOUND, client.system_stats)
    assert isinstance(outcome.get("error"), TimeoutError), outcome


@pytest.mark.parametrize("ws", ["silent", "flood"])
def test_wait_ends_by_its_timeout_while_the_websocket_stalls_or_floods(ws):
    server = never_finishing(ws=ws, cancel="answer")
    client = ComfyClient(server.url)
    events = client.open_events()
    try:
        assert events is not None, "the fake server's websocket handshake failed"
        outcome = within(BOUND, lambda: client.wait(PROMPT_ID, 1, lambda kind, data: None, events))
    finally:
        if events is not None:
            events.close()
        server.close()
    assert isinstance(outcome.get("error"), TimeoutError), outcome


# -- `omniid run --timeout` ---------------------------------------------------------------------
@pytest.mark.parametrize("stalling", ["silent", "partial", "trickle"], indirect=True)
def test_run_times_out_on_a_server_that_stalls_its_answer(stalling, workflow, tmp_path):
    run = CliRun(["run", workflow, "--server", stalling.url, "--timeout", str(TIMEOUT), "--quiet"], tmp_path)
    assert_exits_after_timeout(run)
    assert stalling.request_seen.is_set()


@pytest.mark.parametrize("ws", ["silent", "flood"])
def test_run_times_out_on_a_prompt_that_never_finishes_and_a_cancel_that_stalls(ws, workflow, tmp_path):
    server = never_finishing(ws=ws, cancel="stall")
    try:
        run = CliRun(["run", workflow, "--server", server.url, "--timeout", str(TIMEOUT)], tmp_path)  # with progress
        err = assert_exits_after_timeout(run)
    finally:
        server.close()
    # the deadline may pass before the prompt is queued on a slow machine; then there is nothing to cancel
    assert (f"could not cancel prompt {PROMPT_ID}" in err) == server.prompt_queued.is_set(), err


# -- Ctrl-C ---------------------------------------------------------------------------------------
def assert_exits_after_sigint(run: CliRun) -> str:
    sent = run.interrupt()
    code, err = run.finish(BOUND)
    assert code == cli.EXIT_INTERRUPTED, err
    assert "interrupted" in err
    assert time.monotonic() - sent < BOUND
    return err


@INHERITED_SIGINT
@pytest.mark.parametrize("stalling", ["silent"], indirect=True)
def test_ctrl_c_during_a_request_that_is_never_answered(stalling, inherited, workflow, tmp_path):
    run = CliRun(["run", workflow, "--server", stalling.url, "--quiet"], tmp_path, sigint=inherited)
    assert stalling.request_seen.wait(SERVER_SAW), "the command never reached the server"
    assert_exits_after_sigint(run)


@INHERITED_SIGINT
def test_ctrl_c_while_the_prompt_runs_and_the_cancel_stalls(inherited, workflow, tmp_path):
    server = never_finishing(ws="silent", cancel="stall")
    try:
        run = CliRun(["run", workflow, "--server", server.url], tmp_path, sigint=inherited)
        run.wait_for(f"queued {workflow}")
        err = assert_exits_after_sigint(run)
    finally:
        server.close()
    assert server.cancel_seen.is_set()
    assert f"could not cancel prompt {PROMPT_ID} on the server" in err


def test_ctrl_c_cancels_the_prompt_on_a_server_that_answers(workflow, tmp_path):
    server = never_finishing(ws="none", cancel="answer")
    try:
        run = CliRun(["run", workflow, "--server", server.url, "--quiet"], tmp_path)
        run.wait_for(f"queued {workflow}")
        err = assert_exits_after_sigint(run)
    finally:
        server.close()
    assert f"cancelled prompt {PROMPT_ID} on the server" in err
    assert ("/queue", {"delete": [PROMPT_ID]}) in server.posts
    assert ("/interrupt", {"prompt_id": PROMPT_ID}) in server.posts


@INHERITED_SIGINT
def test_ctrl_c_stops_the_comfyui_that_run_started_even_if_it_ignores_sigterm(inherited, workflow, tmp_path):
    checkout = fake_checkout(tmp_path / "ComfyUI")
    run = CliRun(["run", workflow, "--comfyui", str(checkout), "--base-directory", str(tmp_path / "base"), "--quiet"],
                 tmp_path, sigint=inherited, env={"COMFYUI_PYTHON": sys.executable})
    try:
        run.wait_for(f"queued {workflow}")
        err = assert_exits_after_sigint(run)
        assert "stopping the ComfyUI that run started" in err
        with pytest.raises(ProcessLookupError):
            os.kill(server_pid(checkout), 0)
    except BaseException:
        with contextlib.suppress(OSError, ValueError):   # a failed test leaves no server behind
            os.kill(server_pid(checkout), signal.SIGKILL)
        raise


def server_pid(checkout) -> int:
    return int((checkout / "server.pid").read_text())
