"""Infinite-ID nodes: mixed attention with cross-attention merging, and AdaIN-mean style."""
from __future__ import annotations

from comfy_api.latest import io

from ..comfy_host.two_streams import apply_mixed_attention, set_adain
from ..guidance.infinite_id import ADAIN_MODES, AdaINSettings
from .adapter_nodes import identity_inputs, inject, validate_identity_inputs
from .common import CATEGORY, check_combos


class MixedAttention(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityMixedAttention",
            display_name="Mixed Attention (OmniIdentity)",
            category=f"{CATEGORY}/infinite_id",
            description=(
                "Infinite-ID (ECCV 2024) at inference: every step runs two streams in one batched call, the "
                "identity stream (this model with the identity adapter) and the text stream (the base model, "
                "prompt only), on the same latent. The identity stream's self-attention also attends to the text "
                "stream's keys/values (mixed attention), and its text and identity cross-attention outputs are "
                "added (merging). About twice the cost of plain sampling. SD1.5 and SDXL."),
            inputs=[
                io.Model.Input("model", tooltip="SD1.5 or SDXL model (Infinite-ID is built on SDXL)."),
                *identity_inputs(),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model running both streams.")],
        )

    @classmethod
    def validate_inputs(cls, blocks=None, start_at=None, end_at=None):
        return validate_identity_inputs(blocks, start_at, end_at)

    @classmethod
    def execute(cls, model, adapter, embeds, weight: float, start_at: float, end_at: float, attn_mask=None,
                blocks: str = "all=1") -> io.NodeOutput:
        return io.NodeOutput(inject(apply_mixed_attention, model, adapter, embeds, weight, start_at, end_at,
                                    attn_mask, blocks))


class AdaINMean(io.ComfyNode):
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
                io.Combo.Input("mode", options=list(ADAIN_MODES), default="adain_mean", optional=True,
                               tooltip="adain_mean (the paper) or adain: mean and variance (the paper's ablation, "
                                       "which loses identity)."),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with AdaIN-mean style alignment.")],
        )

    @classmethod
    def validate_inputs(cls, mode=None):
        return check_combos(cls, mode=mode)

    @classmethod
    def execute(cls, model, strength: float, mode: str = "adain_mean") -> io.NodeOutput:
        return io.NodeOutput(set_adain(model, AdaINSettings(strength, mode)))


NODES = [MixedAttention, AdaINMean]
