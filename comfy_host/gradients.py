"""Clones of a ComfyUI model that autograd can differentiate through, and the context a tracked
forward runs in.

ComfyUI runs nodes in inference mode, so the weights its loaders load are inference tensors,
which autograd cannot save for backward. While a clone from ``gradient_ready`` is loaded, an
injection (``set_injections``: ComfyUI ejects it before every load, partial load, unload or weight
patch and injects it again after) gives the diffusion model's layers weights autograd can save:
- a layer that computes with its stored weight gets that weight as an ordinary tensor on the same
  storage (no copy, the same numbers, the same bits in every pass);
- a layer whose weights ComfyUI moves or transforms per call (offloaded in a low-VRAM load, quantized,
  already patched with weight functions) gets a weight function that, in a forward whose graph is
  kept, hands autograd a tensor the call owns: the cast may be a view of a buffer the next layer's
  cast overwrites. A resident manual-cast layer is of the first kind (its cast is a new tensor).
So a forward that keeps no graph (unguided steps, unconditional and reference passes) copies no
weight, and a tracked forward copies only the weights of cast layers that its gradient path runs.
With dynamic VRAM (ComfyUI 0.33+ on a GPU, ``is_dynamic()``) weights stream from resident storage
through buffers a layer does not own; such a model is first exchanged for its non-dynamic delegate
(``get_non_dynamic_delegate()``, what ComfyUI's own CFGGuider uses where dynamic loading cannot
serve), whose layers are of the two kinds above.
"""
from __future__ import annotations

import contextlib
import threading
import weakref

import torch

from .compat import comfyui_version

INJECTION_KEY = "omniid_gradients"


class GradientSupportError(RuntimeError):
    """This ComfyUI cannot give a model whose weights autograd can save."""


def gradient_ready(model):
    """A clone whose diffusion-model layers, while it is loaded, compute with weights autograd can save
    (ordinary tensors on the stored weights' storage, or private copies where ComfyUI casts per call), so
    gradients flow through the frozen model to its inputs and to patches (RB-Guidance, adapter training).
    ``model`` itself is unchanged."""
    patched = non_dynamic(model).clone()
    if not hasattr(patched, "set_injections"):
        raise GradientSupportError(f"ComfyUI {comfyui_version()} has no model injections (ModelPatcher.set_injections), "
                                   "which gradients through its models need")
    from comfy.patcher_extension import PatcherInjection
    patched.set_injections(INJECTION_KEY, [PatcherInjection(inject=_inject, eject=_eject)])
    return patched


def _cast_per_call(module, device: torch.device) -> bool:
    """A ComfyUI layer whose forward may compute with a tensor it does not own: its weights are moved to
    ``device`` per call (a low-VRAM load's offloaded layers; the move may land in a buffer the next layer's
    cast reuses), or go through weight functions (another patch's, which may return anything), or are
    quantized. A resident layer, manual-cast ones included, computes with its stored weight or a new cast."""
    if not hasattr(module, "weight_function"):
        return False
    params = list(module.parameters(recurse=False))
    return bool(module.weight_function or module.bias_function
                or any(type(p) is not torch.nn.Parameter or not _on(p.device, device) for p in params))


def _on(device: torch.device, target: torch.device) -> bool:
    return device.type == target.type and (device.index is None or target.index is None or device.index == target.index)


def _inject(patcher, *args, **kwargs) -> None:
    """Loaded: stored inference weights become ordinary tensors on their storage; layers cast per call copy in
    tracked forwards."""
    device = torch.device(patcher.load_device)
    for module in patcher.model.diffusion_model.modules():
        if _cast_per_call(module, device):
            for attribute in ("weight_function", "bias_function"):
                functions = getattr(module, attribute)
                if private_copy not in functions:
                    setattr(module, attribute, [*functions, private_copy])
            continue
        for name, param in list(module._parameters.items()):
            if param is not None and param.is_inference() and type(param) is torch.nn.Parameter:
                setattr(module, name, _ordinary(param))


def _eject(patcher, *args, **kwargs) -> None:
    """Before ComfyUI touches the weights, and when the clone is unloaded: every layer as it was."""
    for module in patcher.model.diffusion_model.modules():
        for attribute in ("weight_function", "bias_function"):
            functions = module.__dict__.get(attribute)
            if functions is not None and private_copy in functions:
                setattr(module, attribute, [f for f in functions if f is not private_copy])
        for name, param in list(module._parameters.items()):
            stored = getattr(param, "_omniid_stored", None)
            if stored is not None:
                setattr(module, name, stored)


def _ordinary(stored: torch.nn.Parameter) -> torch.nn.Parameter:
    """An ordinary (not inference) parameter on ``stored``'s storage: autograd can save it, and it holds the
    stored numbers because it is them (nothing writes the weights between a tracked forward and its
    backward: ComfyUI ejects this before it loads or patches weights)."""
    with torch.inference_mode(False):
        view = torch.empty(0, dtype=stored.dtype, device=stored.device).set_(
            stored.untyped_storage(), stored.storage_offset(), stored.size(), stored.stride())
        ordinary = torch.nn.Parameter(view, requires_grad=False)
    ordinary._omniid_stored = stored
    return ordinary


def private_copy(weight, *args, **kwargs):
    """Weight function of the layers ComfyUI casts per call. In a forward whose graph is kept, autograd gets a
    tensor this call owns: ComfyUI's cast itself where it is one (a new tensor of its own storage: a move or a
    dtype change), else a copy (an inference tensor, or a view of a cast buffer that the next layer's cast
    reuses). Otherwise the weight as handed over."""
    if not (torch.is_tensor(weight) and torch.is_grad_enabled() and not torch.is_inference_mode_enabled()):
        return weight
    if _owns_storage(weight):
        return weight
    return weight.clone()


def _owns_storage(t: torch.Tensor) -> bool:
    try:
        return (not t.is_inference() and t._base is None and t.storage_offset() == 0
                and t.untyped_storage().nbytes() == t.numel() * t.element_size())
    except (RuntimeError, NotImplementedError, TypeError):       # tensor subclasses without one storage
        return False


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
    """Weight function for a layer that hands its stored weight over (as dynamic loading may): an ordinary copy
    of an inference tensor where gradients are on, the weight as handed over otherwise. Inside
    ``tracked_forward`` the copy is noted, so that the backward keeps the stored weight, not the copy (copied
    again there). ``gradient_ready`` clones do not need it; it is for weight wrappers of one's own."""
    if torch.is_tensor(weight) and weight.is_inference() and torch.is_grad_enabled():
        with torch.inference_mode(False):
            copy = weight.clone()
        copies = getattr(_TRACKED, "copies", None)
        if copies is not None:
            copies[copy.untyped_storage().data_ptr()] = (weakref.ref(copy), weight)
        return copy
    return weight


_TRACKED = threading.local()      # per tracked forward: fresh_copy's copies, stream storages to snapshot


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
    hooks above (snapshots of streams updated in place; ``fresh_copy``'s copies saved as their stored weight)."""
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
