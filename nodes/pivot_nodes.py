"""OmniPortrait's Pivot ID Encoder: train it on a frozen UNet, apply it to a conditioning."""
from __future__ import annotations

import torch
from comfy_api.latest import io

from ..comfy_host.clip_vision import ClipVision
from ..comfy_host.denoiser import ComfyDenoiserHost
from ..comfy_host.folders import model_files, model_path, run_checkpoint
from ..comfy_host.gradients import tracked_forward
from ..comfy_host.layers import is_flux
from ..comfy_host.pivot_vision import LAYOUT, ComfyVisionTower, pivot_image_embeds
from ..comfy_host.progress import run_training, trainable_copy
from ..encoders.face import NoFaceFoundError
from ..encoders.face.crop import largest_face_mask
from ..encoders.pivot import (ALL_BLOCKS, PivotConfig, PivotIDEncoder, load_pivot, load_vision_state, prepare_vision,
                              trained_vision_state)
from ..guidance.rb_guidance import SUBJECT_TOKEN_KEY
from ..training.dataset import FewToManySampler, SamplerConfig
from ..training.pivot import CONDITION_DROPOUT, ETA, PivotObjective
from ..training.report import loss_plot
from ..training.recipes import pivot_stage
from ..training.trainer import TrainConfig, Trainer
from .training_nodes import apply_recipe, recipe_input
from .common import CATEGORY, IdentityDatasetType, LOG, OmniNode, PivotEncoderType, check_face_analysis, queued


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


class TrainPivotEncoder(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityTrainPivotEncoder",
            display_name="Train Pivot ID Encoder (OmniIdentity)",
            category=f"{CATEGORY}/training",
            description=("OmniPortrait's pivot encoder on a frozen UNet (stage 2's pivot mode): the reference face's "
                         "CLIP image embedding and the class word's text embedding are fused into e_mix, which "
                         "replaces the class word; loss = the model's denoising loss + eta x the face-localisation "
                         "loss (e_mix's cross-attention map on a 16 x 16 grid against the target's face mask, "
                         "eta = 2e-3). The visual encoder (a copy of the CLIP vision model) trains with the linear "
                         "layer, all of it (the paper) or its last N blocks; 10% of the text and of the ID "
                         "conditions are dropped for CFG. One photo of each person is the reference, the others "
                         "are targets."),
            inputs=[
                io.Model.Input("model", tooltip="The frozen base model (SD1.5 or SDXL)."),
                io.Vae.Input("vae", tooltip="The base model's VAE."),
                io.ClipVision.Input("clip_vision", tooltip="OpenCLIP ViT-L/14 in the paper (its projected embedding)."),
                IdentityDatasetType.Input("dataset", tooltip="From Identity Dataset or Build Identity Dataset."),
                io.FaceAnalysis.Input("face_analysis", tooltip="Makes the targets' face masks."),
                io.Conditioning.Input("positive", tooltip="The training prompt, e.g. 'a photo of a person'."),
                io.Int.Input("class_token", default=5, min=1, max=76,
                             tooltip="Position of the class word in the prompt's tokens (1 = first word after the "
                                     "start token): 'a photo of a person' -> 'person' is 5."),
                PivotEncoderType.Input("pivot_encoder", optional=True, tooltip="A pivot encoder to continue from."),
                io.Float.Input("eta", default=ETA, min=0.0, max=10.0, step=1e-4, tooltip="Weight of L_loc."),
                io.Int.Input("image_size", default=512, min=64, max=2048, step=64, tooltip="Target resolution."),
                io.Int.Input("steps", default=1000, min=1, max=10_000_000, tooltip="Optimizer updates in all."),
                io.Float.Input("lr", default=2e-5, min=1e-7, max=1.0, step=1e-6, tooltip="AdamW (paper: 2e-5)."),
                io.Int.Input("batch", default=4, min=1, max=1024, tooltip="Identities per step."),
                io.Int.Input("targets", default=8, min=1, max=64, tooltip="Photos per identity: one reference, the rest targets."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seeds initialisation, sampling and noise."),
                io.String.Input("run_name", default="pivot_run",
                                tooltip="Checkpoint name in output/omni_identity_training/; the same name resumes."),
                io.Boolean.Input("resume", default=True, tooltip="Continue from the run's checkpoint when there is one."),
                io.Int.Input("save_every", default=100, min=0, max=1_000_000, tooltip="Steps between checkpoints."),
                recipe_input("OmniPortrait pivot: 80K steps SD1.5 / 60K SDXL at 1024 px, AdamW 2e-5"),
                io.Int.Input("vision_blocks", default=ALL_BLOCKS, min=ALL_BLOCKS, max=128, optional=True,
                             tooltip="Blocks of the visual encoder trained with the linear layer: -1 all (the paper), "
                                     "N the last N (with its final norm and projection), 0 frozen (only the linear "
                                     "layer, as before)."),
                io.Boolean.Input("gradient_checkpointing", default=True, optional=True,
                                 tooltip="Recompute the trained vision blocks' activations in the backward pass: "
                                         "less memory, about a third more compute for those blocks."),
                io.Float.Input("condition_dropout", default=CONDITION_DROPOUT, min=0.0, max=1.0, step=0.01,
                               optional=True,
                               tooltip="Share of samples whose text (prompt -> unconditional) and, independently, "
                                       "whose ID (image embedding -> zeros) is dropped, for CFG (paper: 10%)."),
                io.Conditioning.Input("unconditional", optional=True,
                                      tooltip="The conditioning a dropped text becomes (e.g. CLIPTextEncode of an "
                                              "empty prompt); zeros when not connected."),
            ],
            outputs=[PivotEncoderType.Output(display_name="pivot_encoder", tooltip="The trained pivot encoder."),
                     io.Image.Output(display_name="loss_plot", tooltip="Loss per step and its running mean.")],
        )

    validate_inputs = queued("eta", "lr", "recipe", "condition_dropout")

    @classmethod
    def execute(cls, model, vae, clip_vision, dataset, face_analysis, positive, class_token: int, eta: float,
                image_size: int, steps: int, lr: float, batch: int, targets: int, seed: int, run_name: str,
                resume: bool, save_every: int, pivot_encoder=None, recipe: str = "custom",
                vision_blocks: int = ALL_BLOCKS, gradient_checkpointing: bool = True,
                condition_dropout: float = CONDITION_DROPOUT, unconditional=None) -> io.NodeOutput:
        if is_flux(model):
            raise ValueError("the pivot encoder replaces a word of a CLIP text conditioning: use an SD1.5 or SDXL model")
        text = positive[0][0]
        run = apply_recipe(pivot_stage(text.shape[-1]), recipe, steps, lr, image_size, batch, 1)
        steps, lr, image_size, batch = run.steps, run.lr, run.image_size, run.batch
        host = ComfyDenoiserHost(model, vae, positive, image_size)
        embed_fn = ClipVision(clip_vision).image_embeds
        check_face_analysis(face_analysis)
        with tracked_forward():
            image_dim = embed_fn(torch.zeros(1, 224, 224, 3)).shape[-1]
            tower = None
            if vision_blocks != 0:
                tower = ComfyVisionTower(clip_vision)
                if pivot_encoder is not None and pivot_encoder.vision_state:
                    load_vision_state(tower, pivot_encoder.vision_state, pivot_encoder.config.vision_layout)
                trained_names = prepare_vision(tower, vision_blocks, gradient_checkpointing)
                LOG.info("TrainPivotEncoder: training the linear layer and %d visual encoder tensors (%s blocks)",
                         len(trained_names), "all" if vision_blocks == ALL_BLOCKS else vision_blocks)
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
            uncond = None
            if unconditional is not None:
                uncond = unconditional[0][0].float().cpu().clone()
            sampler = FewToManySampler(dataset, SamplerConfig("few_to_many", 1, 1, targets), seed)
            objective = PivotObjective(pivot, host, sampler, None if tower is not None else embed_fn,
                                       _face_mask_fn(face_analysis), text, class_token, seed=seed, eta=eta,
                                       clip_size=getattr(clip_vision, "image_size", 224), vision=tower,
                                       unconditional=uncond, text_dropout=condition_dropout,
                                       id_dropout=condition_dropout)
            trainer = Trainer(objective, TrainConfig(steps=steps, batch=batch, lr=lr, seed=seed, save_every=save_every),
                              run_checkpoint(run_name, "pivot"))
            run_training(trainer, resume)
            if tower is not None:
                pivot.vision_state = trained_vision_state(tower)
        plot = loss_plot(trainer.losses, f"Pivot ID encoder (L_diff + {eta:g} L_loc) - {run_name}")
        return io.NodeOutput(pivot.eval(), plot)


class ApplyPivot(OmniNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityApplyPivot",
            display_name="Apply Pivot ID (OmniIdentity)",
            category=f"{CATEGORY}/guidance",
            description=("OmniPortrait's identity pivot: replaces the class word of a conditioning by e_mix, fused "
                         "from its text embedding and the reference face's CLIP image embedding by a trained pivot "
                         "encoder. A pivot file that carries a trained visual encoder (format 2) embeds the reference "
                         "with it: its tensors go into a copy of the connected CLIP vision model. RB-Guidance then "
                         "finds the pivot token by itself (it is marked in the conditioning)."),
            inputs=[
                io.Conditioning.Input("conditioning", tooltip="The prompt's conditioning, with the class word in it."),
                io.Combo.Input("pivot_name", options=model_files("omni_identity"),
                               tooltip="A pivot encoder file in models/omni_identity."),
                io.ClipVision.Input("clip_vision", tooltip="The CLIP vision model the pivot encoder was trained with."),
                io.Image.Input("reference", tooltip="A face crop of the person (e.g. from Face Crop)."),
                io.Int.Input("class_token", default=5, min=1, max=76,
                             tooltip="Position of the class word in the prompt's tokens."),
            ],
            outputs=[io.Conditioning.Output(display_name="conditioning", tooltip="The conditioning with e_mix in the class word's place.")],
        )

    validate_inputs = queued("pivot_name")

    @classmethod
    def execute(cls, conditioning, pivot_name: str, clip_vision, reference, class_token: int) -> io.NodeOutput:
        pivot = load_pivot(model_path("omni_identity", pivot_name))
        image = pivot_image_embeds(pivot, clip_vision, reference[:1])      # its trained visual encoder, if any
        if image is None:
            image = ClipVision(clip_vision).image_embeds(reference[:1])
        if image.shape[-1] != pivot.config.image_dim:
            raise ValueError(f"the CLIP vision model gives {image.shape[-1]}-d embeddings; {pivot_name} was trained "
                             f"on {pivot.config.image_dim}-d ones")
        out = []
        with torch.inference_mode(False):
            for tensor, extra in conditioning:
                mixed = pivot.apply(tensor.float().cpu().clone(), class_token, image).to(tensor)
                out.append([mixed, {**extra, SUBJECT_TOKEN_KEY: class_token}])
        return io.NodeOutput(out)


NODES = [TrainPivotEncoder, ApplyPivot]
