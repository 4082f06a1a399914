"""The ComfyUI engine of the pack: everything that touches ComfyUI's model, sampler and memory
manager, through its public extension points only, with public names.

- ``layers``: which attention layers a model has, in the order adapters number them.
- ``identity``: identity injection on a clone (UNet attn2 patches; FLUX dit patches + an
  attention override).
- ``two_streams``: Infinite-ID's identity and text streams in one batched model call.
- ``attention``: the attention override that feeds ``guidance.attention_capture``.
- ``gradients``: clones whose weights autograd can save (ComfyUI loads inference tensors).
- ``rb_guider``: RB-Guidance as a CFGGuider.
- ``denoiser``: a ComfyUI MODEL as the frozen denoiser of the training objectives.
- ``clip_vision``: ComfyUI's CLIP_VISION with one image layout, and the CLIP token cache.
- ``encoder_model``: identity encoders under ComfyUI's memory manager.
- ``folders``: the pack's model folders, dataset folders, and one naming rule for files it saves.
- ``progress``: progress bars, cancel checks and the training loop inside a node.
- ``compat``: the touchpoints where supported ComfyUI releases differ, each detected (never
  inferred from a version), and the line the pack logs at load.

``nodes/`` and this package are the only code of the pack that imports ComfyUI; the core
(encoders/, guidance/, training/) never imports either.
"""
