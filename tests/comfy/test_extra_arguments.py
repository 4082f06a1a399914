"""Every callable the pack registers with ComfyUI accepts arguments a later ComfyUI adds, and passes them on."""
from pathlib import Path

from support.testing import facts_in_comfyui

SCRIPT = Path(__file__).with_name("extra_arguments.py")
REGISTERED = {"DecoupledAttention", "IdentityOnlyAttention", "MixedSelfAttention", "StreamCrossAttention",
              "AttentionRecording", "FluxAttentionOverride", "FluxBlockPatch", "record_flux_call", "TwoStreams",
              "FeatureCapture", "fresh_copy", "private_copy", "RBGuider.predict_noise"}


def test_every_registered_callable_takes_and_passes_on_unknown_arguments(comfyui):
    results = facts_in_comfyui(SCRIPT, comfyui)
    assert set(results) == REGISTERED
    failing = {name: r for name, r in results.items() if not (r["same"] and r["forwarded"])}
    assert not failing, failing
