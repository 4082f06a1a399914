"""RB-Guidance's captures on a DiT whose forward offers no block replace patches (Z-Image in ComfyUI 0.33).

Z-Image's forward marks each main layer in transformer_options (``block_type`` "double", ``block_index`` i)
before it runs, and after it calls the ``patches["double_block"]`` patches with that layer's output image
tokens. Both are public patch points, and RB-Guidance reads the model through them alone:

- a ``double_block`` patch (appended after any other pack's) keeps the generated image's tokens of the
  feature layer's output (the padding tokens after them are left out), reshaped to the latent's token grid,
  then stops the forward (reference pass) or lets it go on without gradients (the step's own conditional
  pass: nothing after the features is needed for the gradient). It changes nothing in the stream;
- the attention override records the joint attention of the main layers up to the feature layer, found by
  those marks (the caption and noise refiners, which run unmarked, are not recorded). The joint sequence is
  the caption (padded), then the image tokens, the generated image's last, padded to the model's multiple:
  the generated image's queries start where its padded tokens do, counted from the end.
"""
from __future__ import annotations

import torch

from .attention import OVERRIDE_KEY
from .rb_capture import StopForward


class LayerFeatures:
    """patches["double_block"]: keep the generated image's tokens after main layer ``index``."""

    def __init__(self, state, index: int):
        self.state, self.index = state, index

    def __deepcopy__(self, memo):         # some releases deep-copy model options: keep one state
        return self

    def __call__(self, args: dict, *more, **kwargs) -> dict:
        state = self.state
        if args.get("block_index") != self.index or state.features is not None:
            return {}
        count = state.grid[0] * state.grid[1]
        img = args["img"][:, :count].clone()     # a copy: the forward may write into its stream later
        state.features = img.transpose(1, 2).reshape(img.shape[0], img.shape[2], *state.grid)
        state.recording = False
        if state.stop:
            raise StopForward
        state.resume_grad = torch.is_grad_enabled()   # dit_run turns gradients back on after the forward
        torch.set_grad_enabled(False)
        return {}


class MarkedRecording:
    """``optimized_attention_override``: the attention as it would have run (through any override installed
    before), with the queries and keys of marked main layers 0..``index`` shown to the maps."""

    def __init__(self, maps, state, index: int, previous=None):
        self.maps, self.state, self.index, self.previous = maps, state, index, previous

    def __deepcopy__(self, memo):
        return self

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        out = (self.previous(func, q, k, v, heads, *args, **kwargs) if self.previous is not None
               else func(q, k, v, heads, *args, **kwargs))
        options = kwargs.get("transformer_options") or {}
        block = options.get("block_index")
        if (self.state.features is None and options.get("block_type") == "double" and isinstance(block, int)
                and block <= self.index and kwargs.get("skip_reshape") and q.ndim == 4):
            count = self.state.grid[0] * self.state.grid[1]
            start = q.shape[2] - (count + (-count % self.state.multiple))
            if start > 0:
                self.state.txt_len = start
                self.state.blocks += 1
                self.maps.record(q, k, start, self.state.grid)
        return out


def marked_options(model_options: dict, index: int, state, maps) -> dict:
    """A copy of ``model_options`` with the feature patch and the attention recording installed."""
    transformer = dict(model_options.get("transformer_options", {}))
    patches = dict(transformer.get("patches", {}))
    patches["double_block"] = list(patches.get("double_block", [])) + [LayerFeatures(state, index)]
    transformer["patches"] = patches
    transformer[OVERRIDE_KEY] = MarkedRecording(maps, state, index, transformer.get(OVERRIDE_KEY))
    return {**model_options, "transformer_options": transformer}
