"""RB-Guidance's captures on flow-matching DiTs (FLUX.1 dev and Kontext, Chroma, FLUX.2, Qwen-Image and its edit
variant, Z-Image).

Each family is one entry of ``FAMILIES``: its block lists in execution order (the ``patches_replace["dit"]``
names ComfyUI's forward offers), the tokenizer whose tokens make the text stream, and the default
feature block. The captures use only public patch points:

- block patches (``patches_replace["dit"]``) on every block up to the feature block: each notes the text
  length and switches the attention recording on; the feature block's patch keeps the generated image's
  tokens of its output (the DIFT features; Kontext's reference tokens, appended after them, are left out),
  reshaped to the latent's token grid, then stops the forward (reference pass) or lets it go on detached
  (the step's own conditional pass). A patch that was there before (PuLID-FLUX, another pack's) runs as
  the block;
- the attention override (``optimized_attention_override``) records the joint attention of those blocks:
  generated-image queries against the subject token's key and against the generated image's keys
  (``guidance.joint_attention``).

Qwen-Image's blocks are all MM-DiT blocks whose image stream is the generated image's tokens, then the reference
images' (Qwen-Image-Edit), attending jointly over [text | image]: the same patches read it. Z-Image offers no
block replace patches: its captures go through the layer marks and ``patches["double_block"]`` (``rb_marks``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from ..guidance.joint_attention import JointAttentionMaps
from .attention import OVERRIDE_KEY, heads_first
from .gradients import snapshot_saves
from .layers import diffusion_model
from .rb_capture import CaptureState, StopForward
from .rb_marks import marked_options

MAX_ATTENTION_TOKENS = 1024      # self-attention maps are N x N: finer grids are pooled to at most this


@dataclass(frozen=True)
class DitFamily:
    name: str
    blocks: tuple[tuple[str, str], ...]      # (patches_replace["dit"] kind, or a name where the family is
                                             # marked; diffusion model attribute), in order
    joint_kind: str                          # blocks whose image stream is [text | image] ("" for none)
    tokenizers: tuple[str, ...]              # keys of clip.tokenize()'s result that make the text stream
    default_block: Callable[[list[int]], int]   # block counts per kind -> default feature block (1-based)
    default_rule: str                        # the default, in words
    marker: str = ""                         # an attribute only this family's diffusion model has
    marked: bool = False                     # no patches_replace["dit"]: layers found by their transformer_options
                                             # marks, features from patches["double_block"] (rb_marks)
    prompt_from_end: bool = False            # the conditioning ends as the tokenized prompt does, but may not start
                                             # alike (a template dropped, an edit's image tokens inserted)

    def counts(self, dm) -> list[int]:
        return [len(getattr(dm, attribute)) for _, attribute in self.blocks]

    def block(self, number: int, counts: list[int]) -> tuple[str, int]:
        """The 1-based feature block ``number`` over all blocks in order -> (kind, index within its kind)."""
        if not 1 <= number <= sum(counts):
            raise ValueError(f"feature_block {number} is outside this {self.name} model's {sum(counts)} blocks "
                             f"({self.describe(counts)})")
        for (kind, _), count in zip(self.blocks, counts):
            if number <= count:
                return kind, number - 1
            number -= count
        raise AssertionError("unreachable")

    def describe(self, counts: list[int]) -> str:
        return ", then ".join(f"{count} {kind.replace('_', ' ')}s" for (kind, _), count in zip(self.blocks, counts))


def _last_of_first_kind(counts: list[int]) -> int:
    return counts[0]


def _at_depth(share: float) -> Callable[[list[int]], int]:
    """The block at ``share`` of the depth (rounded half up, at least the first)."""
    return lambda counts: max(1, min(counts[0], int(share * counts[0] + 0.5)))


FLUX_BLOCKS = (("double_block", "double_blocks"), ("single_block", "single_blocks"))
# the deepest block keeping 80 % of the first block's token correspondence, as a share of the depth, measured with
# benchmarks/rb_feature_blocks.py --quick --family qwen_image (9 of 12) and --family z_image (3 of 8); see
# docs/rb_guidance.md
QWEN_IMAGE_DEPTH = 0.75
Z_IMAGE_DEPTH = 0.375
FAMILIES = (      # the first that matches is taken: a family with a marker before the one it extends
    DitFamily("Chroma", FLUX_BLOCKS, "single_block", ("t5xxl",), _last_of_first_kind,
              "the last double block's output (19 of 57)", marker="distilled_guidance_layer"),
    DitFamily("FLUX.2", FLUX_BLOCKS, "single_block", ("mistral3_24b", "qwen3_4b", "qwen3_8b"), _last_of_first_kind,
              "the last double block's output (8 of 56 on FLUX.2 dev)", marker="double_stream_modulation_img"),
    DitFamily("FLUX", FLUX_BLOCKS, "single_block", ("t5xxl",), _last_of_first_kind,
              "the last double block's output (19 of 57 on FLUX.1)"),
    DitFamily("Qwen-Image", (("double_block", "transformer_blocks"),), "", ("qwen25_7b",), _at_depth(QWEN_IMAGE_DEPTH),
              "block 45 of 60's output", marker="txt_norm", prompt_from_end=True),
    DitFamily("Z-Image", (("main_layer", "layers"),), "", ("qwen3_4b",), _at_depth(Z_IMAGE_DEPTH),
              "main layer 11 of 30's output", marker="x_pad_token", marked=True),
)


def dit_family(model) -> Optional[DitFamily]:
    """The DiT family of ``model`` (a ModelPatcher), or None for a UNet."""
    dm = diffusion_model(model)
    for family in FAMILIES:
        if all(hasattr(dm, attribute) for _, attribute in family.blocks) and (
                not family.marker or hasattr(dm, family.marker)):
            return family
    return None


def token_grid(model, latent_hw: tuple[int, int]) -> tuple[int, int]:
    patch = int(getattr(diffusion_model(model), "patch_size", 2) or 2)
    return math.ceil(latent_hw[0] / patch), math.ceil(latent_hw[1] / patch)


class BlockCapture:
    """dit replace patch: note the text length, record attention while the block runs, and at the feature
    block keep the generated image's tokens."""

    def __init__(self, state: CaptureState, family: DitFamily, kind: str, capture: bool, previous=None):
        self.state, self.family, self.kind, self.capture, self.previous = state, family, kind, capture, previous

    def __call__(self, args: dict, extra: dict, *more, **kwargs) -> dict:
        state = self.state
        joint = self.kind == self.family.joint_kind
        if not joint and torch.is_tensor(args.get("txt")):
            state.txt_len = int(args["txt"].shape[1])
        state.recording = True
        state.blocks += 1
        out = run_block(self.previous, args, extra, *more, **kwargs)
        if not self.capture:
            return out
        state.recording = False
        start = state.txt_len if joint else 0
        count = state.grid[0] * state.grid[1]
        img = out["img"][:, start:start + count]
        state.features = img.transpose(1, 2).reshape(img.shape[0], img.shape[2], *state.grid)
        if state.stop:
            raise StopForward
        # the rest of the forward runs detached, on copies: later blocks may update their streams in place
        return {key: value.detach().clone() if torch.is_tensor(value) else value for key, value in out.items()}


STREAMS = ("img", "txt")


def run_block(previous, args: dict, extra: dict, *more, **kwargs) -> dict:
    """The block (or the patch that was there before), differentiable where gradients are on.

    Some releases' FLUX blocks update their streams in place (``img += ...``, ComfyUI 0.33) after a norm has
    saved them for the backward, which autograd refuses. In a tracked pass the block gets copies of its
    streams, and the tracked forward's saved-tensor hook keeps a snapshot of any stream the block saves
    (``gradients.snapshot_saves``), so later in-place updates cannot spoil the backward. Without gradients
    the block runs as it is."""
    def block(block_args):
        return previous(block_args, extra, *more, **kwargs) if previous is not None else extra["original_block"](block_args)

    if not torch.is_grad_enabled():
        return block(args)
    args = {key: value.clone() if key in STREAMS and torch.is_tensor(value) else value for key, value in args.items()}
    with snapshot_saves(*(args[key] for key in STREAMS if torch.is_tensor(args.get(key)))):
        return block(args)


class JointRecording:
    """``optimized_attention_override``: the attention as it would have run (through any override already
    installed), with its queries and keys shown to the maps while a capture block runs."""

    def __init__(self, maps: JointAttentionMaps, state: CaptureState, previous=None):
        self.maps, self.state, self.previous = maps, state, previous

    def __call__(self, func, q, k, v, heads, *args, **kwargs):
        out = (self.previous(func, q, k, v, heads, *args, **kwargs) if self.previous is not None
               else func(q, k, v, heads, *args, **kwargs))
        if self.state.recording:
            qk = heads_first(q, k, heads, kwargs.get("skip_reshape", False))
            if qk is not None:
                self.maps.record(*qk, self.state.txt_len, self.state.grid)
        return out


def capture_options(model_options: dict, family: DitFamily, counts: list[int], feature_block: int,
                    state: CaptureState, maps: JointAttentionMaps) -> dict:
    """A copy of ``model_options`` with the block patches and the attention recording installed."""
    feature_kind, feature_index = family.block(feature_block, counts)
    if family.marked:
        return marked_options(model_options, feature_index, state, maps)
    transformer = dict(model_options.get("transformer_options", {}))
    replace = dict(transformer.get("patches_replace", {}))
    dit = dict(replace.get("dit", {}))
    for (kind, _), count in zip(family.blocks, counts):
        for index in range(count):
            dit[(kind, index)] = BlockCapture(state, family, kind, (kind, index) == (feature_kind, feature_index),
                                              dit.get((kind, index)))
            if (kind, index) == (feature_kind, feature_index):
                break
        if kind == feature_kind:
            break
    replace["dit"] = dit
    transformer["patches_replace"] = replace
    transformer[OVERRIDE_KEY] = JointRecording(maps, state, transformer.get(OVERRIDE_KEY))
    return {**model_options, "transformer_options": transformer}


def dit_run(model, family: DitFamily, feature_block: int, subject_token: Optional[int], x: torch.Tensor,
            model_options: dict, call: Callable[[dict], torch.Tensor], stop: bool, record: bool = True):
    """(prediction or None when stopped, features (B, C, h, w) on the token grid, (attention grid, subject
    map, self-attention maps)) of one conditional pass ``call(options)``; ``record``: whether the attention
    maps are wanted (Nones otherwise, and no cost)."""
    dm = diffusion_model(model)
    counts = family.counts(dm)
    multiple = int(getattr(dm, "pad_tokens_multiple", 1) or 1)
    state = CaptureState(token_grid(model, tuple(x.shape[-2:])), stop, multiple)
    maps = JointAttentionMaps(token=subject_token, keep_self=record, max_tokens=MAX_ATTENTION_TOKENS)
    if not record:
        maps.token = None
    prediction = None
    try:
        prediction = call(capture_options(model_options, family, counts, feature_block, state, maps))
    except StopForward:
        pass
    finally:
        if state.resume_grad is not None:
            torch.set_grad_enabled(state.resume_grad)
    if state.features is None:
        where = "patches['double_block']" if family.marked else "patches_replace['dit']"
        raise RuntimeError(f"ComfyUI did not call the pack's {family.name} block patches ({where}): "
                           "RB-Guidance cannot read this model's features on this release")
    batch = x.shape[0]
    grid, cross, self_maps = maps.maps()
    return (prediction, state.features[:batch], (grid, None if cross is None else cross[:batch],
                                                  None if self_maps is None else self_maps[:batch]))
