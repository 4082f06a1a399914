"""Identity similarity of generated images to reference photos: ID similarity from the face analysis's
embeddings, CLIP-I and CLIP-T when the CLIP models are given, and a report image."""
from __future__ import annotations

import json
import logging

import torch

from ..training.metrics import (clip_image_similarity, clip_text_similarity, face_embeddings, identity_report,
                                summarize)
from ..training.report import render_report, score_lines
from .clip_vision import ClipVision

LOG = logging.getLogger("OmniIdentity")


def identity_similarity(face_analysis, images: torch.Tensor, reference_images: torch.Tensor, clip_vision=None,
                        clip=None, prompt: str = ""):
    """(report image, mean ID similarity (0.0 when no image had a face), every figure as JSON, summary text)."""
    generated, kind = face_embeddings(images, face_analysis)
    refs, ref_kind = face_embeddings(reference_images, face_analysis)
    faceless_refs = [i + 1 for i, r in enumerate(refs) if r is None]
    refs = [r for r in refs if r is not None]
    if not refs:
        raise ValueError(f"no face found in any of the {len(reference_images)} reference image(s)")
    report = identity_report(generated, refs, kind or ref_kind)
    if faceless_refs:
        report.notes.append(f"no face found in reference image(s) {', '.join(map(str, faceless_refs))}; "
                            "left out")
    scores = {"id_similarity": report.to_dict()}
    clip_i = clip_t = None
    if clip_vision is not None:
        vision = ClipVision(clip_vision)
        image_embeds = vision.image_embeds(images)
        clip_i = clip_image_similarity(image_embeds, vision.image_embeds(reference_images)).tolist()
        scores["clip_i"] = {"per_image": clip_i, **summarize(clip_i)}
        if clip is not None and prompt.strip():
            _, pooled = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True)
            try:
                clip_t = clip_text_similarity(image_embeds, pooled.float().cpu()).tolist()
                scores["clip_t"] = {"per_image": clip_t, **summarize(clip_t)}
            except ValueError as exc:
                report.notes.append(f"CLIP-T not computed: {exc}")
    elif clip is not None:
        report.notes.append("CLIP-T needs clip_vision too (image embeddings)")
    lines = [score_lines(s, same, None if clip_i is None else clip_i[i], None if clip_t is None else clip_t[i])
             for i, (s, same) in enumerate(zip(report.per_image, report.same_person))]
    summary = [f"ID similarity ({report.kind}): mean {report.mean:.3f}, std {report.std:.3f} over "
               f"{len(report.scored)} image(s); same person above {report.threshold}"]
    for name in ("clip_i", "clip_t"):
        if name in scores:
            summary.append(f"{name.upper().replace('_', '-')}: mean {scores[name]['mean']:.3f}")
    summary += report.notes
    picture = render_report(images, reference_images, lines, "Identity similarity (OmniIdentity)", summary)
    text = "\n".join(summary)
    LOG.info("Similarity: %s", text.replace("\n", "; "))
    mean = report.mean
    return picture, float(mean) if mean == mean else 0.0, json.dumps(scores), text
