"""What RB-Guidance needs before sampling, resolved the paper's way unless the user asks otherwise.

- The reference face mask: an explicit mask; else the face of the reference found by the
  connected face analysis, or by the bundled dlib detector when none is connected (the landmark
  hull; the paper uses a face segmentation, which no bundled model provides); the whole
  reference only when asked for.
- The generated face's mask: the subject token's cross-attention map refined with self-attention
  (the paper). The subject token comes from, in order: the subject_token index; the token a
  pivot replaced (Apply Pivot ID marks it in the conditioning); the prompt's tokens (clip + prompt
  text), the `subject` word or else the first person word (man, woman, person, ...). Locating the
  face by its resemblance to the reference instead, or an explicit mask, only when asked for.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..encoders.face import NoFaceFoundError, bundled_analyzer
from ..encoders.face.crop import largest_face_mask
from ..guidance.rb_guidance import SUBJECT_TOKEN_KEY, find_subject_token
from .prompt_tokens import prompt_tokens

MASK_SOURCES = ("subject attention", "reference similarity")
REFERENCE_REGIONS = ("face", "whole image")


class SubjectNotFound(ValueError):
    pass


@dataclass(frozen=True)
class Resolved:
    mask: Optional[torch.Tensor]
    source: str


def reference_mask(image: torch.Tensor, mask: Optional[torch.Tensor], face_analysis, region: str) -> Resolved:
    """(N, H, W) masks of the reference photos' faces, or None for the whole images; and where they came from."""
    if mask is not None:
        mask = mask if mask.ndim == 3 else mask[None]
        if mask.shape[0] not in (1, image.shape[0]):
            raise ValueError(f"RB-Guidance: reference_mask has {mask.shape[0]} masks for {image.shape[0]} reference "
                             "photos; give one, or one per photo")
        return Resolved(mask.expand(image.shape[0], -1, -1), "reference_mask input")
    if region == "whole image":
        return Resolved(None, "whole image (reference_region)")
    analyzer, name = ((face_analysis, f"{face_analysis.name} landmarks") if face_analysis is not None
                      else (bundled_analyzer(), "bundled dlib detector, landmark hull"))
    masks = []
    for i in range(image.shape[0]):
        try:
            masks.append(largest_face_mask(image[i], analyzer))
        except NoFaceFoundError:
            raise ValueError(f"RB-Guidance: no face found in reference photo {i + 1} of {image.shape[0]}. Give a "
                             "reference_mask, a clearer photo, or set reference_region to 'whole image' to match "
                             "the whole reference.") from None
    return Resolved(torch.stack(masks), name)


def layout_masks(faces, count: int, grow: float = 0.15, feather: int = 8) -> torch.Tensor:
    """(count, H, W): the regions of the first ``count`` faces of a Face Crop of the layout, one per
    reference photo, in order. Missing faces are an error; overlapping ones are reported by the caller."""
    from ..encoders.face import face_region
    if len(faces.records) < count:
        raise ValueError(f"RB-Guidance: {count} reference photos but the layout's Face Crop kept "
                         f"{len(faces.records)} face(s); each reference needs its face in the layout "
                         "(Face Crop with selection 'all')")
    records = faces.records[:count]
    if len({r.image_index for r in records}) != 1:
        raise ValueError("RB-Guidance: the layout faces must come from one image")
    height, width = faces.image_sizes[records[0].image_index]
    return torch.stack([face_region(r.face, height, width, grow, feather) for r in records])


def subject_token(positive, index: int, subject: str, clip, prompt: str) -> tuple[int, str]:
    """(token index of the subject in the positive prompt, how it was found)."""
    tokens = min(int(cond.shape[1]) for cond, _ in positive)
    if index >= tokens:
        raise ValueError(f"RB-Guidance: subject_token {index} is outside the positive prompt, which has {tokens} "
                         f"tokens (0-{tokens - 1}); use 0 to find the subject word")
    if index > 0:
        return index, f"subject_token input ({index})"
    marked = {extra.get(SUBJECT_TOKEN_KEY) for _, extra in positive} - {None}
    if len(marked) == 1:
        token = int(marked.pop())
        return token, f"pivot token ({token}, from Apply Pivot ID)"
    if clip is not None and prompt.strip():
        token, word = find_subject_token(prompt_tokens(clip, prompt), subject)
        if token is not None:
            return token, f"'{word}' at token {token} of the prompt"
        wanted = f"the word {subject!r}" if subject.strip() else "a person word (man, woman, person, boy, girl, ...)"
        raise SubjectNotFound(f"RB-Guidance: the prompt {prompt!r} has no {wanted}: name the subject word in "
                              "'subject', or give subject_token.")
    raise SubjectNotFound(
        "RB-Guidance needs the subject's token for the paper's attention face mask: connect 'clip' and give the "
        "positive prompt's text in 'prompt' (e.g. share one String with the CLIP Text Encode node), set "
        "subject_token, or use Apply Pivot ID. To locate the face by its resemblance to the reference instead, "
        "set mask_source to 'reference similarity', or connect a generation_mask.")
