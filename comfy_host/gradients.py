"""Clones of a ComfyUI model that autograd can differentiate through."""
from __future__ import annotations


def gradient_ready(model):
    """A clone whose every diffusion-model layer uses a fresh copy of its weights.

    ComfyUI runs nodes in inference mode, so the loaded weights are inference tensors that
    autograd cannot save; with a weight function set, ComfyUI casts a copy per call, and a
    copy made outside inference mode is an ordinary tensor. Gradients then flow through
    the frozen model to its inputs and to patches (RB-Guidance, adapter training)."""
    patched = model.clone()
    for key in model.model_state_dict():
        if key.startswith("diffusion_model.") and key.endswith((".weight", ".bias")):
            patched.add_weight_wrapper(key, fresh_copy)
    return patched


def fresh_copy(weight, *args, **kwargs):
    # ComfyUI's cast copies a weight as soon as a weight function is set; the copy made
    # outside inference mode is an ordinary tensor autograd can save.
    return weight
