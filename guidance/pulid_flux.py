"""PuLID-FLUX's identity residual on FLUX's image stream (pure torch; the host calls it after a block).

After every 2nd double block and every 4th single block the authors add, to the image tokens,

    img = img + id_weight * pulid_ca[i](id_tokens, img)

(``flux/model.py`` of ToTheBeginning/PuLID). ``PuLIDInjection`` is one such point: its module, the
identity tokens per CFG branch (the unconditional ones are the IDFormer's output for zero inputs, which
the authors give the negative branch under true CFG), the weight, the sigma window and an optional mask
over the latent (the residual times the mask resized to the token grid; the authors have no mask).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .decoupled import COND, UNCOND, mask_for_layer


def pulid_residual(module, tokens: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """One cross-attention residual: ``module`` (IdentityCrossAttention) from the image tokens (B, L, C) to
    the identity tokens (B or 1, T, C_id), in the module's dtype, returned in the image's."""
    p = next(module.parameters())
    if p.device != image.device:      # a host that did not move the patches with the model
        module.to(image.device)
        p = next(module.parameters())
    out = module(tokens.to(p.device, p.dtype), image.to(p.dtype))
    return out.to(image.dtype)


@dataclass
class PuLIDInjection:
    module: torch.nn.Module                    # IdentityCrossAttention
    tokens: dict                               # COND / UNCOND -> (1, T, C_id)
    weight: float
    sigma_start: float = math.inf              # active while sigma_end <= sigma <= sigma_start
    sigma_end: float = 0.0
    mask: Optional[torch.Tensor] = None        # (B or 1, H, W) over the latent
    _ordinary: Optional[torch.nn.Module] = field(default=None, repr=False, compare=False)

    def tracked_module(self) -> torch.nn.Module:
        """The module for a forward whose graph autograd keeps (a guider's tracked pass): modules loaded while a
        ComfyUI graph ran hold inference tensors, which autograd cannot save, so that pass gets an ordinary copy
        (made once, again after the module moved)."""
        if not any(p.is_inference() for p in self.module.parameters()):
            return self.module
        p = next(self.module.parameters())
        held = None if self._ordinary is None else next(self._ordinary.parameters())
        if held is None or (held.device, held.dtype) != (p.device, p.dtype):
            with torch.inference_mode(False):
                self._ordinary = copy.deepcopy(self.module)
        return self._ordinary

    def active(self, sigmas: Optional[torch.Tensor]) -> bool:
        if self.weight == 0.0:
            return False
        if sigmas is None:
            return True
        sigma = float(sigmas.reshape(-1)[0])
        return self.sigma_end <= sigma <= self.sigma_start

    def to(self, device) -> "PuLIDInjection":
        return PuLIDInjection(self.module, {b: t.to(device) for b, t in self.tokens.items()}, self.weight,
                              self.sigma_start, self.sigma_end, None if self.mask is None else self.mask.to(device))

    def residual(self, image: torch.Tensor, cond_or_uncond: Sequence[int],
                 latent_hw: Optional[tuple[int, int]]) -> torch.Tensor:
        """weight x mask x pulid_ca(tokens of each row's branch, image) for image tokens (B, L, C)."""
        branches = list(cond_or_uncond) if cond_or_uncond else [COND]
        chunks = image.chunk(len(branches)) if len(branches) > 1 else (image,)
        tracked = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        module = self.tracked_module() if tracked else self.module
        tokens = {b: (t.clone() if tracked and t.is_inference() else t) for b, t in self.tokens.items()}
        outs = [pulid_residual(module, tokens[UNCOND if b == UNCOND else COND], chunk)
                for chunk, b in zip(chunks, branches)]
        out = torch.cat(outs) if len(outs) > 1 else outs[0]
        if self.mask is not None:
            if latent_hw is None:
                raise ValueError("a PuLID-FLUX mask needs the latent's shape from the host")
            weights = mask_for_layer(self.mask, image.shape[1], latent_hw).to(out.device, out.dtype)
            if weights.shape[0] != 1:
                per_chunk = image.shape[0] // len(branches)
                if weights.shape[0] != per_chunk:
                    raise ValueError(f"the mask batch ({weights.shape[0]}) must be 1 or the image batch ({per_chunk})")
                weights = weights.repeat(len(branches), 1, 1)
            out = out * weights
        return out * self.weight


def add_residuals(img: torch.Tensor, start: int, count: int, injections: Sequence[PuLIDInjection],
                  cond_or_uncond: Sequence[int], latent_hw: Optional[tuple[int, int]],
                  sigmas: Optional[torch.Tensor]) -> torch.Tensor:
    """``img`` with the active injections' residuals added to its tokens ``start:start + count`` (the
    generated image's); each residual reads the image tokens as the block left them, as the authors' do."""
    active = [i for i in injections if i.active(sigmas)]
    if not active:
        return img
    part = img[:, start:start + count]
    total = part
    for injection in active:
        total = total + injection.residual(part, cond_or_uncond, latent_hw)
    return torch.cat([img[:, :start], total, img[:, start + count:]], dim=1)
