"""What the node classes share: the base class that checks every input, custom socket types, logging."""
from __future__ import annotations

import functools
import logging

from comfy_api.latest import io

from ..comfy_host.encoder_model import LoadedEncoder
from ..comfy_host.inputs import InputError, queue_check, run_check
from ..encoders.embeds import IdentityEmbeds
from ..encoders.flame import FlameModel, FlameParams
from ..encoders.pivot import PivotIDEncoder
from ..guidance.adapter import IdentityAdapter
from ..training.dataset import IdentityDataset

CATEGORY = "OmniIdentity"
LOG = logging.getLogger("OmniIdentity")

# custom socket types of the pack (core types are used wherever one exists)
Faces = io.Custom("FACES")
OmniIdEncoderType = io.Custom("OMNI_ID_ENCODER")
IdentityEmbedsType = io.Custom("IDENTITY_EMBEDS")
IdentityAdapterType = io.Custom("IDENTITY_ADAPTER")
IdentityDatasetType = io.Custom("IDENTITY_DATASET")
PivotEncoderType = io.Custom("PIVOT_ENCODER")

# socket type -> (what it must be, which node makes it)
_OWN_TYPES = {
    "IDENTITY_EMBEDS": (IdentityEmbeds, "an encode node or Load Identity Embeds (OmniIdentity)"),
    "IDENTITY_ADAPTER": (IdentityAdapter, "Identity Adapter Loader (OmniIdentity)"),
    "OMNI_ID_ENCODER": (LoadedEncoder, "Identity Encoder Loader (OmniIdentity)"),
    "IDENTITY_DATASET": (IdentityDataset, "Identity Dataset or Build Identity Dataset (OmniIdentity)"),
    "PIVOT_ENCODER": (PivotIDEncoder, "Train Pivot ID Encoder (OmniIdentity)"),
    "FLAME_MODEL": (FlameModel, "FLAME Loader (OmniIdentity)"),
    "FLAME_PARAMS": (FlameParams, "FLAME Fit (OmniIdentity)"),
}


def _check_own_type(socket: str, name: str, value) -> None:
    kind, maker = _OWN_TYPES[socket]
    if not isinstance(value, kind):
        raise InputError(f"{name} is a {type(value).__name__} object, probably another pack's {socket}; connect "
                         f"the output of {maker}")


def _check_face_analysis_input(name: str, value) -> None:
    if not callable(getattr(value, "detect", None)):
        raise InputError(f"{name} is a {type(value).__name__} object, another pack's face analyser; connect "
                         "'Face Analysis Loader (OmniIdentity)'")


RUN_CHECKS = {**{socket: functools.partial(_check_own_type, socket) for socket in _OWN_TYPES},
              "FACE_ANALYSIS": _check_face_analysis_input}


class OmniNode(io.ComfyNode):
    """Base of the pack's nodes: every input is checked against the node's schema before ``execute``.

    Subclasses may set ``ORDERED`` (pairs of inputs that must not decrease), ``PARSERS`` (input ->
    a function that raises ValueError on a bad text value) and ``MIN_IMAGE_SIZE``, and list the
    inputs to check when the prompt is queued with ``validate_inputs = queued(...)``.
    """

    ORDERED: tuple[tuple[str, str], ...] = ()
    PARSERS: dict = {}
    MIN_IMAGE_SIZE = 16

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("execute")
        if own is None or getattr(own.__func__, "inputs_checked", False):
            return                         # no execute of its own, or ComfyUI's locked clone of a checked class
        function = own.__func__

        @functools.wraps(function)
        def execute(klass, **values):
            return function(klass, **run_check(klass, values, RUN_CHECKS))

        execute.inputs_checked = True
        cls.execute = classmethod(execute)


def advanced(spec):
    """An input for another model family or for experts: a socket without a widget, so the editor shows
    each graph only its own controls; unconnected, its default applies."""
    spec.force_input = True
    spec.tooltip = f"{spec.tooltip} Advanced: connect a value (e.g. a Primitive node) to change it."
    return spec


def queued(*names: str):
    """A ``validate_inputs`` that checks the named inputs when the prompt is queued.

    ComfyUI passes a node's validate_inputs exactly the inputs its signature names (and then skips
    its own range check for them), so the signature is made from ``names``. List the FLOAT inputs
    (JSON's NaN passes ComfyUI's own check), the combos (ComfyUI checks V3 combos only at run
    time), the inputs of ``ORDERED`` pairs and of ``PARSERS``."""
    if not all(name.isidentifier() for name in names):
        raise ValueError(f"input names must be identifiers: {names}")
    namespace = {"queue_check": queue_check}
    params = ", ".join(f"{name}=None" for name in names)
    args = ", ".join(f"{name}={name}" for name in names)
    exec(f"def validate_inputs(cls, {params}):\n    return queue_check(cls, {args})\n", namespace)
    return classmethod(namespace["validate_inputs"])


def check_face_analysis(face_analysis):
    """Refuse another pack's FACE_ANALYSIS object with a message that says what to connect."""
    if not callable(getattr(face_analysis, "detect", None)):
        raise TypeError("face_analysis must come from 'Face Analysis Loader (OmniIdentity)'; the connected "
                        f"{type(face_analysis).__name__} object is another pack's analyser.")
    return face_analysis
