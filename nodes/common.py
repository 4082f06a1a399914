"""Helpers shared by the node classes: custom socket types, input checks, logging."""
from __future__ import annotations

import logging

from comfy_api.latest import io

CATEGORY = "OmniIdentity"
LOG = logging.getLogger("OmniIdentity")

# custom socket types of the pack (core types are used wherever one exists)
Faces = io.Custom("FACES")
OmniIdEncoderType = io.Custom("OMNI_ID_ENCODER")
IdentityEmbedsType = io.Custom("IDENTITY_EMBEDS")
IdentityAdapterType = io.Custom("IDENTITY_ADAPTER")
IdentityDatasetType = io.Custom("IDENTITY_DATASET")
PivotEncoderType = io.Custom("PIVOT_ENCODER")


def check_combos(node_cls, **values) -> bool | str:
    """Reject unknown combo values when the prompt is queued.

    ComfyUI (0.3.x) checks V3 combo values only at run time, if at all; a node's
    ``validate_inputs`` calls this so a wrong value fails validation with the options
    listed. Linked (not yet known) values arrive as None and are skipped.
    """
    options = {i.id: list(i.options) for i in node_cls.define_schema().inputs if isinstance(i, io.Combo.Input)}
    problems = [f"{name}: {value!r} is not one of {options[name]}" for name, value in values.items()
                if value is not None and name in options and value not in options[name]]
    return "; ".join(problems) if problems else True


def check_face_analysis(face_analysis):
    """Refuse another pack's FACE_ANALYSIS object with a message that says what to connect."""
    if not callable(getattr(face_analysis, "detect", None)):
        raise TypeError("face_analysis must come from 'Face Analysis Loader (OmniIdentity)'; the connected "
                        f"{type(face_analysis).__name__} object is another pack's analyser.")
    return face_analysis
