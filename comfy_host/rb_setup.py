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

import logging
from dataclasses import dataclass
from typing import Optional

import torch

from ..encoders.face import NoFaceFoundError, bundled_analyzer, overlapping_pairs
from ..encoders.face.crop import largest_face_mask
from ..guidance.rb_guidance import SUBJECT_TOKEN_KEY, RBSettings, find_subject_token
from ..training.report import captioned
from .gradients import gradient_ready
from .prompt_tokens import prompt_tokens
from .rb_dit import dit_family
from .rb_guider import RBGuider

MASK_SOURCES = ("subject attention", "reference similarity")
REFERENCE_REGIONS = ("face", "whole image")
LOG = logging.getLogger("OmniIdentity")


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


def subject_token(positive, index: int, subject: str, clip, prompt: str,
                  streams: tuple[str, ...] = (), from_end: bool = False) -> tuple[int, str]:
    """(token index of the subject in the positive prompt, how it was found).

    ``from_end``: the conditioning ends as the tokenized prompt does but may start otherwise (Qwen-Image drops
    its system template; its edit encoder puts the reference image's tokens before the prompt): the word's
    place is counted from the end."""
    length = min(int(cond.shape[1]) for cond, _ in positive)
    if index >= length:
        raise ValueError(f"RB-Guidance: subject_token {index} is outside the positive prompt, which has {length} "
                         f"tokens (0-{length - 1}); use 0 to find the subject word")
    if index > 0:
        return index, f"subject_token input ({index})"
    marked = {extra.get(SUBJECT_TOKEN_KEY) for _, extra in positive} - {None}
    if len(marked) == 1:
        token = int(marked.pop())
        return token, f"pivot token ({token}, from Apply Pivot ID)"
    if clip is not None and prompt.strip():
        tokens, start = prompt_tokens(clip, prompt, streams)
        token, word = find_subject_token(tokens[start:], subject)
        token = None if token is None else token + start
        if token is not None and from_end:
            token = length - (len(tokens) - token)
            if token < 0:
                raise SubjectNotFound(f"RB-Guidance: the positive conditioning ({length} tokens) is shorter than "
                                      f"the prompt {prompt!r}: give the text that was encoded, or subject_token")
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


def feature_description(guider: RBGuider) -> str:
    if guider.family is None:
        return f"input of output block {guider.feature_block}"
    counts = guider.family.counts(guider.model_patcher.get_model_object("diffusion_model"))
    kind, index = guider.family.block(guider.feature_block, counts)
    return (f"{guider.family.name} block {guider.feature_block} of {sum(counts)} ({kind.replace('_', ' ')} {index}), "
            "the generated image's tokens")


def _tinted(image: torch.Tensor, mask) -> torch.Tensor:
    if mask is None:
        return image.clone()
    m = mask[:1, :, :, None].to(image)
    return image * (1 - 0.5 * m) + 0.5 * m * torch.tensor([1.0, 0.0, 0.0]).to(image)


def rb_guider(model, positive, negative, cfg: float, reference: torch.Tensor, vae, settings: RBSettings,
              feature_block: int = 0, clip=None, prompt: str = "", subject: str = "", subject_index: int = 0,
              mask_source: str = MASK_SOURCES[0], reference_region: str = REFERENCE_REGIONS[0], face_analysis=None,
              explicit_reference_mask=None, generation_mask=None, layout_faces=None, seed: int = 0):
    """The RB-Guidance GUIDER with its masks resolved as above, a preview of the reference with its mask
    tinted and captioned, and the lines saying which masks are used."""
    people = reference.shape[0] if (layout_faces is not None or (
        generation_mask is not None and generation_mask.shape[0] == reference.shape[0] > 1)) else 1
    image = reference[:people, :, :, :3]
    ref = reference_mask(image, explicit_reference_mask, face_analysis, reference_region)
    notes = [] if people == reference.shape[0] else [
        f"{reference.shape[0]} reference photos: the first is used (connect layout_faces to guide several people)"]
    if layout_faces is not None:
        generation_mask = layout_masks(layout_faces, people)
        notes = [f"faces {i + 1} and {j + 1} of the layout overlap ({share:.0%}): their energy terms share "
                 "that region" for i, j, share in overlapping_pairs(list(generation_mask))]
        token, gen_source = None, f"{people} layout face(s), one per reference photo"
    elif generation_mask is not None:
        token, gen_source = None, "generation_mask input" + (f", one per reference ({people})" if people > 1 else "")
    elif mask_source == "reference similarity":
        token, gen_source = None, "resemblance to the reference face (mask_source)"
    else:
        family = dit_family(model)
        token, found = subject_token(positive, subject_index, subject, clip, prompt,
                                     () if family is None else family.tokenizers,
                                     family is not None and family.prompt_from_end)
        gen_source = f"attention of {found}, refined by self-attention"
    height, width = (image.shape[1] // 8) * 8, (image.shape[2] // 8) * 8
    latent = vae.encode(image[:, :height, :width])
    mask = None if ref.mask is None else ref.mask[:, :height, :width]
    guider = RBGuider(gradient_ready(model), settings, latent, mask, generation_mask, feature_block, token, seed)
    guider.set_conds(positive, negative)
    guider.set_cfg(cfg)
    lines = [f"reference mask: {ref.source}", f"generated-face mask: {gen_source}",
             f"features: {feature_description(guider)}", *notes]
    preview = captioned(_tinted(image[:1, :height, :width], mask), lines)
    LOG.info("RB-Guidance: p=%s, u=%s, t0=%s; %s", settings.strength, settings.start_fraction, settings.t0,
             "; ".join(lines))
    return guider, preview, lines
