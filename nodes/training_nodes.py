"""Training nodes: datasets, the two Omni-ID training stages, and saving what they made.

A headless training graph: Dataset (or Build Dataset) -> Train Encoder (MTD) -> Train
Flow Matching -> Save Encoder / Save Adapter. Training runs inside the node with a
progress bar; Cancel stops it after the current step and leaves a checkpoint in
output/omni_identity_training/ that the same node resumes from. Saved files go to
models/omni_identity and models/ipadapter, where the loaders list them.
"""
from __future__ import annotations

import json
import os
import re

import comfy.model_management as mm
import comfy.utils
import folder_paths
import torch
from comfy_api.latest import io, ui

from ..encoders.checkpoint import save_encoder
from ..encoders.omni_id import EncoderConfig, create_encoder
from ..encoders.pivot import PivotConfig, PivotIDEncoder, load_pivot, save_pivot
from ..guidance.adapter import AdapterConfig, create_adapter, save_adapter
from ..training.build_dataset import BuildSettings, build_dataset
from ..training.dataset import FewToManySampler, IdentityDataset, SamplerConfig
from ..training.flow_matching import FM_MODES, FlowMatchingObjective
from ..training.mtd import MTDConfig
from ..training.pivot import ETA, PivotObjective
from ..training.report import loss_plot
from ..training.run import mtd_trainer
from ..training.trainer import PRECISIONS, TrainConfig, Trainer, TrainingCancelled
from .common import (CATEGORY, LOG, IdentityAdapterType, OmniIdEncoderType, check_combos, check_face_analysis,
                     progress)
from .encoder_nodes import LoadedEncoder
from .hosts import host_layers, is_flux
from .model_folders import model_files
from .training_host import ComfyDenoiserHost

IdentityDatasetType = io.Custom("IDENTITY_DATASET")
NO_DATASETS = "(no dataset folders in input/ or output/)"
DATASETS_SUBFOLDER = "omni_identity_datasets"
RUNS_SUBFOLDER = "omni_identity_training"
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


def _dataset_folders() -> dict[str, str]:
    """'input/<name>' and 'output/omni_identity_datasets/<name>' -> path, for folders of identity folders."""
    found = {}
    roots = (("input", folder_paths.get_input_directory()),
             (f"output/{DATASETS_SUBFOLDER}", os.path.join(folder_paths.get_output_directory(), DATASETS_SUBFOLDER)))
    for label, root in roots:
        if not os.path.isdir(root):
            continue
        for name in sorted(os.listdir(root)):
            path = os.path.join(root, name)
            if os.path.isdir(path) and any(os.path.isdir(os.path.join(path, sub)) for sub in os.listdir(path)):
                found[f"{label}/{name}"] = path
    return found


def _safe_name(name: str, what: str) -> str:
    cleaned = name.strip().strip("/")
    if not cleaned or ".." in cleaned.split("/") or not re.fullmatch(r"[A-Za-z0-9_./ -]+", cleaned):
        raise ValueError(f"{what} {name!r}: use letters, digits, '_', '-', '.', '/' (no '..')")
    return cleaned


def _trainable_copy(module_factory, state: dict):
    """A float32 copy made outside inference mode, so it can be trained."""
    with torch.inference_mode(False):
        module = module_factory()
        module.load_state_dict({k: v.detach().float().clone() for k, v in state.items()})
        return module.float().train()


def _run_in_node(trainer: Trainer, resume: bool) -> None:
    """Resume if asked, train with a progress bar; Cancel saves a checkpoint, then stops the prompt."""
    if resume:
        trainer.resume()
    steps = trainer.config.steps
    bar = comfy.utils.ProgressBar(steps)
    try:
        trainer.run(on_step=lambda step, loss: bar.update_absolute(step, steps),
                    should_stop=mm.processing_interrupted)
    except TrainingCancelled:
        mm.throw_exception_if_processing_interrupted()
        raise


def _clip_token_fn(clip_vision):
    def tokens(images):               # (B, 3, 224, 224) in [0, 1]; CLIP is frozen
        with torch.no_grad():
            out = clip_vision.encode_image(images.permute(0, 2, 3, 1), crop=False)["penultimate_hidden_states"]
        return out.float().cpu()
    return tokens


class Dataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        options = list(_dataset_folders()) or [NO_DATASETS]
        return io.Schema(
            node_id="OmniIdentityDataset",
            display_name="Identity Dataset (OmniIdentity)",
            category=f"{CATEGORY}/training",
            description=("A training dataset: a folder with one sub-folder of photos per person (8 each in the "
                         "paper, any number works), in ComfyUI's input/ folder or made by Build Dataset."),
            inputs=[io.Combo.Input("folder", options=options, tooltip="input/<name> or output/omni_identity_datasets/<name>."),
                    io.Int.Input("min_photos", default=2, min=1, max=64,
                                 tooltip="Identities with fewer photos are left out.")],
            outputs=[IdentityDatasetType.Output(display_name="dataset", tooltip="The identities found in the folder.")],
        )

    @classmethod
    def validate_inputs(cls, folder=None):
        if folder == NO_DATASETS:
            return ("no dataset folder: put a folder with one sub-folder of photos per person into ComfyUI's "
                    "input/ folder, or make one with 'Build Identity Dataset (OmniIdentity)'")
        if folder is not None and folder not in _dataset_folders():
            return f"dataset folder {folder!r} not found; choose one of {list(_dataset_folders())}"
        return True

    @classmethod
    def fingerprint_inputs(cls, folder, min_photos):
        path = _dataset_folders().get(folder, "")
        stamp = [(root, len(files)) for root, _, files in os.walk(path)] if path else []
        return json.dumps([folder, min_photos, stamp])

    @classmethod
    def execute(cls, folder: str, min_photos: int) -> io.NodeOutput:
        dataset = IdentityDataset(_dataset_folders()[folder], min_images=min_photos)
        return io.NodeOutput(dataset, ui=ui.PreviewText(dataset.describe()))


class BuildDataset(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityBuildDataset",
            display_name="Build Identity Dataset (OmniIdentity)",
            category=f"{CATEGORY}/training",
            description=("Omni-ID's dataset pipeline (Fig. II) over photos or video frames: detect faces, split "
                         "identities by descriptor similarity, drop the lowest-quality 20%, cluster head poses into "
                         "16, take 8 faces from distinct clusters more than 15 degrees apart, and write the aligned "
                         "crops to output/omni_identity_datasets/<name>/<identity>/."),
            inputs=[
                io.Image.Input("images", tooltip="Photos or video frames (a batch), of one or several people."),
                io.FaceAnalysis.Input("face_analysis", tooltip="From Face Analysis Loader (OmniIdentity)."),
                io.String.Input("name", default="my_dataset", tooltip="Dataset folder name."),
                io.Int.Input("photos_per_identity", default=8, min=1, max=64,
                             tooltip="Faces kept per person (8 in the paper); people with fewer are left out."),
                io.Int.Input("pose_clusters", default=16, min=1, max=64, tooltip="k of the k-means over head poses."),
                io.Float.Input("min_pose_difference", default=15.0, min=0.0, max=90.0, step=0.5,
                               tooltip="Degrees of head pose (yaw, pitch) between any two chosen faces."),
                io.Float.Input("drop_fraction", default=0.2, min=0.0, max=0.9, step=0.05,
                               tooltip="Share of each identity's faces dropped as the lowest quality."),
                io.Float.Input("similarity_threshold", default=-1.0, min=-1.0, max=1.0, step=0.01,
                               tooltip="Same-person threshold on descriptor similarity; -1 uses the backend's "
                                       "(dlib 0.4, ArcFace 0.35)."),
                io.Int.Input("crop_size", default=448, min=64, max=2048, step=8,
                             tooltip="Side of the aligned crops written (448 for the MTD stage)."),
            ],
            outputs=[IdentityDatasetType.Output(display_name="dataset", tooltip="The dataset just written."),
                     io.String.Output(display_name="report", tooltip="What was kept and left out, as JSON.")],
        )

    @classmethod
    def execute(cls, images, face_analysis, name: str, photos_per_identity: int, pose_clusters: int,
                min_pose_difference: float, drop_fraction: float, similarity_threshold: float,
                crop_size: int) -> io.NodeOutput:
        check_face_analysis(face_analysis)
        name = _safe_name(name, "dataset name")
        out = os.path.join(folder_paths.get_output_directory(), DATASETS_SUBFOLDER, name)
        if os.path.isdir(out) and os.listdir(out):
            raise FileExistsError(f"output/{DATASETS_SUBFOLDER}/{name} already holds a dataset; choose another name "
                                  "(nothing is overwritten)")
        settings = BuildSettings(photos_per_identity, pose_clusters, min_pose_difference, drop_fraction,
                                 None if similarity_threshold < 0 else similarity_threshold, crop_size)
        report = build_dataset(images, face_analysis, out, settings, on_image=progress(len(images)))
        text = json.dumps(report.to_dict())
        if not report.identities:
            raise ValueError(f"no identity had {photos_per_identity} faces with distinct poses; lower "
                             f"photos_per_identity or min_pose_difference, or add photos. Report: {text}")
        return io.NodeOutput(IdentityDataset(out, min_images=1), text, ui=ui.PreviewText(text))


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


def _run_path(run_name: str, stage: str) -> str:
    name = _safe_name(run_name, "run_name")
    return os.path.join(folder_paths.get_output_directory(), RUNS_SUBFOLDER, f"{name}.{stage}.pt")


def _train_config(steps, lr, batch, grad_accum, precision, seed, save_every) -> TrainConfig:
    return TrainConfig(steps=steps, batch=batch, grad_accum=grad_accum, lr=lr, precision=precision, seed=seed,
                       save_every=save_every)


class TrainEncoderMTD(io.ComfyNode):
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
            ],
            outputs=[OmniIdEncoderType.Output(display_name="encoder", tooltip="The trained encoder (save it with Save Encoder)."),
                     io.Image.Output(display_name="loss_plot", tooltip="Loss per step and its running mean.")],
        )

    @classmethod
    def validate_inputs(cls, encoder_size=None, decoder_size=None, precision=None, sampler=None):
        return check_combos(cls, encoder_size=encoder_size, decoder_size=decoder_size, precision=precision,
                            sampler=sampler)

    @classmethod
    def execute(cls, dataset, clip_vision, encoder_size: str, decoder_size: str, image_size: int, mask_ratio: float,
                sampler: str, steps: int, lr: float, batch: int, grad_accum: int, inputs_min: int, inputs_max: int,
                targets: int, precision: str, seed: int, run_name: str, resume: bool, save_every: int,
                encoder=None) -> io.NodeOutput:
        token_fn = _clip_token_fn(clip_vision)
        with torch.inference_mode(False), torch.enable_grad():
            probe = token_fn(torch.zeros(1, 3, 224, 224))
            if encoder is not None:
                config = encoder.config
                model = _trainable_copy(lambda: create_encoder(config), encoder.model.state_dict())
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
                                  checkpoint_path=_run_path(run_name, "mtd"))
            _run_in_node(trainer, resume)
        LOG.info("MTD training: %d steps, last loss %.5f", trainer.step, trainer.losses[-1])
        plot = loss_plot(trainer.losses, f"Omni-ID MTD (L1, {mask_ratio:.0%} masked) - {run_name}")
        return io.NodeOutput(LoadedEncoder(model.eval(), f"{run_name} (trained)"), plot)


class TrainFlowMatching(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityTrainFlowMatching",
            display_name="Train Flow Matching (OmniIdentity)",
            category=f"{CATEGORY}/training",
            description=("Omni-ID stage 2: the identity adapter on a frozen base model. The encoder and the adapter's "
                         "per-layer K/V projections train with the model's own denoising loss (flow matching on "
                         "FLUX, epsilon on SD1.5/SDXL), few inputs to all targets. 'identity_enhanced' is "
                         "Infinite-ID's identity-enhanced training: text cross-attention off (UNet models)."),
            inputs=[
                io.Model.Input("model", tooltip="The frozen base model (SD1.5, SDXL or FLUX)."),
                io.Vae.Input("vae", tooltip="The base model's VAE (targets are encoded once)."),
                io.ClipVision.Input("clip_vision", tooltip="CLIP-H, as for Encode."),
                OmniIdEncoderType.Input("encoder", tooltip="The omni_id encoder to train (e.g. from the MTD stage)."),
                IdentityDatasetType.Input("dataset", tooltip="From Identity Dataset or Build Identity Dataset."),
                io.Conditioning.Input("positive", tooltip="Text conditioning for the targets, e.g. 'a photo of a person'."),
                IdentityAdapterType.Input("adapter", optional=True,
                                          tooltip="This pack's adapter to continue from; without it a new one starts."),
                io.Combo.Input("mode", options=list(FM_MODES), default="omni_id",
                               tooltip="omni_id: text + identity attention; identity_enhanced: text cross-attention off."),
                io.Int.Input("image_size", default=512, min=64, max=2048, step=64, tooltip="Target resolution."),
                *_common_training_inputs(1000),
            ],
            outputs=[OmniIdEncoderType.Output(display_name="encoder", tooltip="The encoder after stage 2."),
                     IdentityAdapterType.Output(display_name="adapter", tooltip="The trained adapter (Save Adapter)."),
                     io.Image.Output(display_name="loss_plot", tooltip="Loss per step and its running mean.")],
        )

    @classmethod
    def validate_inputs(cls, mode=None, precision=None):
        return check_combos(cls, mode=mode, precision=precision)

    @classmethod
    def execute(cls, model, vae, clip_vision, encoder, dataset, positive, mode: str, image_size: int, steps: int,
                lr: float, batch: int, grad_accum: int, inputs_min: int, inputs_max: int, targets: int,
                precision: str, seed: int, run_name: str, resume: bool, save_every: int,
                adapter=None) -> io.NodeOutput:
        host = ComfyDenoiserHost(model, vae, positive, image_size)
        layers = host_layers(model)
        with torch.inference_mode(False), torch.enable_grad():
            trained_encoder = _trainable_copy(lambda: create_encoder(encoder.config), encoder.model.state_dict())
            if adapter is not None:
                trained_adapter = _trainable_copy(lambda: create_adapter(adapter.config), adapter.state_dict())
            else:
                config = AdapterConfig(family="flux" if is_flux(model) else "unet", token_dim=encoder.config.dim,
                                       layer_dims=tuple(layer.inner_dim for layer in layers))
                trained_adapter = create_adapter(config, seed=seed)
            host.check_adapter(trained_adapter)
            sampler = FewToManySampler(dataset, SamplerConfig("few_to_many", inputs_min, inputs_max, targets), seed)
            objective = FlowMatchingObjective(trained_encoder, trained_adapter, host, sampler,
                                              _clip_token_fn(clip_vision), seed=seed, mode=mode)
            trainer = Trainer(objective, _train_config(steps, lr, batch, grad_accum, precision, seed, save_every),
                              _run_path(run_name, "flow"))
            _run_in_node(trainer, resume)
        trained_adapter.name = f"{run_name} (trained)"
        plot = loss_plot(trainer.losses, f"Flow matching ({mode}) - {run_name}")
        return io.NodeOutput(LoadedEncoder(trained_encoder.eval(), f"{run_name} (trained)"), trained_adapter.eval(),
                             plot)


def _next_free(folder: str, prefix: str) -> str:
    prefix = _safe_name(prefix, "filename_prefix")
    base = os.path.join(folder, prefix)
    os.makedirs(os.path.dirname(base), exist_ok=True)
    counter = 1
    while os.path.exists(f"{base}_{counter:05d}.safetensors"):
        counter += 1
    return f"{base}_{counter:05d}.safetensors"


def _save_into(folder_name: str, filename_prefix: str, write) -> io.NodeOutput:
    """Write a file under models/<folder_name>/<prefix>_NNNNN.safetensors; output its name for the loaders."""
    folder = folder_paths.get_folder_paths(folder_name)[0]
    path = _next_free(folder, filename_prefix)
    write(path)
    name = os.path.relpath(path, folder).replace(os.sep, "/")
    return io.NodeOutput(name, ui=ui.PreviewText(f"saved models/{folder_name}/{name}"))


class SaveEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentitySaveEncoder",
            display_name="Save Encoder (OmniIdentity)",
            category=f"{CATEGORY}/training",
            description="Writes an encoder to models/omni_identity/<prefix>_NNNNN.safetensors (config in the "
                        "metadata), where Identity Encoder Loader lists it.",
            inputs=[OmniIdEncoderType.Input("encoder", tooltip="A trained encoder."),
                    io.String.Input("filename_prefix", default="trained/omni_id",
                                    tooltip="Path under models/omni_identity; a counter is added.")],
            outputs=[io.String.Output(display_name="encoder_name", tooltip="The name the loader lists it under.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, encoder, filename_prefix: str) -> io.NodeOutput:
        return _save_into("omni_identity", filename_prefix, lambda path: save_encoder(
            encoder.model.float(), path, extra={"saved_by": "OmniIdentitySaveEncoder"}))


class SaveAdapter(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentitySaveAdapter",
            display_name="Save Adapter (OmniIdentity)",
            category=f"{CATEGORY}/training",
            description="Writes an identity adapter to models/ipadapter/<prefix>_NNNNN.safetensors, where Identity "
                        "Adapter Loader lists it.",
            inputs=[IdentityAdapterType.Input("adapter", tooltip="A trained adapter."),
                    io.String.Input("filename_prefix", default="trained/omni_id_adapter",
                                    tooltip="Path under models/ipadapter; a counter is added.")],
            outputs=[io.String.Output(display_name="adapter_name", tooltip="The name the loader lists it under.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, adapter, filename_prefix: str) -> io.NodeOutput:
        return _save_into("ipadapter", filename_prefix, lambda path: save_adapter(
            adapter.float(), path, extra={"saved_by": "OmniIdentitySaveAdapter"}))


PivotEncoderType = io.Custom("PIVOT_ENCODER")


def _image_embed_fn(clip_vision):
    def embed(images):                # (B, 3, 224, 224) -> (B, D) projected image embeddings, frozen
        with torch.no_grad():
            out = clip_vision.encode_image(images.permute(0, 2, 3, 1), crop=False)["image_embeds"]
        return out.float().cpu()
    return embed


def _face_mask_fn(face_analysis):
    from .rb_guidance_nodes import reference_face_mask
    warned = []

    def mask(image):                  # (3, H, W) -> (H, W)
        try:
            return reference_face_mask(image.permute(1, 2, 0)[None], face_analysis)[0]
        except ValueError:
            if not warned:
                LOG.warning("TrainPivotEncoder: a target without a detectable face gets no localisation target")
                warned.append(True)
            return torch.ones(image.shape[1:])
    return mask


class TrainPivotEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityTrainPivotEncoder",
            display_name="Train Pivot ID Encoder (OmniIdentity)",
            category=f"{CATEGORY}/training",
            description=("OmniPortrait's pivot encoder on a frozen UNet (stage 2's pivot mode): the reference face's "
                         "CLIP image embedding and the class word's text embedding are fused into e_mix, which "
                         "replaces the class word; loss = the model's denoising loss + eta x the face-localisation "
                         "loss (e_mix's cross-attention map against the target's face mask, eta = 2e-3). One photo of "
                         "each person is the reference, the others are targets."),
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
            ],
            outputs=[PivotEncoderType.Output(display_name="pivot_encoder", tooltip="The trained pivot encoder."),
                     io.Image.Output(display_name="loss_plot", tooltip="Loss per step and its running mean.")],
        )

    @classmethod
    def execute(cls, model, vae, clip_vision, dataset, face_analysis, positive, class_token: int, eta: float,
                image_size: int, steps: int, lr: float, batch: int, targets: int, seed: int, run_name: str,
                resume: bool, save_every: int, pivot_encoder=None) -> io.NodeOutput:
        if is_flux(model):
            raise ValueError("the pivot encoder replaces a word of a CLIP text conditioning: use an SD1.5 or SDXL model")
        host = ComfyDenoiserHost(model, vae, positive, image_size)
        text = positive[0][0]
        embed_fn = _image_embed_fn(clip_vision)
        with torch.inference_mode(False), torch.enable_grad():
            image_dim = embed_fn(torch.zeros(1, 3, 224, 224)).shape[-1]
            config = PivotConfig(image_dim=image_dim, text_dim=text.shape[-1])
            if pivot_encoder is not None:
                if pivot_encoder.config != config:
                    raise ValueError(f"the pivot encoder ({pivot_encoder.config}) does not fit this CLIP and model "
                                     f"({config})")
                pivot = _trainable_copy(lambda: PivotIDEncoder(config), pivot_encoder.state_dict())
            else:
                torch.manual_seed(seed)
                pivot = PivotIDEncoder(config)
            sampler = FewToManySampler(dataset, SamplerConfig("few_to_many", 1, 1, targets), seed)
            objective = PivotObjective(pivot, host, sampler, embed_fn, _face_mask_fn(face_analysis), text,
                                       class_token, seed=seed, eta=eta)
            trainer = Trainer(objective, TrainConfig(steps=steps, batch=batch, lr=lr, seed=seed, save_every=save_every),
                              _run_path(run_name, "pivot"))
            _run_in_node(trainer, resume)
        plot = loss_plot(trainer.losses, f"Pivot ID encoder (L_diff + {eta:g} L_loc) - {run_name}")
        return io.NodeOutput(pivot.eval(), plot)


class SavePivotEncoder(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentitySavePivotEncoder",
            display_name="Save Pivot Encoder (OmniIdentity)",
            category=f"{CATEGORY}/training",
            description="Writes a pivot encoder to models/omni_identity/<prefix>_NNNNN.safetensors for Apply Pivot.",
            inputs=[PivotEncoderType.Input("pivot_encoder", tooltip="A trained pivot encoder."),
                    io.String.Input("filename_prefix", default="trained/pivot",
                                    tooltip="Path under models/omni_identity; a counter is added.")],
            outputs=[io.String.Output(display_name="pivot_name", tooltip="The name Apply Pivot ID lists it under.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, pivot_encoder, filename_prefix: str) -> io.NodeOutput:
        return _save_into("omni_identity", filename_prefix, lambda path: save_pivot(pivot_encoder, path))


class ApplyPivot(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="OmniIdentityApplyPivot",
            display_name="Apply Pivot ID (OmniIdentity)",
            category=f"{CATEGORY}/guidance",
            description=("OmniPortrait's identity pivot: replaces the class word of a conditioning by e_mix, fused "
                         "from its text embedding and the reference face's CLIP image embedding by a trained pivot "
                         "encoder. Feed the result to RB-Guidance with subject_token = class_token."),
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
    def validate_inputs(cls, pivot_name=None):
        return check_combos(cls, pivot_name=pivot_name)

    @classmethod
    def execute(cls, conditioning, pivot_name: str, clip_vision, reference, class_token: int) -> io.NodeOutput:
        pivot = load_pivot(folder_paths.get_full_path_or_raise("omni_identity", pivot_name))
        image = clip_vision.encode_image(reference[:1, ..., :3], crop=True)["image_embeds"].float().cpu()
        if image.shape[-1] != pivot.config.image_dim:
            raise ValueError(f"the CLIP vision model gives {image.shape[-1]}-d embeddings; {pivot_name} was trained "
                             f"on {pivot.config.image_dim}-d ones")
        out = []
        with torch.inference_mode(False):
            for tensor, extra in conditioning:
                mixed = pivot.apply(tensor.float().cpu().clone(), class_token, image).to(tensor)
                out.append([mixed, dict(extra)])
        return io.NodeOutput(out)


NODES = [Dataset, BuildDataset, TrainEncoderMTD, TrainFlowMatching, SaveEncoder, SaveAdapter, TrainPivotEncoder,
         SavePivotEncoder, ApplyPivot]
