"""The training runs the training nodes start, each one call: the pieces (encoder, decoder or adapter,
sampler, objective, trainer) wired on ComfyUI's models, trained with a progress bar and Cancel, and
handed back as the node's outputs.

Cancel stops a run after its current step and leaves a checkpoint in output/omni_identity_training/
that the same run name resumes from.
"""
from __future__ import annotations

import logging

import torch

from ..encoders.face import NoFaceFoundError
from ..encoders.face.crop import largest_face_mask
from ..encoders.identity import arcface_of_photos
from ..encoders.omni_id import EncoderConfig, create_encoder
from ..encoders.pivot import ALL_BLOCKS, PivotConfig, PivotIDEncoder, load_vision_state, prepare_vision, trained_vision_state
from ..guidance.adapter import AdapterConfig, create_adapter
from ..training.dataset import FewToManySampler, SamplerConfig
from ..training.flow_matching import ARCFACE_METHODS, FlowMatchingObjective
from ..training.mtd import MTDConfig
from ..training.pivot import CONDITION_DROPOUT, PivotObjective
from ..training.recipes import Settings, flow_stage, pivot_stage, resolve
from ..training.report import loss_plot
from ..training.run import mtd_trainer
from ..training.trainer import TrainConfig, Trainer
from .clip_vision import ClipVision
from .denoiser import ComfyDenoiserHost
from .encoder_model import LoadedEncoder
from .folders import run_checkpoint
from .gradients import tracked_forward
from .layers import dit_family, host_layers, model_family
from .pivot_vision import LAYOUT, ComfyVisionTower
from .progress import run_training, trainable_copy

LOG = logging.getLogger("OmniIdentity")

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


def apply_recipe(stage: str, recipe: str, steps: int, lr: float, image_size: int, batch: int,
                 grad_accum: int) -> Settings:
    """The run's settings under ``recipe``, announced in the log and on the console."""
    settings, line = resolve(stage, recipe, Settings(steps, lr, image_size, batch, grad_accum))
    LOG.info("%s", line)
    print(f"[OmniIdentity] {line}", flush=True)
    return settings


def _train_config(run: Settings, precision: str, seed: int, save_every: int) -> TrainConfig:
    return TrainConfig(steps=run.steps, batch=run.batch, grad_accum=run.grad_accum, lr=run.lr, precision=precision,
                       seed=seed, save_every=save_every)


def train_encoder_mtd(dataset, clip_vision, encoder_size: str, decoder_size: str, image_size: int, mask_ratio: float,
                      sampler: str, steps: int, lr: float, batch: int, grad_accum: int, inputs_min: int,
                      inputs_max: int, targets: int, precision: str, seed: int, run_name: str, resume: bool,
                      save_every: int, encoder=None, recipe: str = "custom"):
    """Omni-ID stage 1 (few-to-many reconstruction with the masked transformer decoder).
    Returns (the trained encoder, its loss plot)."""
    run = apply_recipe("mtd", recipe, steps, lr, image_size, batch, grad_accum)
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
        mtd = MTDConfig(image_size=run.image_size, mask_ratio=mask_ratio, **DECODER_SIZES[decoder_size])
        trainer = mtd_trainer(dataset, model, token_fn, mtd, _train_config(run, precision, seed, save_every),
                              SamplerConfig(sampler, inputs_min, inputs_max, targets),
                              checkpoint_path=run_checkpoint(run_name, "mtd"))
        run_training(trainer, resume)
    LOG.info("MTD training: %d steps, last loss %.5f", trainer.step, trainer.losses[-1])
    plot = loss_plot(trainer.losses, f"Omni-ID MTD (L1, {mask_ratio:.0%} masked) - {run_name}")
    return LoadedEncoder(model.eval(), f"{run_name} (trained)"), plot


def _new_adapter(model, token_dim: int, method: str, seed: int):
    layers = host_layers(model)
    config = AdapterConfig(family=model_family(model), token_dim=token_dim,
                           layer_dims=tuple(layer.inner_dim for layer in layers), embeds_kind=method)
    return create_adapter(config, seed=seed)


def train_flow_matching(model, vae, clip_vision, dataset, positive, mode: str, image_size: int, steps: int,
                        lr: float, batch: int, grad_accum: int, inputs_min: int, inputs_max: int, targets: int,
                        precision: str, seed: int, run_name: str, resume: bool, save_every: int, encoder=None,
                        adapter=None, method: str = "omni_id", encoder_size: str = list(ENCODER_SIZES)[0],
                        face_analysis=None, arcface_merge: str = "concat", recipe: str = "custom"):
    """Omni-ID stage 2 (or a baseline's training): the encoder and the adapter's identity projections
    on the frozen base model with its own denoising loss. Returns (the trained encoder or None for
    the clip method, the trained adapter, the loss plot)."""
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
        arcface_fn = arcface_of_photos(face_analysis, "the face analysis")
    run = apply_recipe(flow_stage(method), recipe, steps, lr, image_size, batch, grad_accum)
    host = ComfyDenoiserHost(model, vae, positive, run.image_size)
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
            trained_adapter = _new_adapter(model, token_dim, method, seed)
        host.check_adapter(trained_adapter)
        sampler = FewToManySampler(dataset, SamplerConfig("few_to_many", inputs_min, inputs_max, targets), seed)
        objective = FlowMatchingObjective(trained_encoder, trained_adapter, host, sampler, token_fn, seed=seed,
                                          mode=mode, method=method, arcface_fn=arcface_fn,
                                          arcface_merge=arcface_merge)
        trainer = Trainer(objective, _train_config(run, precision, seed, save_every), run_checkpoint(run_name, "flow"))
        run_training(trainer, resume)
    trained_adapter.name = f"{run_name} (trained)"
    plot = loss_plot(trainer.losses, f"Flow matching ({method}, {mode}) - {run_name}")
    encoder_out = None if trained_encoder is None else LoadedEncoder(trained_encoder.eval(), f"{run_name} (trained)")
    return encoder_out, trained_adapter.eval(), plot


def _face_mask_fn(face_analysis):
    """Target face masks for the localisation loss: the landmark hull of the largest face."""
    warned = []

    def mask(image):                  # (H, W, 3) -> (H, W)
        try:
            return largest_face_mask(image, face_analysis)
        except NoFaceFoundError:
            if not warned:
                LOG.warning("TrainPivotEncoder: a target without a detectable face gets no localisation target")
                warned.append(True)
            return torch.ones(image.shape[:2])
    return mask


def _vision_tower(clip_vision, pivot_encoder, vision_blocks: int, gradient_checkpointing: bool):
    """A trainable copy of the CLIP vision tower (None when only the fusing layer trains)."""
    if vision_blocks == 0:
        return None
    tower = ComfyVisionTower(clip_vision)
    if pivot_encoder is not None and pivot_encoder.vision_state:
        load_vision_state(tower, pivot_encoder.vision_state, pivot_encoder.config.vision_layout)
    trained_names = prepare_vision(tower, vision_blocks, gradient_checkpointing)
    LOG.info("TrainPivotEncoder: training the linear layer and %d visual encoder tensors (%s blocks)",
             len(trained_names), "all" if vision_blocks == ALL_BLOCKS else vision_blocks)
    return tower


def train_pivot_encoder(model, vae, clip_vision, dataset, face_analysis, positive, class_token: int, eta: float,
                        image_size: int, steps: int, lr: float, batch: int, targets: int, seed: int, run_name: str,
                        resume: bool, save_every: int, pivot_encoder=None, recipe: str = "custom",
                        vision_blocks: int = ALL_BLOCKS, gradient_checkpointing: bool = True,
                        condition_dropout: float = CONDITION_DROPOUT, unconditional=None):
    """OmniPortrait's Pivot ID encoder on a frozen SD1.5/SDXL UNet (L_diff + eta L_loc).
    Returns (the trained pivot encoder, its loss plot)."""
    if dit_family(model) is not None:
        raise ValueError("the pivot encoder replaces a word of a CLIP text conditioning: use an SD1.5 or SDXL model")
    text = positive[0][0]
    run = apply_recipe(pivot_stage(text.shape[-1]), recipe, steps, lr, image_size, batch, 1)
    host = ComfyDenoiserHost(model, vae, positive, run.image_size)
    embed_fn = ClipVision(clip_vision).image_embeds
    with tracked_forward():
        image_dim = embed_fn(torch.zeros(1, 224, 224, 3)).shape[-1]
        tower = _vision_tower(clip_vision, pivot_encoder, vision_blocks, gradient_checkpointing)
        config = PivotConfig(image_dim=image_dim, text_dim=text.shape[-1], vision_blocks=vision_blocks,
                             vision_layout=LAYOUT if tower is not None else "")
        if pivot_encoder is not None:
            if (pivot_encoder.config.image_dim, pivot_encoder.config.text_dim) != (image_dim, text.shape[-1]):
                raise ValueError(f"the pivot encoder ({pivot_encoder.config}) does not fit this CLIP and model "
                                 f"({config})")
            pivot = trainable_copy(lambda: PivotIDEncoder(config), pivot_encoder.state_dict())
        else:
            torch.manual_seed(seed)
            pivot = PivotIDEncoder(config)
        uncond = None if unconditional is None else unconditional[0][0].float().cpu().clone()
        sampler = FewToManySampler(dataset, SamplerConfig("few_to_many", 1, 1, targets), seed)
        objective = PivotObjective(pivot, host, sampler, None if tower is not None else embed_fn,
                                   _face_mask_fn(face_analysis), text, class_token, seed=seed, eta=eta,
                                   clip_size=getattr(clip_vision, "image_size", 224), vision=tower,
                                   unconditional=uncond, text_dropout=condition_dropout, id_dropout=condition_dropout)
        trainer = Trainer(objective, TrainConfig(steps=run.steps, batch=run.batch, lr=run.lr, seed=seed,
                                                 save_every=save_every), run_checkpoint(run_name, "pivot"))
        run_training(trainer, resume)
        if tower is not None:
            pivot.vision_state = trained_vision_state(tower)
    plot = loss_plot(trainer.losses, f"Pivot ID encoder (L_diff + {eta:g} L_loc) - {run_name}")
    return pivot.eval(), plot
