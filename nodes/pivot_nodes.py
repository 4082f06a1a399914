"""OmniPortrait's Pivot ID Encoder: train it on a frozen UNet, apply it to a conditioning."""
from __future__ import annotations

from comfy_api.latest import io

from ..comfy_host.folders import model_files, model_path
from ..comfy_host.pivot_vision import apply_pivot
from ..comfy_host.training_runs import train_pivot_encoder
from ..encoders.pivot import ALL_BLOCKS, load_pivot
from ..training.pivot import CONDITION_DROPOUT, ETA
from .common import CATEGORY, IdentityDatasetType, OmniNode, PivotEncoderType
from .training_nodes import recipe_input


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

    @classmethod
    def execute(cls, **inputs) -> io.NodeOutput:
        return io.NodeOutput(*train_pivot_encoder(**cls.checked_inputs(inputs)))


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

    @classmethod
    def execute(cls, conditioning, pivot_name: str, clip_vision, reference, class_token: int) -> io.NodeOutput:
        reference = cls.checked(reference=reference)
        pivot = load_pivot(model_path("omni_identity", pivot_name))
        return io.NodeOutput(apply_pivot(conditioning, pivot, pivot_name, clip_vision, reference, class_token))


NODES = [TrainPivotEncoder, ApplyPivot]
