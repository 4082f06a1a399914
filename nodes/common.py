"""What the node classes share: the base class that checks every input, custom socket types, logging."""
from __future__ import annotations

import functools
import logging

from comfy_api.latest import io

from ..comfy_host.encoder_model import LoadedEncoder
from ..comfy_host.infiniteyou import LoadedInfiniteYou
from ..comfy_host.inputs import InputError, queue_check, run_check
from ..comfy_host.pulid_flux import LoadedPuLIDFlux
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
PuLIDFluxType = io.Custom("PULID_FLUX")
InfiniteYouType = io.Custom("INFINITEYOU")

# socket type -> (what it must be, which node makes it)
_OWN_TYPES = {
    "IDENTITY_EMBEDS": (IdentityEmbeds, "an encode node or Load Identity Embeds (OmniIdentity)"),
    "IDENTITY_ADAPTER": (IdentityAdapter, "Identity Adapter Loader (OmniIdentity)"),
    "OMNI_ID_ENCODER": (LoadedEncoder, "Identity Encoder Loader (OmniIdentity)"),
    "IDENTITY_DATASET": (IdentityDataset, "Identity Dataset or Build Identity Dataset (OmniIdentity)"),
    "PIVOT_ENCODER": (PivotIDEncoder, "Train Pivot ID Encoder (OmniIdentity)"),
    "FLAME_MODEL": (FlameModel, "FLAME Loader (OmniIdentity)"),
    "FLAME_PARAMS": (FlameParams, "FLAME Fit (OmniIdentity)"),
    "PULID_FLUX": (LoadedPuLIDFlux, "PuLID-FLUX Loader (OmniIdentity)"),
    "INFINITEYOU": (LoadedInfiniteYou, "InfiniteYou Loader (OmniIdentity)"),
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
    """Base of the pack's nodes: inputs are checked against the node's own schema, at queue time by
    ``validate_inputs`` and at run time by the ``checked`` call that opens each ``execute``.

    Subclasses may set ``ORDERED`` (pairs of inputs that must not decrease), ``PARSERS`` (input ->
    a function that raises ValueError on a bad text value) and ``MIN_IMAGE_SIZE``.
    """

    ORDERED: tuple[tuple[str, str], ...] = ()
    PARSERS: dict = {}
    MIN_IMAGE_SIZE = 16

    @classmethod
    def validate_inputs(cls, **values) -> bool | str:
        """Every value typed into the prompt, checked when it is queued: numbers finite and in range,
        combos among their options, ``ORDERED`` pairs in order, ``PARSERS`` texts parsed.

        Taking ``**values`` makes ComfyUI pass every input and leave the range and option checks to
        this method (JSON's NaN passes ComfyUI's own range check; it checks V3 combos only at run
        time); inputs that arrive through links are not known yet and come as absent."""
        return queue_check(cls, **values)

    @classmethod
    def checked(cls, **values):
        """The named run-time inputs checked and normalised, returned in the order given: one value
        for one name, else a tuple (see ``checked_inputs``)."""
        result = cls.checked_inputs(values)
        ordered = tuple(result[name] for name in values)
        return ordered[0] if len(ordered) == 1 else ordered

    @classmethod
    def checked_inputs(cls, inputs: dict) -> dict:
        """Run-time inputs checked and normalised: numbers finite and in range, images (B, H, W, 3|4) of
        at least ``MIN_IMAGE_SIZE``, masks as (B, H, W) floats, no NaN/Inf in tensors, the pack's own
        objects what their socket promises. Raises InputError naming the node, the input and what
        would be valid; the caller's objects are never modified (normalising makes new ones)."""
        return run_check(cls, inputs, RUN_CHECKS)


def advanced(spec):
    """An input for another model family or for experts: a socket without a widget, so the editor shows
    each graph only its own controls; unconnected, its default applies."""
    spec.force_input = True
    spec.tooltip = f"{spec.tooltip} Advanced: connect a value (e.g. a Primitive node) to change it."
    return spec
