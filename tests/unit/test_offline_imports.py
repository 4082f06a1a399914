"""The optional face backend reaches no network and writes nothing to the user's home when imported."""
import json
import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("insightface")

PROBE = r'''
import json, os, socket, sys
attempts = []

def refuse(*args, **kwargs):
    attempts.append(repr(args[1:] if len(args) > 1 else args))
    raise OSError("network disabled by the test")

socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse
from omniid.encoders.face import create_analyzer
from support.assets import random_arcface_onnx
onnx = random_arcface_onnx(__import__("pathlib").Path(sys.argv[1]) / "arcface.onnx")
analyzer = create_analyzer("dlib", arcface_model=str(onnx), library_dir=sys.argv[2])
import insightface, albumentations  # noqa: F401  (both imported through the backend)
print(json.dumps({"attempts": attempts, "modules": sorted(m for m in ("insightface", "albumentations",
                                                                    "matplotlib") if m in sys.modules)}))
'''


def test_insightface_path_makes_no_network_call_and_leaves_home_alone(tmp_path):
    home, library = tmp_path / "home", tmp_path / "libraries"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("NO_ALBUMENTATIONS_UPDATE", "MPLCONFIGDIR")}
    env.update(HOME=str(home), XDG_CONFIG_HOME=str(home / ".config"), XDG_CACHE_HOME=str(home / ".cache"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(os.path.dirname(os.path.dirname(__file__))),
                                                          env.get("PYTHONPATH")])))
    # no network namespace interfaces where the machine allows it (native code cannot reach out either);
    # Python-level connection attempts are recorded by the probe in any case
    offline = ["unshare", "-n"] if shutil.which("unshare") and subprocess.run(
        ["unshare", "-n", "true"], capture_output=True).returncode == 0 else []
    done = subprocess.run([*offline, sys.executable, "-c", PROBE, str(tmp_path), str(library)], capture_output=True,
                          text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["attempts"] == []
    assert "insightface" in result["modules"] and "albumentations" in result["modules"]
    assert list(home.rglob("*")) == [], f"written to the home folder: {list(home.rglob('*'))}"
