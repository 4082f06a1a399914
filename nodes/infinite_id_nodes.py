"""Infinite-ID nodes: mixed attention with cross-attention merging, and AdaIN-mean style."""
from __future__ import annotations

from comfy_api.latest import io

from ..comfy_host.two_streams import TEXT_STREAMS, apply_mixed_attention, set_adain
from ..guidance.decoupled import BlockWeights
from ..guidance.infinite_id import ADAIN_MODES, AdaINSettings
from .adapter_nodes import identity_inputs, inject
from .common import CATEGORY, OmniNode, advanced


class MixedAttention(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityMixedAttention",
            display_name="Mixed Attention (OmniIdentity)",
            category=f"{CATEGORY}/infinite_id",
            description=(
                "Infinite-ID (ECCV 2024) at inference: two streams run in one batched call per step, the identity "
                "stream (this model with the identity adapter) and the text stream (the base model denoising the "
                "prompt alone from the same initial noise: its own trajectory, as in the paper; only the identity "
                "images come out). The identity stream's self-attention also attends to the text stream's "
                "keys/values (mixed attention), and its text and identity cross-attention outputs are added "
                "(merging). About twice the cost of plain sampling. SD1.5 and SDXL."),
            inputs=[
                io.Model.Input("model", tooltip="SD1.5 or SDXL model (Infinite-ID is built on SDXL)."),
                *identity_inputs(),
                io.Combo.Input("text_stream", options=list(TEXT_STREAMS), default=TEXT_STREAMS[0], optional=True,
                               tooltip="own trajectory: the text stream is the prompt's own denoising from the same "
                                       "noise (the paper); shared latent: it is re-run on the identity stream's latent "
                                       "(cheaper: no second latent, and only the conditional rows when the identity's "
                                       "unconditional tokens are zero; weaker style transfer)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model running both streams.")],
        )

    ORDERED = (("start_at", "end_at"),)
    PARSERS = {"blocks": BlockWeights.parse}

    @classmethod
    def execute(cls, model, adapter, embeds, weight: float, start_at: float, end_at: float, attn_mask=None,
                blocks: str = "all=1", text_stream: str = TEXT_STREAMS[0]) -> io.NodeOutput:
        adapter, embeds, attn_mask = cls.checked(adapter=adapter, embeds=embeds, attn_mask=attn_mask)
        return inject(apply_mixed_attention, model, adapter, embeds, weight, start_at, end_at, attn_mask, blocks,
                      text_stream=text_stream)


class AdaINMean(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityAdaINMean",
            display_name="AdaIN-mean Style (OmniIdentity)",
            category=f"{CATEGORY}/infinite_id",
            description=(
                "Infinite-ID's style control: in mixed attention and cross-attention, the identity stream's queries "
                "and keys take the per-channel mean of the text stream's (not their variance), so the prompt's style "
                "carries over while the identity's feature spread is kept. Strength 0 is off. Connect after Mixed "
                "Attention."),
            inputs=[
                io.Model.Input("model", tooltip="The model from Mixed Attention (OmniIdentity)."),
                io.Float.Input("strength", default=1.0, min=0.0, max=1.0, step=0.05,
                               tooltip="0 = off, 1 = the identity features take the text stream's mean."),
                advanced(io.Combo.Input("mode", options=list(ADAIN_MODES), default="adain_mean", optional=True,
                               tooltip="adain_mean (the paper) or adain: mean and variance (the paper's ablation, "
                                       "which loses identity).")),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with AdaIN-mean style alignment.")],
        )

    @classmethod
    def execute(cls, model, strength: float, mode: str = "adain_mean") -> io.NodeOutput:
        return io.NodeOutput(set_adain(model, AdaINSettings(strength, mode)))


NODES = [MixedAttention, AdaINMean]
