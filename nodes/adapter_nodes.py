"""Identity adapter nodes: load an adapter file, apply an identity to a model."""
from __future__ import annotations

from comfy_api.latest import io, ui

from ..comfy_host.folders import model_files, model_path
from ..comfy_host.identity import INJECT_MODES, apply_identity, overlap_with_applied
from ..comfy_host.layers import fit_summary
from ..guidance.adapter import AdapterFitError
from ..guidance.adapter_files import load_adapter
from ..guidance.decoupled import WEIGHT_MODES, BlockWeights
from .common import CATEGORY, LOG, IdentityAdapterType, IdentityEmbedsType, OmniNode, advanced


class AdapterLoader(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityAdapterLoader",
            display_name="Identity Adapter Loader (OmniIdentity)",
            category=f"{CATEGORY}/adapter",
            description=("Loads an identity adapter from models/ipadapter, recognised by its keys: this pack's "
                         "adapters (Omni-ID or a baseline, for SD1.5, SDXL or FLUX), h94 IP-Adapters for SD1.5 and "
                         "SDXL (Plus, Plus-Face, Full-Face, FaceID, FaceID Plus v2, base) and the FLUX IP-Adapters "
                         "of XLabs (v1, v2; CLIP-L) and InstantX (FLUX.1-dev-IP-Adapter; SigLIP)."),
            inputs=[io.Combo.Input("adapter_name", options=model_files("ipadapter"),
                                   tooltip="Adapter file in models/ipadapter (.safetensors; .bin files are read as "
                                           "plain tensors only).")],
            outputs=[IdentityAdapterType.Output(display_name="adapter", tooltip="The loaded identity adapter.")],
        )

    @classmethod
    def execute(cls, adapter_name: str) -> io.NodeOutput:
        return io.NodeOutput(load_adapter(model_path("ipadapter", adapter_name), adapter_name))


def identity_inputs() -> list:
    """The inputs every identity-injecting node shares (adapter, embeds, schedule, mask, blocks)."""
    return [
        IdentityAdapterType.Input("adapter", tooltip="From Identity Adapter Loader."),
        IdentityEmbedsType.Input("embeds", tooltip="The identity, from an encode or load node."),
        io.Float.Input("weight", default=1.0, min=-1.0, max=5.0, step=0.05,
                       tooltip="Strength of the identity; 0 leaves the cross-attention outputs unchanged."),
        io.Float.Input("start_at", default=0.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of the sampling schedule where the identity starts."),
        io.Float.Input("end_at", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="Fraction of the schedule where it stops."),
        io.Mask.Input("attn_mask", optional=True,
                      tooltip="Where the identity applies (image space, any size; resized to each layer)."),
        io.String.Input("blocks", default="all=1", optional=True,
                        tooltip="Per-block weights: 'selector=weight, ...' with selector all, input, middle, "
                                "output (UNet), double, single (FLUX) or group.N, e.g. 'all=1, input=0'."),
    ]


def inject(host_fn, model, adapter, embeds, weight, start_at, end_at, attn_mask, blocks, **options):
    """Project the identity and run a host's injection on a clone of ``model``; a region that overlaps an
    identity already applied is reported (both identities apply there)."""
    faceid_v2_scale = options.pop("faceid_v2_scale", 1.0)
    try:
        tokens = adapter.identity_tokens(embeds, faceid_v2_scale)
        patched = host_fn(model, adapter, tokens, weight, start_at, end_at, mask=attn_mask,
                          blocks=BlockWeights.parse(blocks), **options)
    except AdapterFitError as exc:
        raise AdapterFitError(f"{exc}\n{fit_summary(adapter, embeds, model)}") from exc
    share = overlap_with_applied(model, attn_mask)
    text = f"identity '{embeds.describe()}' applied with weight {weight}"
    if share > 0.02:
        text += (f"; its attn_mask overlaps the region of an identity applied before by {share:.0%} of the "
                 "smaller region: both identities apply there")
        LOG.warning("ApplyAdapter: %s", text)
    return io.NodeOutput(patched, ui=ui.PreviewText(text))


class ApplyAdapter(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityApplyAdapter",
            display_name="Apply Identity Adapter (OmniIdentity)",
            category=f"{CATEGORY}/adapter",
            description=("Injects an identity into a model with decoupled cross-attention: every cross-attention "
                         "layer adds weight x Attn(q, K_id, V_id) to its text attention (IP-Adapter). Returns a "
                         "patched copy; the input model is untouched. Chain several to combine identities."),
            inputs=[
                io.Model.Input("model", tooltip="SD1.5, SDXL or FLUX model."),
                *identity_inputs(),
                advanced(io.Combo.Input("flux_inject", options=list(INJECT_MODES), default="both", optional=True,
                               tooltip="FLUX only: inject into double (MM-DiT) blocks, single (DiT) blocks, or both.")),
                advanced(io.Float.Input("faceid_v2_scale", default=1.0, min=0.0, max=5.0, step=0.05, optional=True,
                               tooltip="FaceID Plus v2 adapters only: weight of the CLIP refinement.")),
                advanced(io.Combo.Input("weight_mode", options=list(WEIGHT_MODES), default="output", optional=True,
                               tooltip="How weight acts: output scales the identity term (h94, diffusers; "
                                       "IPAdapter_plus's 'V only', its default); kv scales the identity keys and "
                                       "values (IPAdapter_plus's 'K+V' option). Equal at weight 1.")),
            ],
            outputs=[io.Model.Output(display_name="model", tooltip="The model with the identity injected.")],
        )

    ORDERED = (("start_at", "end_at"),)
    PARSERS = {"blocks": BlockWeights.parse}

    @classmethod
    def execute(cls, model, adapter, embeds, weight: float, start_at: float, end_at: float, attn_mask=None,
                blocks: str = "all=1", flux_inject: str = "both", faceid_v2_scale: float = 1.0,
                weight_mode: str = "output") -> io.NodeOutput:
        adapter, embeds, attn_mask = cls.checked(adapter=adapter, embeds=embeds, attn_mask=attn_mask)
        return inject(apply_identity, model, adapter, embeds, weight, start_at, end_at, attn_mask, blocks,
                      inject=flux_inject, faceid_v2_scale=faceid_v2_scale, weight_mode=weight_mode)


NODES = [AdapterLoader, ApplyAdapter]
