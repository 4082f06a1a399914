"""Identity similarity node: ID similarity, CLIP-I and CLIP-T, with a report image."""
from __future__ import annotations

import json

from comfy_api.latest import io, ui

from ..comfy_host.clip_vision import ClipVision
from ..training.metrics import (clip_image_similarity, clip_text_similarity, face_embeddings, identity_report,
                                summarize)
from ..training.report import render_report, score_lines
from .common import CATEGORY, LOG, OmniNode, check_face_analysis


class Similarity(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentitySimilarity",
            display_name="Identity Similarity (OmniIdentity)",
            category=f"{CATEGORY}/metrics",
            description=(
                "Does the face keep its identity? ID similarity of each image against the references (ArcFace "
                "cosine with an insightface pack or dlib + ArcFace model; 1 - descriptor distance with the bundled "
                "dlib backend, where > 0.4 means the same person), mean and std; CLIP-I against the references "
                "and CLIP-T against a prompt when CLIP models are given; a report image."),
            inputs=[
                io.FaceAnalysis.Input("face_analysis", tooltip="From Face Analysis Loader (OmniIdentity)."),
                io.Image.Input("images", tooltip="Generated images to score."),
                io.Image.Input("reference_images", tooltip="One or more photos of the person."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="A CLIP vision model for CLIP-I (and CLIP-T with a matching text CLIP)."),
                io.Clip.Input("clip", optional=True,
                              tooltip="The text CLIP for CLIP-T; its width must match clip_vision's projection "
                                      "(e.g. SD1.5's CLIP-L with a CLIP ViT-L/14 vision model)."),
                io.String.Input("prompt", default="", multiline=True, optional=True,
                                tooltip="The prompt the images were made from, for CLIP-T."),
            ],
            outputs=[
                io.Image.Output(display_name="report", tooltip="Thumbnails with their scores, and the references."),
                io.Float.Output(display_name="mean_similarity", tooltip="Mean ID similarity over images with a face."),
                io.String.Output(display_name="scores", tooltip="All figures as JSON."),
            ],
        )

    @classmethod
    def execute(cls, face_analysis, images, reference_images, clip_vision=None, clip=None,
                prompt: str = "") -> io.NodeOutput:
        check_face_analysis(face_analysis)
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
        return io.NodeOutput(picture, float(mean) if mean == mean else 0.0, json.dumps(scores),
                             ui=ui.PreviewText(text))


NODES = [Similarity]
