"""InfiniteYou's InfuseNet schedule, as the authors' pipeline applies it (pure torch).

- The residuals of InfuseNet's blocks go to FLUX's blocks by diffusers' rule: FLUX block ``i`` of ``n``
  gets InfuseNet sample ``i // ceil(n / m)`` of ``m`` (double and single blocks apart).
- ``infusenet_guidance_start/end`` are fractions of the *steps*: step ``i`` of ``n`` runs InfuseNet unless
  ``i / n < start`` or ``(i + 1) / n > end`` (the pipeline's ``controlnet_keep``).
- InfuseNet's own guidance input is 1.0 (``controlnet_guidance_scale``), whatever the FLUX guidance is.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

INFUSENET_GUIDANCE = 1.0


def sample_index(block: int, blocks: int, samples: int) -> int:
    """Which of ``samples`` InfuseNet residuals FLUX block ``block`` (of ``blocks``) receives."""
    return block // int(math.ceil(blocks / samples))


def keep(step: int, steps: int, start: float, end: float) -> bool:
    """Whether InfuseNet runs at step ``step`` of ``steps`` for the window (start, end)."""
    return not (step / steps < start or (step + 1) / steps > end)


def step_of(sample_sigmas: Optional[torch.Tensor], sigma: float) -> Optional[tuple[int, int]]:
    """(step, steps) of the sampler's schedule that ``sigma`` belongs to: the last schedule sigma at or above
    it (an intermediate evaluation of a multi-stage sampler belongs to the step it is inside); None when the
    schedule is unknown or ``sigma`` lies outside it."""
    if sample_sigmas is None or len(sample_sigmas) < 2:
        return None
    schedule = sample_sigmas.detach().double().cpu()
    tolerance = 1e-4 * max(abs(float(sigma)), 1e-8)
    at_or_above = int((schedule[:-1] >= float(sigma) - tolerance).sum())
    if at_or_above == 0:
        return None
    return at_or_above - 1, len(schedule) - 1
