"""From photos' features to IDENTITY_EMBEDS: the Omni-ID encoder and the baselines.

Hosts supply the features (CLIP tokens per photo, ArcFace embeddings per face); these
functions check that they fit the method and the encoder and run it.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .embeds import IdentityEmbeds
from .finite import require_finite
from .face.types import FaceSet
from .omni_id import ARCFACE_MERGES, IdentityEncoder

BASELINES = ("clip", "arcface", "arcface_clip")


def arcface_from_faces(faces: FaceSet) -> torch.Tensor:
    """(N, 512) ArcFace embeddings of a FACES record, or a clear error naming the fix."""
    kinds = {r.face.embedding_kind for r in faces.records}
    if kinds != {"arcface512"}:
        raise ValueError(
            f"ArcFace embeddings are needed, but the {faces.backend} face analysis gave "
            f"{sorted(str(k) for k in kinds)}: use an insightface pack as the backend, or the dlib "
            "backend with an ArcFace recognition model (arcface_model input of the loader).")
    return torch.from_numpy(np.stack([r.face.embedding for r in faces.records]).astype(np.float32))


@torch.no_grad()
def run_encoder(encoder: IdentityEncoder, clip_tokens: Optional[torch.Tensor] = None,
                arcface: Optional[torch.Tensor] = None, arcface_merge: str = "average") -> torch.Tensor:
    """One identity through ``encoder``: (N, T, C) tokens and/or (N, 512) -> (L, D) on the CPU, fp32."""
    param = next(encoder.parameters())

    def prepare(t):
        return None if t is None else t.to(param.device, param.dtype)[None]

    for name, features in (("CLIP tokens", clip_tokens), ("ArcFace embeddings", arcface)):
        if features is not None:
            require_finite(features, f"the {name} of the photos")
    out = encoder(clip_tokens=prepare(clip_tokens), arcface=prepare(arcface), arcface_merge=arcface_merge)
    return require_finite(out[0].float().cpu(), f"the {encoder.config.architecture} encoder")


def omni_id_embeds(encoder: IdentityEncoder, clip_tokens: torch.Tensor, info: dict) -> IdentityEmbeds:
    arch = encoder.config.architecture
    if arch != "omni_id":
        raise ValueError(f"this is an '{arch}' encoder file; Omni-ID encoding needs an 'omni_id' encoder "
                         "(use Encode Baseline for the baselines)")
    return IdentityEmbeds("omni_id", {"tokens": run_encoder(encoder, clip_tokens)}, info)


def infinite_id_embeds(encoder: IdentityEncoder, clip_last_tokens: torch.Tensor, arcface: torch.Tensor,
                       info: dict) -> IdentityEmbeds:
    """Infinite-ID's c_id from the photos' CLIP last hidden states (N, 257, C) and ArcFace embeddings (N, 512)."""
    arch = encoder.config.architecture
    if arch != "infinite_id":
        raise ValueError(f"this is an '{arch}' encoder file; Infinite-ID encoding needs an 'infinite_id' encoder")
    if clip_last_tokens.shape[0] != arcface.shape[0]:
        raise ValueError(f"{clip_last_tokens.shape[0]} CLIP feature sets but {arcface.shape[0]} ArcFace embeddings")
    tokens = run_encoder(encoder, clip_last_tokens, arcface)
    return IdentityEmbeds("infinite_id", {"tokens": tokens, "arcface": arcface.float().cpu()}, info)


def baseline_embeds(method: str, clip_tokens: Optional[torch.Tensor] = None,
                    arcface: Optional[torch.Tensor] = None, encoder: Optional[IdentityEncoder] = None,
                    arcface_merge: str = "concat", info: Optional[dict] = None,
                    clip_uncond: Optional[torch.Tensor] = None, pooled: Optional[torch.Tensor] = None,
                    pooled_uncond: Optional[torch.Tensor] = None) -> IdentityEmbeds:
    """The paper's baselines. Without an encoder, the raw features (what an IP-Adapter's own
    projection reads); with an encoder file of the method's architecture, also its
    projected 256 x 1280 ``tokens`` (the representation the paper compares).
    ``clip_uncond``: CLIP tokens of the unconditional image, kept for IP-Adapter's unconditional
    branch; ``pooled`` / ``pooled_uncond``: the image encoder's pooled embeddings of the photos
    and of the unconditional image (read by pooled-embedding adapters: h94 base, XLabs, InstantX)."""
    if method not in BASELINES:
        raise ValueError(f"baseline method must be one of {BASELINES}, not {method!r}")
    if arcface_merge not in ARCFACE_MERGES:
        raise ValueError(f"arcface_merge must be one of {ARCFACE_MERGES}, not {arcface_merge!r}")
    needs_clip, needs_arcface = method in ("clip", "arcface_clip"), method in ("arcface", "arcface_clip")
    if needs_clip and clip_tokens is None:
        raise ValueError(f"the {method} baseline needs CLIP tokens: connect a CLIP vision model (CLIP-H)")
    if needs_arcface and arcface is None:
        raise ValueError(f"the {method} baseline needs ArcFace embeddings: connect a face analysis")
    tensors = {}
    if needs_clip:
        tensors["clip"] = clip_tokens.float().cpu()
        if clip_uncond is not None:
            tensors["clip_uncond"] = clip_uncond.float().cpu()
        if pooled is not None:
            tensors["pooled"] = pooled.float().cpu()
            if pooled_uncond is not None:
                tensors["pooled_uncond"] = pooled_uncond.float().cpu()
    if needs_arcface:
        tensors["arcface"] = arcface.float().cpu()
    info = dict(info or {})
    if encoder is not None:
        arch = encoder.config.architecture
        if method == "clip" or arch != method:
            raise ValueError(f"the connected encoder file is an '{arch}' encoder; the {method} baseline "
                             + ("takes none (CLIP tokens need no projection)" if method == "clip"
                                else f"needs an '{method}' encoder file, or none for the raw features"))
        tensors["tokens"] = run_encoder(encoder, clip_tokens if needs_clip else None,
                                        arcface, arcface_merge=arcface_merge)
        info["arcface_merge"] = arcface_merge
    return IdentityEmbeds(method, tensors, info)


def arcface_of_photos(analyzer, name: str = "face analysis"):
    """A function (B, H, W, 3) in [0, 1] -> (B, 512): the ArcFace embedding of each photo's largest face.

    For training the ArcFace baselines (their photos are the dataset's face photos). A photo
    without a face, or a backend without ArcFace, is an error that names the fix."""
    from .face.crop import to_uint8
    from .face.types import NoFaceFoundError

    def embed(images: torch.Tensor) -> torch.Tensor:
        rows = []
        for image in images:
            found = analyzer.detect(to_uint8(image), with_embedding=True)
            if not found:
                raise NoFaceFoundError(f"{name} found no face in a training photo of the ArcFace baseline; "
                                       "build the dataset with Build Identity Dataset (face crops)")
            face = max(found, key=lambda f: f.area)
            if face.embedding_kind != "arcface512":
                raise ValueError(f"ArcFace embeddings are needed, but {name} gives {face.embedding_kind}: use an "
                                 "insightface pack, or the dlib backend with an ArcFace model")
            rows.append(torch.from_numpy(np.asarray(face.embedding, dtype=np.float32)))
        return torch.stack(rows)
    return embed
