"""Gradients through a ComfyUI model on both weight paths: run with the Python that runs ComfyUI.

    python tests/comfy/gradients_inprocess.py --comfyui PATH

- A model whose weights were loaded in inference mode (as every ComfyUI loader does) takes a
  backward pass through ``gradient_ready`` + ``tracked_forward``, and not without them.
- Dynamic VRAM (ComfyUI 0.33+ on a GPU) cannot run on a CPU, so its contract is played by a
  stand-in patcher that reports ``is_dynamic()``: ``gradient_ready`` must take its non-dynamic
  delegate, and a dynamic model with no delegate is a clear error. The weight function, handed a
  stored inference tensor itself (no cast copy, as dynamic loading may do), must copy it.
- While a gradient-ready clone is loaded its layers, manual-cast ones included, compute with ordinary
  tensors on the stored weights' storage (no copy: a pass without gradients is bit for bit the plain
  model's), a layer with another patch's weight function gets private copies in tracked forwards
  only, and every layer is as it was
  once another clone of the model is loaded; the gradient equals one taken through explicit copies.
- ``tracked_forward`` sets ComfyUI's training flag where it has one, and restores it.
Prints one JSON line of facts that tests/comfy/test_gradients.py asserts.
"""
from __future__ import annotations

import json

import comfy_process


def main() -> None:
    comfy_process.start()
    import comfy.model_management as mm
    import comfy.model_patcher
    import torch

    from omniid.comfy_host.gradients import GradientSupportError, fresh_copy, gradient_ready, tracked_forward
    from inprocess import small_sd15

    facts = {}
    with torch.inference_mode():                      # as ComfyUI's loaders run
        model, _ = small_sd15(torch, seed=3)
    dm = model.get_model_object("diffusion_model")
    facts["loaded_as_inference_tensors"] = all(p.is_inference() for p in dm.parameters())

    def backward_through(patcher) -> str:
        """'ok', or the error a backward pass through ``patcher``'s UNet raises."""
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(1, 4, 8, 8, generator=generator)
        context = torch.randn(1, 3, 768, generator=generator)
        mm.load_models_gpu([patcher])
        try:
            with tracked_forward():
                x = x.clone().requires_grad_(True)
                out = patcher.model.diffusion_model(x, torch.tensor([500.0]), context, transformer_options={})
                out.square().mean().backward()
            return "ok" if x.grad is not None and bool(torch.isfinite(x.grad).all()) else "no gradient"
        except RuntimeError as exc:
            return str(exc).splitlines()[0]

    facts["plain_clone"] = backward_through(model.clone())
    facts["gradient_ready"] = backward_through(gradient_ready(model))

    class DynamicStandIn(comfy.model_patcher.ModelPatcher):
        """Reports dynamic VRAM; its delegate is an ordinary clone."""
        delegations = 0

        def is_dynamic(self):
            return True

        def get_non_dynamic_delegate(self):
            DynamicStandIn.delegations += 1
            return comfy.model_patcher.ModelPatcher(self.model, load_device=self.load_device,
                                                    offload_device=self.offload_device)

    cpu = torch.device("cpu")
    dynamic = DynamicStandIn(model.model, load_device=cpu, offload_device=cpu)
    ready = gradient_ready(dynamic)
    facts["delegations"] = DynamicStandIn.delegations
    facts["ready_is_dynamic"] = bool(getattr(ready, "is_dynamic", lambda: False)())
    facts["delegate_backward"] = backward_through(ready)

    class DynamicWithoutDelegate(comfy.model_patcher.ModelPatcher):
        def is_dynamic(self):
            return True

    DynamicWithoutDelegate.get_non_dynamic_delegate = None
    try:
        gradient_ready(DynamicWithoutDelegate(model.model, load_device=cpu, offload_device=cpu))
        facts["no_delegate_error"] = ""
    except GradientSupportError as exc:
        facts["no_delegate_error"] = str(exc)

    # a weight function handed the stored inference tensor itself, as dynamic loading may do
    with torch.inference_mode():
        stored = torch.randn(4, 4, generator=torch.Generator().manual_seed(1))
    with tracked_forward():
        copied = fresh_copy(stored)
        x = torch.ones(2, 4, requires_grad=True)
        (x @ copied).sum().backward()
        facts["fresh_copy"] = {"inference": bool(copied.is_inference()), "equal": bool(torch.equal(copied, stored)),
                               "grad": bool(torch.allclose(x.grad, stored.sum(1).expand(2, 4)))}
        try:
            y = torch.ones(2, 4, requires_grad=True)
            (y @ stored).sum().backward()
            facts["stored_backward"] = "ok"
        except RuntimeError as exc:
            facts["stored_backward"] = str(exc).splitlines()[0]

    # the backward keeps the stored weight, not each layer's copy: the copy is gone before the backward runs
    import gc
    import weakref
    with tracked_forward():
        x = torch.ones(2, 4, requires_grad=True)
        copy = fresh_copy(stored)
        alive = weakref.ref(copy)
        out = torch.nn.functional.linear(torch.tanh(x), copy).square().sum()
        del copy
        gc.collect()
        facts["copy_released_before_backward"] = alive() is None
        out.backward()
        expected = torch.ones(2, 4, requires_grad=True)
        torch.nn.functional.linear(torch.tanh(expected), stored.clone()).square().sum().backward()
        facts["released_copy_gradient_equal"] = bool(torch.equal(x.grad, expected.grad))

    facts.update(loaded_weights(torch, mm, model, gradient_ready, tracked_forward))

    has_flag = hasattr(mm, "in_training")
    inside = []
    with tracked_forward():
        inside.append(getattr(mm, "in_training", None))
    facts["training_flag"] = {"has": has_flag, "inside": inside[0], "after": getattr(mm, "in_training", None)}
    print(json.dumps(facts))


def loaded_weights(torch, mm, model, gradient_ready, tracked_forward) -> dict:
    """Facts about the weights a loaded gradient-ready clone computes with (see the module docstring)."""
    from omniid.comfy_host.gradients import private_copy
    dm = model.get_model_object("diffusion_model")
    generator = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 8, 8, generator=generator)
    context = torch.randn(1, 3, 768, generator=generator)
    timestep = torch.tensor([500.0])
    manual = dm.input_blocks[0][0]                        # a manual-cast layer (resident, cast per call)
    manual.comfy_cast_weights = True
    cast = dm.out[2]                                      # a layer with another patch's weight function
    cast_key = "diffusion_model.out.2.weight"

    def unchanged(weight, *args, **kwargs):
        return weight

    def untracked():
        with torch.inference_mode():
            return dm(x, timestep, context, transformer_options={})

    def tracked_gradient(parameters=None):
        with tracked_forward():
            z = x.clone().requires_grad_(True)
            if parameters is None:
                out = dm(z, timestep, context, transformer_options={})
            else:
                out = torch.func.functional_call(dm, parameters, (z, timestep, context), {"transformer_options": {}})
            out.square().mean().backward()
        return z.grad

    plain = model.clone()
    mm.load_models_gpu([plain])
    stored = {name: p for name, p in dm.named_parameters()}
    plain_out = untracked()
    with torch.inference_mode(False):
        copies = {name: p.clone() for name, p in stored.items()}
    expected = tracked_gradient(copies)
    ready = gradient_ready(model)
    ready.add_weight_wrapper(cast_key, unchanged)
    mm.load_models_gpu([ready])
    loaded = dict(dm.named_parameters())
    resident = {name: p for name, p in loaded.items() if not name.startswith("out.2.")}
    facts = {
        "resident_ordinary_same_storage": all(not p.is_inference() and p.data_ptr() == stored[name].data_ptr()
                                              for name, p in resident.items()),
        "resident_without_weight_functions": all(not getattr(m, "weight_function", []) for m in dm.modules()
                                                 if m is not cast),
        "cast_layer_functions": [cast.weight_function == [unchanged, private_copy], private_copy in cast.bias_function],
        "untracked_bit_equal": bool(torch.equal(untracked(), plain_out)),
        "gradient_equal_to_copies": bool(torch.equal(tracked_gradient(), expected)),
    }
    mm.load_models_gpu([plain])
    facts["restored_after_unload"] = (all(p is stored[name] for name, p in dm.named_parameters())
                                      and private_copy not in cast.weight_function)
    del manual.comfy_cast_weights
    return facts


if __name__ == "__main__":
    main()
