"""Identity embeds nodes: combine identities, save them as .safetensors, load them back."""
from __future__ import annotations

import hashlib
import os

from comfy_api.latest import io, ui

from ..comfy_host.folders import annotated_path, embeds_files, save_output_file
from ..encoders.embeds import COMBINE_MODES, combine_embeds, load_embeds, save_embeds
from .common import CATEGORY, IdentityEmbedsType, LOG, OmniNode


class CombineEmbeds(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        weight = "Weight of embeds_{} when averaging."
        return io.Schema(
            node_id="OmniIdentityCombineEmbeds",
            display_name="Combine Identity Embeds (OmniIdentity)",
            category=f"{CATEGORY}/encode",
            description=("Merges identities of the same kind: concat joins tokens and photos (e.g. two photo "
                         "sets of one person); average takes a weighted mean (blend identities)."),
            inputs=[
                IdentityEmbedsType.Input("embeds_1", tooltip="First identity."),
                IdentityEmbedsType.Input("embeds_2", tooltip="Second identity."),
                IdentityEmbedsType.Input("embeds_3", optional=True, tooltip="Optional third identity."),
                IdentityEmbedsType.Input("embeds_4", optional=True, tooltip="Optional fourth identity."),
                io.Combo.Input("mode", options=list(COMBINE_MODES), default="concat",
                               tooltip="concat: join along tokens / photos; average: weighted mean."),
                *(io.Float.Input(f"weight_{i}", default=1.0, min=0.0, max=10.0, step=0.05, optional=True,
                                 tooltip=weight.format(i)) for i in range(1, 5)),
            ],
            outputs=[IdentityEmbedsType.Output(display_name="embeds", tooltip="The combined identity.")],
        )

    @classmethod
    def execute(cls, embeds_1, embeds_2, mode: str, embeds_3=None, embeds_4=None, weight_1=1.0, weight_2=1.0,
                weight_3=1.0, weight_4=1.0) -> io.NodeOutput:
        embeds_1, embeds_2, embeds_3, embeds_4 = cls.checked(
            embeds_1=embeds_1, embeds_2=embeds_2, embeds_3=embeds_3, embeds_4=embeds_4)
        pairs = [(e, w) for e, w in ((embeds_1, weight_1), (embeds_2, weight_2), (embeds_3, weight_3),
                                     (embeds_4, weight_4)) if e is not None]
        combined = combine_embeds([e for e, _ in pairs], mode, [w for _, w in pairs])
        return io.NodeOutput(combined, ui=ui.PreviewText(combined.describe()))


class SaveEmbeds(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentitySaveEmbeds",
            display_name="Save Identity Embeds (OmniIdentity)",
            category=f"{CATEGORY}/encode",
            description=("Saves an identity as .safetensors in ComfyUI's output folder (never pickle), so it can "
                         "be reused without the photos: copy it to input/ or load it from output/."),
            inputs=[
                IdentityEmbedsType.Input("embeds", tooltip="The identity to save."),
                io.String.Input("filename_prefix", default="omni_identity/identity",
                                tooltip="Path under the output folder; a counter and .safetensors are appended (nothing is overwritten)."),
            ],
            outputs=[],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, embeds, filename_prefix: str) -> io.NodeOutput:
        embeds = cls.checked(embeds=embeds)
        subfolder, filename = save_output_file(filename_prefix, lambda path: save_embeds(embeds, path))
        saved = {"filename": filename, "subfolder": subfolder, "type": "output"}
        relative = os.path.join(subfolder, filename)
        LOG.info("SaveEmbeds: wrote output/%s", relative)
        return io.NodeOutput(ui={"embeds": [saved], "text": [f"saved {relative}"]})


class LoadEmbeds(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityLoadEmbeds",
            display_name="Load Identity Embeds (OmniIdentity)",
            category=f"{CATEGORY}/encode",
            description="Loads an identity saved by Save Identity Embeds, from the input or output folder.",
            inputs=[io.Combo.Input("embeds_file", options=embeds_files(),
                                   tooltip="A saved identity: files in input/, or in output/ marked [output].")],
            outputs=[IdentityEmbedsType.Output(display_name="embeds", tooltip="The loaded identity.")],
        )

    @classmethod
    def fingerprint_inputs(cls, embeds_file):
        path = annotated_path(embeds_file)
        digest = hashlib.sha256()
        with open(path, "rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return digest.hexdigest()

    @classmethod
    def execute(cls, embeds_file: str) -> io.NodeOutput:
        embeds = load_embeds(annotated_path(embeds_file))
        return io.NodeOutput(embeds, ui=ui.PreviewText(embeds.describe()))


NODES = [CombineEmbeds, SaveEmbeds, LoadEmbeds]
