"""Training nodes: Omni-ID's two stages (MTD, then flow matching on a frozen base model).

Training runs inside the node with a progress bar; Cancel stops it after the current step and
leaves a checkpoint in output/omni_identity_training/ that the same node resumes from.
"""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..comfy_host.clip_vision import ClipVision
from ..comfy_host.denoiser import ComfyDenoiserHost
from ..comfy_host.encoder_model import LoadedEncoder
from ..comfy_host.folders import run_checkpoint
from ..comfy_host.gradients import tracked_forward
from ..comfy_host.layers import host_layers, is_flux
from ..comfy_host.progress import run_training, trainable_copy
from ..encoders.omni_id import ARCFACE_MERGES, EncoderConfig, create_encoder
from ..guidance.adapter import AdapterConfig, create_adapter
from ..training.dataset import FewToManySampler, SamplerConfig
from ..encoders.identity import arcface_of_photos
from ..training.flow_matching import ARCFACE_METHODS, FM_METHODS, FM_MODES, FlowMatchingObjective
from ..training.recipes import RECIPES, Settings, flow_stage, resolve
from ..training.mtd import MTDConfig
from ..training.report import loss_plot
from ..training.run import mtd_trainer
from ..training.trainer import PRECISIONS, TrainConfig, Trainer
from .common import (CATEGORY, IdentityAdapterType, IdentityDatasetType, LOG, OmniIdEncoderType, OmniNode,
                     check_face_analysis, queued)

ENCODER_SIZES = {
    "paper (4 cross + 2 self, 1280 wide)": {},
    "small (2 cross + 1 self, 512 wide)": dict(dim=512, num_heads=8, cross_depth=2, self_depth=1),
    "tiny (1 cross + 1 self, 128 wide, 16 queries)": dict(dim=128, num_heads=4, cross_depth=1, self_depth=1,
                                                         num_queries=16, mlp_ratio=2.0),
}
DECODER_SIZES = {
    "paper (6 cross + 2 self, 1024 wide)": {},
    "small (3 cross + 1 self, 384 wide)": dict(dim=384, num_heads=6, cross_depth=3, self_depth=1),
    "tiny (1 cross + 1 self, 64 wide)": dict(dim=64, num_heads=4, cross_depth=1, self_depth=1, mlp_ratio=2.0),
}


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


def apply_recipe(stage: str, recipe: str, steps: int, lr: float, image_size: int, batch: int,
                 grad_accum: int) -> Settings:
    settings, line = resolve(stage, recipe, Settings(steps, lr, image_size, batch, grad_accum))
    LOG.info("%s", line)
    print(f"[OmniIdentity] {line}", flush=True)
    return settings


def _train_config(steps, lr, batch, grad_accum, precision, seed, save_every) -> TrainConfig:
    return TrainConfig(steps=steps, batch=batch, grad_accum=grad_accum, lr=lr, precision=precision, seed=seed,
                       save_every=save_every)


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
    validate_inputs = queued("encoder_size", "decoder_size", "precision", "sampler", "mask_ratio", "lr",
                             "inputs_min", "inputs_max", "recipe")

    @classmethod
    def execute(cls, dataset, clip_vision, encoder_size: str, decoder_size: str, image_size: int, mask_ratio: float,
                sampler: str, steps: int, lr: float, batch: int, grad_accum: int, inputs_min: int, inputs_max: int,
                targets: int, precision: str, seed: int, run_name: str, resume: bool, save_every: int,
                encoder=None, recipe: str = "custom") -> io.NodeOutput:
        run = apply_recipe("mtd", recipe, steps, lr, image_size, batch, grad_accum)
        steps, lr, image_size, batch, grad_accum = run.steps, run.lr, run.image_size, run.batch, run.grad_accum
        token_fn = ClipVision(clip_vision).tokens
        with tracked_forward():
            probe = token_fn(torch.zeros(1, 224, 224, 3))
            if encoder is not None:
                config = encoder.config
                model = trainable_copy(lambda: create_encoder(config), encoder.model.state_dict())
            else:
                config = EncoderConfig(clip_dim=probe.shape[-1], tokens_per_image=probe.shape[1],
                                       **ENCODER_SIZES[encoder_size])
                model = create_encoder(config, seed=seed)
            if config.architecture != "omni_id" or config.clip_dim != probe.shape[-1]:
                raise ValueError(f"the encoder ({config.architecture}, CLIP width {config.clip_dim}) cannot train on "
                                 f"this CLIP vision model's {probe.shape[-1]}-wide tokens")
            mtd = MTDConfig(image_size=image_size, mask_ratio=mask_ratio, **DECODER_SIZES[decoder_size])
            trainer = mtd_trainer(dataset, model, token_fn, mtd,
                                  _train_config(steps, lr, batch, grad_accum, precision, seed, save_every),
                                  SamplerConfig(sampler, inputs_min, inputs_max, targets),
                                  checkpoint_path=run_checkpoint(run_name, "mtd"))
            run_training(trainer, resume)
        LOG.info("MTD training: %d steps, last loss %.5f", trainer.step, trainer.losses[-1])
        plot = loss_plot(trainer.losses, f"Omni-ID MTD (L1, {mask_ratio:.0%} masked) - {run_name}")
        return io.NodeOutput(LoadedEncoder(model.eval(), f"{run_name} (trained)"), plot)


class TrainFlowMatching(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityTrainFlowMatching",
            display_name="Train Flow Matching (OmniIdentity)",
            category=f"{CATEGORY}/training",
            description=("Omni-ID stage 2: the identity adapter on a frozen base model. The encoder and the adapter's "
                         "per-layer K/V projections train with the model's own denoising loss (flow matching on "
                         "FLUX, epsilon on SD1.5/SDXL), few inputs to all targets. 'identity_enhanced' is "
                         "Infinite-ID's identity-enhanced training: text cross-attention off (UNet models). "
                         "'method' trains the paper's baselines the same way: arcface (ArcFace projection), "
                         "arcface_clip (FaceIDPlus-style transformer), clip (no encoder: only the projections); "
                         "infinite_id trains Infinite-ID's identity extractor (with identity_enhanced: its own "
                         "training)."),
            inputs=[
                io.Model.Input("model", tooltip="The frozen base model (SD1.5, SDXL or FLUX)."),
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
                               tooltip="omni_id: text + identity attention; identity_enhanced: text cross-attention off."),
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
    validate_inputs = queued("mode", "precision", "lr", "inputs_min", "inputs_max", "method", "encoder_size",
                             "arcface_merge", "recipe")

    @classmethod
    def execute(cls, model, vae, clip_vision, dataset, positive, mode: str, image_size: int, steps: int,
                lr: float, batch: int, grad_accum: int, inputs_min: int, inputs_max: int, targets: int,
                precision: str, seed: int, run_name: str, resume: bool, save_every: int, encoder=None,
                adapter=None, method: str = "omni_id", encoder_size: str = list(ENCODER_SIZES)[0],
                face_analysis=None, arcface_merge: str = "concat", recipe: str = "custom") -> io.NodeOutput:
        if method == "omni_id" and encoder is None:
            raise ValueError("the omni_id method trains an omni_id encoder: connect one (from the MTD stage or the "
                             "Encoder Loader)")
        if method == "clip" and encoder is not None:
            raise ValueError("the clip method has no encoder (CLIP tokens go straight into the adapter's K/V): "
                             "disconnect the encoder")
        arcface_fn = None
        if method in ARCFACE_METHODS:
            if face_analysis is None:
                raise ValueError(f"the {method} method needs face_analysis connected (an insightface pack, or dlib "
                                 "with an ArcFace model) for the photos' ArcFace embeddings")
            arcface_fn = arcface_of_photos(check_face_analysis(face_analysis), "the face analysis")
        run = apply_recipe(flow_stage(method), recipe, steps, lr, image_size, batch, grad_accum)
        steps, lr, image_size, batch, grad_accum = run.steps, run.lr, run.image_size, run.batch, run.grad_accum
        host = ComfyDenoiserHost(model, vae, positive, image_size)
        layers = host_layers(model)
        vision = ClipVision(clip_vision)
        token_fn = vision.last_tokens if method == "infinite_id" else vision.tokens    # Infinite-ID reads the last layer
        with tracked_forward():
            trained_encoder = None
            if encoder is not None:
                trained_encoder = trainable_copy(lambda: create_encoder(encoder.config), encoder.model.state_dict())
            elif method != "clip":
                probe = token_fn(torch.zeros(1, 224, 224, 3))
                trained_encoder = create_encoder(EncoderConfig(architecture=method, clip_dim=probe.shape[-1],
                                                               tokens_per_image=probe.shape[1],
                                                               **ENCODER_SIZES[encoder_size]), seed=seed)
            if adapter is not None:
                trained_adapter = trainable_copy(lambda: create_adapter(adapter.config), adapter.state_dict())
            else:
                token_dim = (trained_encoder.config.dim if trained_encoder is not None
                             else token_fn(torch.zeros(1, 224, 224, 3)).shape[-1])
                config = AdapterConfig(family="flux" if is_flux(model) else "unet", token_dim=token_dim,
                                       layer_dims=tuple(layer.inner_dim for layer in layers), embeds_kind=method)
                trained_adapter = create_adapter(config, seed=seed)
            host.check_adapter(trained_adapter)
            sampler = FewToManySampler(dataset, SamplerConfig("few_to_many", inputs_min, inputs_max, targets), seed)
            objective = FlowMatchingObjective(trained_encoder, trained_adapter, host, sampler, token_fn, seed=seed,
                                              mode=mode, method=method, arcface_fn=arcface_fn,
                                              arcface_merge=arcface_merge)
            trainer = Trainer(objective, _train_config(steps, lr, batch, grad_accum, precision, seed, save_every),
                              run_checkpoint(run_name, "flow"))
            run_training(trainer, resume)
        trained_adapter.name = f"{run_name} (trained)"
        plot = loss_plot(trainer.losses, f"Flow matching ({method}, {mode}) - {run_name}")
        encoder_out = (None if trained_encoder is None
                       else LoadedEncoder(trained_encoder.eval(), f"{run_name} (trained)"))
        return io.NodeOutput(encoder_out, trained_adapter.eval(), plot)


NODES = [TrainEncoderMTD, TrainFlowMatching]
