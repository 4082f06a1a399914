"""Non-finite values never leave the pack silently (a NaN tensor becomes a black image downstream)."""
from __future__ import annotations

import torch


def require_finite(tensor: torch.Tensor, where: str) -> torch.Tensor:
    """``tensor``, or an error saying where NaN or Inf arose."""
    if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
        raise FloatingPointError(f"{where} produced NaN or infinite values from finite inputs; lower the weights or "
                                 "strengths, or report it with the workflow")
    return tensor
