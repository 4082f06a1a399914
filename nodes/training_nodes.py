"""Training nodes: Omni-ID's two stages (MTD, then flow matching on a frozen base model); each runs
comfy_host.training_runs with a progress bar, and Cancel keeps a checkpoint the same run resumes."""
from __future__ import annotations

from comfy_api.latest import io

from ..comfy_host.training_runs import DECODER_SIZES, ENCODER_SIZES, train_encoder_mtd, train_flow_matching
from ..encoders.omni_id import ARCFACE_MERGES
from ..training.flow_matching import FM_METHODS, FM_MODES
from ..training.recipes import RECIPES
from ..training.trainer import PRECISIONS
from .common import CATEGORY, IdentityAdapterType, IdentityDatasetType, OmniIdEncoderType, OmniNode


def _common_training_inputs(steps_default: int) -> list:
    return [
        io.Int.Input("steps", default=steps_default, min=1, max=10_000_000, tooltip="Optimizer updates in all (a resumed run continues up to this)."),
        io.Float.Input("lr", default=1e-4, min=1e-7, max=1.0, step=1e-5, tooltip="AdamW, constant (paper: 1e-4)."),
        io.Int.Input("batch", default=8, min=1, max=1024, tooltip="Identities per step."),
        io.Int.Input("grad_accum", default=1, min=1, max=1024, tooltip="Steps of gradient accumulation per update."),
        io.Int.Input("inputs_min", default=1, min=1, max=64, tooltip="Fewest input photos per identity (paper: 1)."),
        io.Int.Input("inputs_max", default=3, min=1, max=64, tooltip="Most input photos per identity (paper: 3)."),
        io.Int.Input("targets", default=8, min=1, max=64, tooltip="Target photos per identity (paper: all 8)."),
        io.Combo.Input("precision", options=list(PRECISIONS), default="fp32",
                       tooltip="bf16 autocast saves memory on GPUs that have it; fp32 everywhere else."),
        io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seeds initialisation, sampling, masks and noise."),
        io.String.Input("run_name", default="omni_id_run",
                        tooltip="Checkpoint name in output/omni_identity_training/; the same name resumes."),
        io.Boolean.Input("resume", default=True, tooltip="Continue from the run's checkpoint when there is one."),
        io.Int.Input("save_every", default=100, min=0, max=1_000_000, tooltip="Steps between checkpoints."),
    ]


def recipe_input(stage: str) -> io.Combo.Input:
    return io.Combo.Input("recipe", options=list(RECIPES), default="custom", optional=True,
                          tooltip=("custom: the steps, lr, batch and image size set here. quick: practical values for "
                                   "one machine. paper: the paper's steps, global batch (batch x grad_accum), "
                                   f"resolution and learning rate for this stage ({stage}); the node logs what it "
                                   "uses at start."))


class TrainEncoderMTD(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityTrainEncoderMTD",
            display_name="Train Encoder: MTD (OmniIdentity)",
            category=f"{CATEGORY}/training",
            description=("Omni-ID stage 1: few-to-many reconstruction. Per step, each identity's few input photos "
                         "(1-3) are encoded and a masked transformer decoder reconstructs all its targets (8) from "
                         "5% of their patches (95% masked, L1). CLIP stays frozen; the encoder and decoder train "
                         "with AdamW at a constant rate. Cancel keeps a checkpoint that resumes."),
            inputs=[
                IdentityDatasetType.Input("dataset", tooltip="From Identity Dataset or Build Identity Dataset."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP-H (the encoder's input features)."),
                OmniIdEncoderType.Input("encoder", optional=True,
                                        tooltip="An omni_id encoder to continue from; without it a new one starts."),
                io.Combo.Input("encoder_size", options=list(ENCODER_SIZES), default=list(ENCODER_SIZES)[0],
                               tooltip="Architecture of a new encoder (ignored when an encoder is connected)."),
                io.Combo.Input("decoder_size", options=list(DECODER_SIZES), default=list(DECODER_SIZES)[0],
                               tooltip="The masked transformer decoder (paper: 6 cross + 2 self-attention blocks)."),
                io.Int.Input("image_size", default=448, min=28, max=1024, step=14,
                             tooltip="Target resolution (paper: 448), a multiple of the 14 px patch."),
                io.Float.Input("mask_ratio", default=0.95, min=0.0, max=0.99, step=0.01,
                               tooltip="Share of target patches masked (paper 0.95; ablations 0.85, 0.99)."),
                io.Combo.Input("sampler", options=["few_to_many", "eight_to_eight", "one_to_one"],
                               default="few_to_many", tooltip="The paper's sampling and its ablations."),
                *_common_training_inputs(1000),
                recipe_input("Omni-ID MTD: global batch 256, 250K steps, 448 px, lr 1e-4"),
            ],
            outputs=[OmniIdEncoderType.Output(display_name="encoder", tooltip="The trained encoder (save it with Save Encoder)."),
                     io.Image.Output(display_name="loss_plot", tooltip="Loss per step and its running mean.")],
        )

    ORDERED = (("inputs_min", "inputs_max"),)

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        return io.NodeOutput(*train_encoder_mtd(**cls.checked_inputs(inputs)))


class TrainFlowMatching(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityTrainFlowMatching",
            display_name="Train Flow Matching (OmniIdentity)",
            category=f"{CATEGORY}/training",
            description=("Omni-ID stage 2: the identity adapter on a frozen base model. The encoder and the adapter's "
                         "per-layer K/V projections train with the model's own denoising loss (flow matching on "
                         "FLUX.1, FLUX.2, Chroma, Qwen-Image and Z-Image, epsilon on SD1.5/SDXL), few inputs to all "
                         "targets, the identity entering where Apply Identity Adapter puts it. 'identity_enhanced' "
                         "is Infinite-ID's identity-enhanced training: text cross-attention off (UNet models). "
                         "'method' trains the paper's baselines the same way: arcface (ArcFace projection), "
                         "arcface_clip (FaceIDPlus-style transformer), clip (no encoder: only the projections); "
                         "infinite_id trains Infinite-ID's identity extractor (with identity_enhanced: its own "
                         "training)."),
            inputs=[
                io.Model.Input("model", tooltip="The frozen base model: SD1.5, SDXL, FLUX.1, FLUX.2, Chroma, "
                                                "Qwen-Image or Z-Image. The adapter trained fits this family."),
                io.Vae.Input("vae", tooltip="The base model's VAE (targets are encoded once)."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP-H, as for Encode."),
                OmniIdEncoderType.Input("encoder", optional=True,
                                        tooltip="The encoder to train: omni_id from the MTD stage (required for "
                                                "omni_id); arcface / arcface_clip to continue one (else a new one "
                                                "starts); none for clip."),
                IdentityDatasetType.Input("dataset", tooltip="From Identity Dataset or Build Identity Dataset."),
                io.Conditioning.Input("positive", tooltip="Text conditioning for the targets, e.g. 'a photo of a person'."),
                IdentityAdapterType.Input("adapter", optional=True,
                                          tooltip="This pack's adapter to continue from; without it a new one starts."),
                io.Combo.Input("mode", options=list(FM_MODES), default="omni_id",
                               tooltip="omni_id: text + identity attention; identity_enhanced: text cross-attention off "
                                       "(SD1.5/SDXL only: a DiT's text and image share one attention)."),
                io.Int.Input("image_size", default=512, min=64, max=2048, step=64, tooltip="Target resolution."),
                *_common_training_inputs(1000),
                io.Combo.Input("method", options=list(FM_METHODS), default="omni_id", optional=True,
                               tooltip="The representation trained (Omni-ID's table rows): omni_id, arcface (ArcFace "
                                       "projected to tokens), clip (CLIP tokens straight into K/V: only the adapter "
                                       "trains), arcface_clip (ArcFace queries over CLIP tokens), infinite_id "
                                       "(Infinite-ID's CLIP last-layer and face mappers, concatenated)."),
                io.Combo.Input("encoder_size", options=list(ENCODER_SIZES), default=list(ENCODER_SIZES)[0],
                               optional=True,
                               tooltip="A new arcface / arcface_clip / infinite_id encoder's size (paper: 256 tokens "
                                       "x 1280)."),
                io.FaceAnalysis.Input("face_analysis", optional=True,
                                      tooltip="arcface, arcface_clip and infinite_id: computes each photo's ArcFace embedding "
                                              "(an insightface pack, or dlib with an ArcFace model)."),
                io.Combo.Input("arcface_merge", options=list(ARCFACE_MERGES), default="concat", optional=True,
                               tooltip="arcface: several photos' tokens concatenated (the paper) or the embeddings "
                                       "averaged first."),
                recipe_input("Omni-ID flow stage: global batch 32, 5K steps (ArcFace 75K), 512 px, lr 1e-4"),
            ],
            outputs=[OmniIdEncoderType.Output(display_name="encoder",
                                              tooltip="The encoder after stage 2 (none for the clip method)."),
                     IdentityAdapterType.Output(display_name="adapter", tooltip="The trained adapter (Save Adapter)."),
                     io.Image.Output(display_name="loss_plot", tooltip="Loss per step and its running mean.")],
        )

    ORDERED = (("inputs_min", "inputs_max"),)

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        return io.NodeOutput(*train_flow_matching(**cls.checked_inputs(inputs)))


NODES = [TrainEncoderMTD, TrainFlowMatching]
