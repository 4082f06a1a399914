"""What one RB-Guidance capture on a DiT gathers while ComfyUI runs the model (rb_dit, rb_marks)."""
from __future__ import annotations

from typing import Optional

import torch


class StopForward(Exception):
    """Raised by the feature capture once the features are in hand."""


class CaptureState:
    def __init__(self, grid: tuple[int, int], stop: bool, multiple: int = 1):
        self.grid, self.stop = grid, stop
        self.multiple = multiple             # image tokens padded to a multiple of this (Z-Image)
        self.txt_len = 0
        self.recording = False
        self.features: Optional[torch.Tensor] = None
        self.blocks = 0
        self.resume_grad: Optional[bool] = None   # the grad mode to restore after a forward run on without it
