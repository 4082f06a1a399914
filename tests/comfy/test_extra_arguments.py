"""Every callable the pack registers with ComfyUI accepts arguments a later ComfyUI adds, and passes them on."""
import json
import subprocess
from pathlib import Path

from omniid.cli.server import comfyui_python

SCRIPT = Path(__file__).with_name("extra_arguments.py")
REGISTERED = {"DecoupledAttention", "IdentityOnlyAttention", "MixedSelfAttention", "StreamCrossAttention",
              "AttentionRecording", "FluxAttentionOverride", "FluxBlockPatch", "record_flux_call", "TwoStreams",
              "FeatureCapture", "fresh_copy", "RBGuider.predict_noise"}


def test_every_registered_callable_takes_and_passes_on_unknown_arguments(comfyui):
    done = subprocess.run([comfyui_python(comfyui), str(SCRIPT), "--comfyui", str(comfyui)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(results) == REGISTERED
    failing = {name: r for name, r in results.items() if not (r["same"] and r["forwarded"])}
    assert not failing, failing
