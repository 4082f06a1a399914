"""`python -m omniid run` and `serve` against a real ComfyUI, as a script would use them."""
import os
import signal
import subprocess
import sys
import time

from omniid.cli import main as cli
from omniid.cli.client import ComfyClient, ComfyClientError
from omniid.cli.server import PACK_ROOT, free_port
from support.cli_run import CliRun
from support.testing import WORKFLOWS

EXIT_BOUND = 10     # seconds `run` may take to exit after its --timeout or a Ctrl-C


def omniid(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "omniid", *args], cwd=PACK_ROOT, capture_output=True,
                          text=True, timeout=timeout)


def test_run_saves_outputs_and_reports_progress(comfy_server, tmp_path):
    done = omniid("run", str(WORKFLOWS / "api/face_crop.json"), "--server", comfy_server.url,
                  "--set", "Photo.image=biden.jpg", "--set", "Face crop.crop_size=128", "--output", str(tmp_path))
    assert done.returncode == cli.EXIT_OK, done.stderr
    saved = [line for line in done.stdout.splitlines() if line.endswith(".png")]
    assert len(saved) == 3 and all(os.path.isfile(p) for p in saved)
    assert "running node 3 (Face crop)" in done.stderr and "1/1" in done.stderr


def test_run_exit_codes_for_rejected_and_failed_prompts(comfy_server, tmp_path):
    rejected = omniid("run", str(WORKFLOWS / "api/face_crop.json"), "--server", comfy_server.url,
                      "--set", "Photo.image=obama.jpg", "--set", "Face crop.selection=random", "--quiet")
    assert rejected.returncode == cli.EXIT_REJECTED, rejected.stderr
    assert "selection" in rejected.stderr
    failed = omniid("run", str(WORKFLOWS / "api/face_crop.json"), "--server", comfy_server.url,
                    "--set", "Photo.image=cat.png", "--quiet", "--output", str(tmp_path))
    assert failed.returncode == cli.EXIT_FAILED
    assert "OmniIdentityFaceCrop" in failed.stderr and "No face found" in failed.stderr


def _long_prompt(tmp_path, name):
    import json
    from support.graph import Graph
    g = Graph()
    g.sd_sampling(steps=5000, prefix=f"cli/{name}")
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(g.nodes))
    return path


def _wait_cancelled(comfy_server, seconds=60):
    client = ComfyClient(comfy_server.url)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        queue = client.queue_state()
        if not queue.get("queue_running") and not queue.get("queue_pending"):
            return client
        time.sleep(0.5)
    raise AssertionError(f"the prompt still runs on the server: {client.queue_state()}")


def test_timeout_and_ctrl_c_cancel_the_prompt_on_the_server(comfy_server, tmp_path):
    timed_out = CliRun(["run", str(_long_prompt(tmp_path, "timeout")), "--server", comfy_server.url, "--quiet",
                        "--timeout", "8"], PACK_ROOT)
    code, err = timed_out.finish(8 + EXIT_BOUND)
    assert code == cli.EXIT_TIMEOUT, err
    assert "queued" in err and "cancelled prompt" in err, err
    _wait_cancelled(comfy_server)
    # SIGINT once the command has the prompt's id (it prints it), never when a timer fires; also
    # with SIGINT inherited ignored, as in a job a non-interactive shell starts in the background
    for inherited in (signal.SIG_DFL, signal.SIG_IGN):
        run = CliRun(["run", str(_long_prompt(tmp_path, f"ctrl_c_{int(inherited)}")), "--server", comfy_server.url,
                      "--quiet"], PACK_ROOT, sigint=inherited)
        run.wait_for("queued ")
        run.interrupt()
        code, err = run.finish(EXIT_BOUND)
        assert code == cli.EXIT_INTERRUPTED, err
        assert "cancelled prompt" in err, err
        _wait_cancelled(comfy_server)


def test_serve_starts_comfyui_with_the_pack_and_stops_on_sigterm(comfyui, tmp_path):
    port = free_port()
    log_path = tmp_path / "serve.log"
    base = tmp_path / "base"
    with open(log_path, "w") as log:
        process = subprocess.Popen([sys.executable, "-m", "omniid", "serve", "--comfyui", str(comfyui), "--port",
                                    str(port), "--base-directory", str(base), "--", "--database-url",
                                    "sqlite:///:memory:"], cwd=PACK_ROOT, stdout=log, stderr=subprocess.STDOUT)
    client = ComfyClient(f"http://127.0.0.1:{port}", timeout=5)
    try:
        deadline = time.monotonic() + 180
        while "is serving on" not in log_path.read_text():       # the CLI's own readiness line
            assert process.poll() is None, log_path.read_text()
            assert time.monotonic() < deadline, f"serve did not come up:\n{log_path.read_text()}"
            time.sleep(1)
        assert "OmniIdentityFaceCrop" in client.object_info()
        assert (base / "models" / "omni_identity").is_dir()
        assert (base / "custom_nodes" / "ComfyUI-OmniIdentity").resolve() == PACK_ROOT
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    output = log_path.read_text()
    assert process.returncode == cli.EXIT_OK, output
    assert "is serving on" in output
    try:
        client.system_stats()
        raise AssertionError("ComfyUI still answers after serve stopped")
    except ComfyClientError:
        pass
