"""Clones of a ComfyUI model that autograd can differentiate through, and the context a tracked
forward runs in.

ComfyUI runs nodes in inference mode, so the weights its loaders load are inference tensors,
which autograd cannot save for backward. A weight function on every diffusion-model layer of a
clone makes each forward see an ordinary copy instead:
- on a plain ModelPatcher, ComfyUI casts a copy of a weight whenever a weight function is set,
  and the copy made outside inference mode is already ordinary;
- with dynamic VRAM (ComfyUI 0.33+ on a GPU, ``is_dynamic()``), weights stream from resident
  storage and weight functions may see the stored tensors themselves. Such a model is first
  exchanged for its non-dynamic delegate (``get_non_dynamic_delegate()``, what ComfyUI's own
  CFGGuider uses where dynamic loading cannot serve), and the weight function copies any
  inference tensor it is handed explicitly, so neither path depends on how ComfyUI casts.
"""
from __future__ import annotations

import contextlib
import threading
import weakref

import torch

from .compat import comfyui_version


class GradientSupportError(RuntimeError):
    """This ComfyUI cannot give a model whose weights autograd can save."""


def gradient_ready(model):
    """A clone whose every diffusion-model layer uses a fresh, ordinary copy of its weights, so
    gradients flow through the frozen model to its inputs and to patches (RB-Guidance, adapter
    training). ``model`` itself is unchanged."""
    patched = non_dynamic(model).clone()
    for key in patched.model_state_dict():
        if key.startswith("diffusion_model.") and key.endswith((".weight", ".bias")):
            patched.add_weight_wrapper(key, fresh_copy)
    dm = patched.get_model_object("diffusion_model")
    wrapped = []          # an earlier clone's object patches may be in place while it is loaded: wrap their layers
    for name, module in dm.named_modules():
        if any(name.startswith(w + ".") for w in wrapped):
            continue
        if isinstance(module, CopiedParameters):
            wrapped.append(name)
            patched.add_object_patch(f"diffusion_model.{name}", CopiedParameters(module.inner))
        elif name and raw_inference_parameters(module):
            patched.add_object_patch(f"diffusion_model.{name}", CopiedParameters(module))
    return patched


def raw_inference_parameters(module) -> bool:
    """A leaf layer whose own parameters are inference tensors that no weight function reaches (not one of
    ComfyUI's cast layers; e.g. FLUX's RMSNorm scales in ComfyUI 0.3.64)."""
    return (not hasattr(module, "weight_function") and not any(True for _ in module.children())
            and any(p.is_inference() for p in module.parameters(recurse=False)))


class CopiedParameters(torch.nn.Module):
    """Object patch for a layer that ComfyUI's weight functions do not reach: where gradients are on, the layer
    runs (``torch.func.functional_call``, the layer itself unchanged) with ordinary copies of its inference
    parameters; otherwise it runs as it is."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return self.inner(*args, **kwargs)
        copies = {name: fresh_copy(p) for name, p in self.inner.named_parameters(recurse=False)}
        return torch.func.functional_call(self.inner, copies, args, kwargs)


def non_dynamic(model):
    """``model``, or its non-dynamic delegate when ComfyUI manages it with dynamic VRAM."""
    is_dynamic = getattr(model, "is_dynamic", None)
    if is_dynamic is None or not is_dynamic():
        return model
    delegate = getattr(model, "get_non_dynamic_delegate", None)
    if delegate is None:
        raise GradientSupportError(
            f"ComfyUI {comfyui_version()} manages this model with dynamic VRAM and offers no non-dynamic delegate, so "
            "gradients cannot flow through it; start ComfyUI with --disable-dynamic-vram for RB-Guidance and training")
    return delegate()


def fresh_copy(weight, *args, **kwargs):
    """Weight function: an ordinary tensor for autograd (a copy where ComfyUI handed over an inference
    tensor; ComfyUI's own cast copy otherwise, which is ordinary already). A forward that keeps no graph
    (gradients off: ComfyUI's inference mode, a sampler's no_grad) saves nothing for a backward and gets
    the weight as handed over: a guider's untracked passes copy no weight a second time. Inside
    ``tracked_forward`` the copy is noted, so that the backward keeps the stored weight, not the copy."""
    if torch.is_tensor(weight) and weight.is_inference() and torch.is_grad_enabled():
        with torch.inference_mode(False):
            copy = weight.clone()
        copies = getattr(_TRACKED, "copies", None)
        if copies is not None:
            copies[copy.untyped_storage().data_ptr()] = (weakref.ref(copy), weight)
        return copy
    return weight


_TRACKED = threading.local()      # per tracked forward: weight copies made, stream storages to snapshot


def _pack(saved: torch.Tensor):
    """Saved-tensor hook: a weight copy is saved as its stored weight (copied again in the backward), so
    the copies do not stay alive until the backward; a snapshot is kept of a tensor a block will update in
    place (``snapshot_saves``)."""
    try:
        storage = saved.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError, TypeError):       # tensor subclasses without one storage
        return saved
    entry = _TRACKED.copies.get(storage)
    if entry is not None and entry[0]() is not None:
        return _Stored(entry[1], saved.size(), saved.stride(), saved.storage_offset())
    if storage in _TRACKED.snapshots:
        return saved.clone()
    return saved


class _Stored:
    def __init__(self, weight, size, stride, offset):
        self.weight, self.size, self.stride, self.offset = weight, size, stride, offset


def _unpack(packed):
    if isinstance(packed, _Stored):
        with torch.inference_mode(False):
            return packed.weight.clone().as_strided(packed.size, packed.stride, packed.offset)
    return packed


@contextlib.contextmanager
def snapshot_saves(*tensors: torch.Tensor):
    """Inside ``tracked_forward``: what autograd saves of ``tensors`` (which the code run here updates in
    place) is saved as a copy taken at that moment. Outside it, nothing is changed."""
    if getattr(_TRACKED, "snapshots", None) is None:
        yield
        return
    storages = {t.untyped_storage().data_ptr() for t in tensors} - _TRACKED.snapshots
    _TRACKED.snapshots |= storages
    try:
        yield
    finally:
        _TRACKED.snapshots -= storages


@contextlib.contextmanager
def tracked_forward():
    """Run model calls whose graph autograd keeps: out of inference mode, gradients on, ComfyUI's training
    flag set where it has one (its quantized layers then take their differentiable path), and the saved-tensor
    hooks above (the backward re-copies the stored weights instead of keeping each layer's copy)."""
    import comfy.model_management as mm
    has_flag = hasattr(mm, "in_training")
    before = getattr(mm, "in_training", False)
    outer = getattr(_TRACKED, "copies", None), getattr(_TRACKED, "snapshots", None)
    _TRACKED.copies, _TRACKED.snapshots = {}, set()
    with torch.inference_mode(False), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(_pack, _unpack):
        if has_flag:
            mm.in_training = True
        try:
            yield
        finally:
            if has_flag:
                mm.in_training = before
            _TRACKED.copies, _TRACKED.snapshots = outer
