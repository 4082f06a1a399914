"""SigLIP's attention-pooling head (``pooler_output``), which ComfyUI's CLIP_VISION leaves out.

ComfyUI loads SigLIP vision towers (``sigclip_vision_patch14_384`` for Redux) without their
multi-head attention pooling head and returns the normalised last hidden states; InstantX's
FLUX IP-Adapter reads the head's output. This module runs that head on those hidden states:

    h = MultiheadAttention(probe, x, x);  pooled = h + MLP(LayerNorm(h))   (first and only query)

with the weights of a SigLIP checkpoint's ``head.*`` keys (transformers' layout:
``vision_model.head.probe``, ``...attention.in_proj_weight``, ``...layernorm``, ``...mlp.fc1/fc2``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

HEAD_PARTS = ("probe", "attention.in_proj_weight", "attention.in_proj_bias", "attention.out_proj.weight",
              "attention.out_proj.bias", "layernorm.weight", "layernorm.bias", "mlp.fc1.weight", "mlp.fc1.bias",
              "mlp.fc2.weight", "mlp.fc2.bias")


class SiglipPoolingHead(nn.Module):
    def __init__(self, width: int, heads: int, mlp_width: int, eps: float = 1e-6):
        super().__init__()
        self.heads = heads
        self.probe = nn.Parameter(torch.zeros(1, 1, width))
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.layernorm = nn.LayerNorm(width, eps=eps)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(width, mlp_width)
        self.mlp.fc2 = nn.Linear(mlp_width, width)

    @torch.no_grad()
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, tokens, width) normalised last hidden states -> (B, width), in float32."""
        hidden = hidden.float()
        probe = self.probe.float().expand(hidden.shape[0], -1, -1)
        attn = self.attention.float()
        pooled = attn(probe, hidden, hidden, need_weights=False)[0]
        mlp = F.gelu(F.linear(self.layernorm.float()(pooled), self.mlp.fc1.weight.float(), self.mlp.fc1.bias.float()),
                     approximate="tanh")
        pooled = pooled + F.linear(mlp, self.mlp.fc2.weight.float(), self.mlp.fc2.bias.float())
        return pooled[:, 0]


def find_head_prefix(keys) -> Optional[str]:
    """The prefix under which a checkpoint holds a SigLIP pooling head (e.g. ``vision_model.head.``)."""
    for key in keys:
        if key.endswith("head.probe"):
            return key[: -len("probe")]
    return None


def head_from_state(state: dict[str, torch.Tensor], heads: int = 16) -> SiglipPoolingHead:
    """A pooling head from a checkpoint's tensors (any prefix); so400m's head has 16 heads."""
    prefix = find_head_prefix(state)
    if prefix is None:
        raise KeyError("no SigLIP pooling head (head.probe, head.attention.*, head.mlp.*) in this file")
    parts = {name: state[prefix + name] for name in HEAD_PARTS if prefix + name in state}
    missing = [name for name in HEAD_PARTS if name not in parts]
    if missing:
        raise KeyError(f"the SigLIP pooling head under '{prefix}' lacks {missing}")
    width, mlp_width = parts["probe"].shape[-1], parts["mlp.fc1.weight"].shape[0]
    head = SiglipPoolingHead(width, heads, mlp_width)
    head.load_state_dict({k: v.float() for k, v in parts.items()})
    return head.eval()
