"""Save nodes for what the training nodes make: encoders, adapters and pivot encoders.

Each writes models/<folder>/<prefix>_NNNNN.safetensors (never overwriting), where its loader
lists it, and outputs the name the loader lists it under.
"""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..comfy_host.folders import save_model_file
from ..encoders.checkpoint import save_encoder
from ..encoders.pivot import save_pivot
from ..guidance.adapter import save_adapter
from .common import CATEGORY, IdentityAdapterType, OmniIdEncoderType, OmniNode, PivotEncoderType


class SaveModelFile(OmniNode):
    """One save node per kind of file: subclasses say what they take and how it is written."""

    NODE_ID = DISPLAY = WHAT = FOLDER = DEFAULT_PREFIX = OUTPUT = LOADER = ""
    SOCKET = None

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id=cls.NODE_ID,
            display_name=cls.DISPLAY,
            category=f"{CATEGORY}/training",
            description=(f"Writes {cls.WHAT} to models/{cls.FOLDER}/<prefix>_NNNNN.safetensors (config in the "
                         f"metadata, never overwriting), where {cls.LOADER} lists it."),
            inputs=[cls.SOCKET.Input(cls.INPUT, tooltip=f"A trained {cls.WHAT.split(' ', 1)[1]}."),
                    io.String.Input("filename_prefix", default=cls.DEFAULT_PREFIX,
                                    tooltip=f"Path under models/{cls.FOLDER}; a counter is added.")],
            outputs=[io.String.Output(display_name=cls.OUTPUT, tooltip="The name the loader lists it under.")],
            is_output_node=True,
        )

    @classmethod
    def write(cls, value, path: str) -> None:
        raise NotImplementedError

    @classmethod
    def execute(cls, filename_prefix: str, **values) -> io.NodeOutput:
        value = cls.checked(**{cls.INPUT: values[cls.INPUT]})
        name = save_model_file(cls.FOLDER, filename_prefix, lambda path: cls.write(value, path))
        return io.NodeOutput(name, ui=ui.PreviewText(f"saved models/{cls.FOLDER}/{name}"))


class SaveEncoder(SaveModelFile):
    NODE_ID, DISPLAY, WHAT = "OmniIdentitySaveEncoder", "Save Encoder (OmniIdentity)", "an identity encoder"
    FOLDER, DEFAULT_PREFIX, OUTPUT = "omni_identity", "trained/omni_id", "encoder_name"
    LOADER, SOCKET, INPUT = "Identity Encoder Loader", OmniIdEncoderType, "encoder"

    @classmethod
    def write(cls, encoder, path: str) -> None:
        save_encoder(encoder.model, path, extra={"saved_by": cls.NODE_ID})


class SaveAdapter(SaveModelFile):
    NODE_ID, DISPLAY, WHAT = "OmniIdentitySaveAdapter", "Save Adapter (OmniIdentity)", "an identity adapter"
    FOLDER, DEFAULT_PREFIX, OUTPUT = "ipadapter", "trained/omni_id_adapter", "adapter_name"
    LOADER, SOCKET, INPUT = "Identity Adapter Loader", IdentityAdapterType, "adapter"

    @classmethod
    def write(cls, adapter, path: str) -> None:
        save_adapter(adapter, path, extra={"saved_by": cls.NODE_ID})


class SavePivotEncoder(SaveModelFile):
    NODE_ID, DISPLAY, WHAT = "OmniIdentitySavePivotEncoder", "Save Pivot Encoder (OmniIdentity)", "a pivot encoder"
    FOLDER, DEFAULT_PREFIX, OUTPUT = "omni_identity", "trained/pivot", "pivot_name"
    LOADER, SOCKET, INPUT = "Apply Pivot ID", PivotEncoderType, "pivot_encoder"

    @classmethod
    def write(cls, pivot, path: str) -> None:
        save_pivot(pivot, path)


NODES = [SaveEncoder, SaveAdapter, SavePivotEncoder]
