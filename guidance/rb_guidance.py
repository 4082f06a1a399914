"""OmniPortrait's RB-Guidance (ICLR 2026): training-free detail recovery at test time.

- Face mask of the generated image: the cross-attention map of the subject token,
  refined with the self-attention maps: m <- A_s @ norm(m)^alpha, gamma times, then
  norm(m) > beta (gamma = 3, alpha = 2, beta = 0.5).
- DIFT matching: reference features D_ref (the reference latent noised to t0 = 671,
  one UNet pass, a chosen up-block) and generated features D_gen(z_t); every reference
  position inside its mask takes its nearest generated position inside the generated
  mask by cosine distance; S is the mean cosine similarity of those pairs.
- Energy E = p / (1 + S); its gradient on z_t, the model's noisy latent, is masked to the
  face (background gradient masking) and added to the CFG noise prediction, only while
  t <= u T (u = 0.6, p = 8.5): eps_hat = eps_cfg + grad_{z_t} E. A host that samples another
  variable x (k-diffusion's x = z_t * sqrt(1 + sigma^2) for SD's epsilon and v models)
  differentiates with respect to x and converts: grad_{z_t} E = grad_x E / (dz_t / dx), and
  the denoised prediction moves by -(dx0 / deps) * grad_{z_t} E (``LatentScales``).

Pure torch: a host supplies the differentiable feature extractor and the masks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F

EPS = 1e-8


def _upcast(t: torch.Tensor) -> torch.Tensor:
    """Half precision up to float32; float32/float64 kept."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


@dataclass(frozen=True)
class RBSettings:
    strength: float = 8.5          # p
    start_fraction: float = 0.6    # u: guidance while t <= u * T
    t0: int = 671                  # reference noise level (of T = 1000 training timesteps)
    iterations: int = 3            # gamma
    alpha: float = 2.0
    threshold: float = 0.5         # beta

    def __post_init__(self):
        if not 0.0 <= self.start_fraction <= 1.0:
            raise ValueError(f"start fraction must be in [0, 1], not {self.start_fraction}")
        if not 0 <= self.t0 <= 999:
            raise ValueError(f"t0 must be a timestep in [0, 999], not {self.t0}")
        if self.iterations < 0 or self.alpha <= 0 or not 0.0 <= self.threshold <= 1.0:
            raise ValueError("mask refinement needs iterations >= 0, alpha > 0 and a threshold in [0, 1]")

    def active(self, timestep: float) -> bool:
        """Guidance applies at training timestep ``timestep`` (0 = clean ... 999 = noise)."""
        return self.strength != 0.0 and timestep <= self.start_fraction * 1000.0


def normalize(m: torch.Tensor) -> torch.Tensor:
    """Min-max normalise each row (B, N) to [0, 1]."""
    low = m.amin(dim=-1, keepdim=True)
    high = m.amax(dim=-1, keepdim=True)
    return (m - low) / (high - low).clamp_min(EPS)


def refine_mask(cross_map: torch.Tensor, self_attention: torch.Tensor, iterations: int = 3, alpha: float = 2.0,
                threshold: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """(soft mask, binary mask), both (B, N), from a subject cross-attention map (B, N) and
    row-stochastic self-attention maps (B, N, N)."""
    m = _upcast(cross_map)
    attn = _upcast(self_attention).to(m.dtype)
    for _ in range(iterations):
        m = torch.bmm(attn, (normalize(m) ** alpha)[..., None])[..., 0]
    soft = normalize(m)
    return soft, soft > threshold


def match_score(ref_features: torch.Tensor, ref_mask: torch.Tensor, gen_features: torch.Tensor,
                gen_mask: torch.Tensor) -> torch.Tensor:
    """S (B,): mean over reference positions in ``ref_mask`` of the best cosine similarity to a
    generated position in ``gen_mask``.

    ref_features (Nr, C), ref_mask (Nr,) bool; gen_features (B, Ng, C), gen_mask (B, Ng) bool.
    An empty generated mask scores 0 (and so gives no gradient).
    """
    ref = F.normalize(_upcast(ref_features[ref_mask.bool()]), dim=-1)                     # (R, C)
    gen = F.normalize(_upcast(gen_features), dim=-1).to(ref.dtype)                        # (B, Ng, C)
    if ref.shape[0] == 0:
        raise ValueError("the reference mask is empty: no reference face to match")
    similarity = torch.einsum("rc,bnc->brn", ref, gen)                                    # (B, R, Ng)
    similarity = similarity.masked_fill(~gen_mask.bool()[:, None, :], float("-inf"))
    best = similarity.max(dim=-1).values                                                  # (B, R)
    has_face = gen_mask.bool().any(dim=-1)
    score = torch.where(has_face[:, None], best, torch.zeros_like(best)).mean(dim=-1)
    return score


def energy(score: torch.Tensor, strength: float) -> torch.Tensor:
    return strength / (1.0 + score)


def guidance_gradient(x: torch.Tensor, features_fn: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
                      ref_features, ref_mask, strength: float,
                      latent_mask: Optional[Callable[[torch.Tensor], torch.Tensor]] = None):
    """grad_x E with background gradient masking.

    ``features_fn(x)`` returns (generated features (B, Ng, C) differentiable in x,
    generated mask (B, Ng) bool). The gradient is multiplied by the generated mask
    resized to the latent (``latent_mask(gen_mask)`` gives (B, 1, H, W)), so it is zero
    outside the face. Returns (gradient, score, gen_mask).

    Several people: ``ref_features`` and ``ref_mask`` are lists (one reference face each) and
    ``features_fn`` gives one generated mask per reference; E is the sum of one energy term per
    reference/mask pair, the gradient is kept inside the union of the masks, and the score has
    one column per pair (B, P).
    """
    pairs = isinstance(ref_features, (list, tuple))
    references = list(zip(ref_features, ref_mask)) if pairs else [(ref_features, ref_mask)]
    with torch.enable_grad():
        x = x.detach().requires_grad_(True)
        features, gen_masks = features_fn(x)
        gen_masks = list(gen_masks) if pairs else [gen_masks]
        if len(gen_masks) != len(references):
            raise ValueError(f"{len(references)} reference face(s) but {len(gen_masks)} generated-face mask(s)")
        scores = torch.stack([match_score(ref, mask, features, gen)
                              for (ref, mask), gen in zip(references, gen_masks)], dim=-1)          # (B, P)
        total = energy(scores, strength).sum()
        (grad,) = torch.autograd.grad(total, x, allow_unused=True)
    if grad is None:
        grad = torch.zeros_like(x)
    union = torch.stack([g.bool() for g in gen_masks]).any(0)
    if latent_mask is not None:
        grad = grad * latent_mask(union).to(grad.dtype)
    return grad.detach(), (scores if pairs else scores[:, 0]).detach(), union


def mask_to_latent(mask: torch.Tensor, grid: tuple[int, int], latent_hw: tuple[int, int]) -> torch.Tensor:
    """(B, h*w) bool mask on a token grid -> (B, 1, H, W) {0, 1} mask on the latent (nearest)."""
    b = mask.shape[0]
    m = mask.float().reshape(b, 1, *grid)
    return F.interpolate(m, size=latent_hw, mode="nearest")


@dataclass(frozen=True)
class LatentScales:
    """How a host's sampling variable x relates to the paper's quantities, per batch row:
    the model's noisy latent is z_t = input_scale * x, and with x fixed the denoised x0
    moves by -x0_per_eps for each unit added to the noise prediction eps
    (x = a * x0 + b * eps gives x0_per_eps = b / a)."""
    input_scale: torch.Tensor
    x0_per_eps: torch.Tensor

    @classmethod
    def k_diffusion(cls, sigma: torch.Tensor) -> "LatentScales":
        """SD's epsilon and v models in k-diffusion form: x = x0 + sigma * eps, z_t = x / sqrt(1 + sigma^2)."""
        return cls(1.0 / (1.0 + sigma ** 2).sqrt(), sigma)


def apply_guidance(denoised: torch.Tensor, grad_x: torch.Tensor, scales: LatentScales) -> torch.Tensor:
    """x0 for eps_hat = eps_cfg + grad_{z_t} E, from the gradient on the host's x:
    grad_{z_t} E = grad_x E / input_scale, x0_hat = x0 - x0_per_eps * grad_{z_t} E."""
    shape = (-1, *([1] * (denoised.ndim - 1)))
    grad_z = grad_x.to(denoised.dtype) / scales.input_scale.reshape(shape).to(denoised)
    return denoised - scales.x0_per_eps.reshape(shape).to(denoised) * grad_z


# -- masks on feature and attention grids ------------------------------------------------------
def grid_for(hw: tuple[int, int], factor: int) -> tuple[int, int]:
    """The grid of a (H, W) latent downsampled by ``factor`` (rounded up, as the UNet does)."""
    return -(-hw[0] // factor), -(-hw[1] // factor)


def resize_mask(mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B or 1, H, W) image-space mask -> (B or 1, h*w) bool on a feature grid."""
    resized = F.interpolate(mask[:, None].float(), size=grid, mode="bilinear", align_corners=False)
    return (resized > 0.5).reshape(mask.shape[0], -1)


def soft_to_grid(soft: torch.Tensor, source: tuple[int, int], target: tuple[int, int]) -> torch.Tensor:
    """(B, h*w) soft mask on one grid -> (B, h'*w') on another (bilinear)."""
    return F.interpolate(soft.reshape(-1, 1, *source), size=target, mode="bilinear",
                         align_corners=False).reshape(soft.shape[0], -1)


def generation_mask(features: torch.Tensor, attention_grid: Optional[tuple[int, int]],
                    cross_map: Optional[torch.Tensor], self_maps: Optional[torch.Tensor],
                    ref_features: torch.Tensor, ref_mask: torch.Tensor, settings: RBSettings) -> torch.Tensor:
    """The generated face's mask (B, h*w) bool on the feature grid of ``features`` (B, C, h, w).

    From the subject token's cross-attention map (B, N) on ``attention_grid``, refined with the
    self-attention maps (B, N, N) when there are any; without a cross map, the features' best
    cosine similarity to the reference face stands in for it.
    """
    grid = tuple(features.shape[-2:])
    attention_grid = attention_grid or grid
    if cross_map is None:
        flat = F.normalize(features.detach().flatten(2).transpose(1, 2).float(), dim=-1)
        ref = F.normalize(ref_features[ref_mask].float(), dim=-1)
        similarity = torch.einsum("bnc,rc->bnr", flat, ref).amax(-1)
        cross_map = soft_to_grid(normalize(similarity), grid, attention_grid)
    if self_maps is None:
        soft = normalize(cross_map)
    else:
        soft, _ = refine_mask(cross_map, self_maps, settings.iterations, settings.alpha, settings.threshold)
    return soft_to_grid(soft, attention_grid, grid) > settings.threshold


# -- the subject token ---------------------------------------------------------------------
# words that name a person, in the order they are preferred when a prompt holds several
CLASS_WORDS = ("man", "woman", "person", "boy", "girl", "child", "kid", "lady", "gentleman", "guy", "baby",
               "teenager", "male", "female", "men", "women", "people", "face")
SUBJECT_TOKEN_KEY = "omni_identity_subject_token"     # conditioning: the token a pivot replaced


WORD_STARTS = ("\u2581", "\u0120")      # sentencepiece (T5) and byte-level BPE (Qwen, Mistral) word starts


def _special(token: str) -> bool:
    return (token.startswith("<") and token.endswith(">")) or token.startswith("<|")


def word_spans(tokens: list[str]) -> list[tuple[int, int, str]]:
    """A prompt's tokens -> (first, last, word) per word. CLIP BPE ends a word with '</w>'; sentencepiece (T5)
    and byte-level BPE (Qwen, Mistral) start one with a marker ('\u2581', '\u0120'). Special tokens (start,
    end, padding) and punctuation are no words."""
    if any(token.endswith("</w>") for token in tokens):
        spans, start, pieces = [], None, []
        for index, token in enumerate(tokens):
            if token.startswith("<|"):                       # start / end / padding tokens
                start, pieces = None, []
                continue
            if start is None:
                start = index
            pieces.append(token)
            if token.endswith("</w>"):
                spans.append((start, index, "".join(pieces)[:-len("</w>")].lower()))
                start, pieces = None, []
        return spans
    spans, current = [], None                                # current: [first, last, text]

    def close():
        if current is not None and current[2]:
            spans.append((current[0], current[1], current[2].lower()))

    for index, token in enumerate(tokens):
        text = token.lstrip("".join(WORD_STARTS))
        if _special(token) or (text and not any(c.isalnum() for c in text)):
            close()
            current = None
            continue
        if token[:1] in WORD_STARTS or current is None:
            close()
            current = [index if text else index + 1, index, text]
        else:
            current[1], current[2] = index, current[2] + text
    close()
    return spans


def find_subject_token(tokens: list[str], subject: str = "") -> tuple[Optional[int], str]:
    """(index of the subject's token, the word found) among a prompt's tokens (CLIP, T5, Qwen, ...).

    ``subject``: the word to look for; empty means the first person word of ``CLASS_WORDS``
    order. A word split into several tokens is represented by its last token. (None, "") when
    the prompt does not contain it."""
    spans = word_spans(tokens)
    wanted = [subject.strip().lower()] if subject.strip() else list(CLASS_WORDS)
    for word in wanted:
        for first, last, found in spans:
            if found == word:
                return last, found
    return None, ""
