"""The diffusers engine of the pack: the host outside ComfyUI (training under torchrun, library users).

- ``layers``: the attention layers of a ``UNet2DConditionModel`` (SD1.5, SDXL) or a
  ``FluxTransformer2DModel`` in the order adapters number them, with ComfyUI's block names.
- ``processors``: diffusers attention processors that run the core's decoupled attention
  (``guidance.decoupled``, ``guidance.flux_identity``): one math, two hosts.
- ``identity``: ``apply_identity`` / ``remove_identity`` and ``identity_call`` (the sigma,
  CFG layout and latent size of a call, which ComfyUI hands its patches itself).
- ``denoiser``: a diffusers model as the frozen denoiser of the flow-matching objective.
- ``models``: loading a base model (folder or single file) and its VAE.
- ``train``: stage 2 under torchrun (DDP, or FSDP of the frozen base).

This package imports diffusers; nothing on the ComfyUI path (root ``__init__``, ``nodes/``,
``comfy_host/``) imports it.
"""
import importlib.util

_MISSING = [name for name in ("diffusers", "transformers") if importlib.util.find_spec(name) is None]
if _MISSING:
    raise ImportError(f"the training host outside ComfyUI needs {' and '.join(_MISSING)}, which the nodes do not: "
                      "install them with  pip install -r requirements-train.txt  (in this repository) or "
                      "pip install \"comfyui-omniidentity[train]\"")
