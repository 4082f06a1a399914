"""``python -m omniid train``: stage-1 (MTD) training outside ComfyUI, single process or torchrun.

    python -m omniid train --data DIR --clip open_clip:ViT-H-14:CLIP.bin --out encoder.safetensors
    torchrun --nproc_per_node 8 -m omniid train ...   (DDP; the global batch is batch x accum x processes)
    python -m omniid train --recipe paper ...         (Omni-ID's MTD recipe: global batch 256, 250K steps,
                                                       448 px, lr 1e-4; flags given explicitly still win)

The encoder file it writes is what OmniIdentityEncoderLoader reads. ``--clip`` names an
open_clip model, or an open_clip model config file (``open_clip:my_vit.json``), and
optionally a local checkpoint; without one the CLIP has random weights (for smoke runs).
On GPUs each process uses the GPU of its LOCAL_RANK and the processes talk over NCCL; on
CPUs over gloo.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


DEFAULTS = {"steps": 1000, "batch": 8, "grad_accum": 1, "lr": 1e-4, "image_size": 448}


def run_settings(args, decoder_config: dict, world: int):
    """(Settings, the line printed at start) from --recipe and the flags given explicitly."""
    from ..training.recipes import Settings, resolve
    given = {k: getattr(args, k) for k in ("steps", "batch", "grad_accum", "lr", "image_size")}
    if given["image_size"] is None and "image_size" in decoder_config:
        given["image_size"] = decoder_config["image_size"]
    explicit = frozenset(k for k, v in given.items() if v is not None)
    settings = Settings(**{k: DEFAULTS[k] if v is None else v for k, v in given.items()})
    return resolve("mtd", args.recipe, settings, explicit, world)


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train the Omni-ID encoder with the masked transformer decoder (stage 1)")
    p.add_argument("--data", required=True, help="dataset folder: one sub-folder of photos per identity")
    p.add_argument("--clip", required=True,
                   help="the frozen feature extractor: open_clip:MODEL[:CHECKPOINT] (ViT-H-14 in the paper); MODEL "
                        "is an open_clip model name or a model config .json")
    p.add_argument("--out", required=True, help="encoder .safetensors written at the end")
    p.add_argument("--checkpoint", help="training checkpoint (resumed when it exists)")
    p.add_argument("--encoder-config", default="{}", help="JSON overrides of the encoder config")
    p.add_argument("--decoder-config", default="{}", help="JSON overrides of the MTD config")
    p.add_argument("--recipe", choices=("custom", "quick", "paper"), default="custom",
                   help="paper: the paper's settings for the --stage (mtd: global batch 256 = batch x grad-accum x "
                        "processes, 250K steps, 448 px, lr 1e-4; flow: 32, 5K steps (75K for an arcface encoder), "
                        "512 px, 1e-4; pivot: 80K steps at 512 px (SD) or 60K at 1024 px (SDXL), lr 2e-5, batch as "
                        "given); quick: a short single-machine run; custom: the flags below. Flags given explicitly "
                        "always win over the recipe. The settings used are printed at start.")
    p.add_argument("--steps", type=int, default=None, help=f"optimizer updates (default {DEFAULTS['steps']})")
    p.add_argument("--batch", type=int, default=None,
                   help=f"identities per process per micro-batch (default {DEFAULTS['batch']})")
    p.add_argument("--grad-accum", type=int, default=None, help=f"(default {DEFAULTS['grad_accum']})")
    p.add_argument("--lr", type=float, default=None, help=f"(default {DEFAULTS['lr']:g})")
    p.add_argument("--image-size", type=int, default=None,
                   help=f"MTD target resolution (default {DEFAULTS['image_size']}, or the decoder config's)")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--save-every", type=int, default=100)
    p.add_argument("--sampler", choices=("few_to_many", "eight_to_eight", "one_to_one"), default="few_to_many")
    p.add_argument("--inputs", default="1-3", help="range of input photos per identity, e.g. 1-3")
    p.add_argument("--targets", type=int, default=8)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    add_stage_arguments(p)


def add_stage_arguments(p) -> None:
    """``--stage`` and the arguments of stage 2 (flow matching on a diffusers base model)."""
    p.add_argument("--stage", choices=("mtd", "flow", "pivot"), default="mtd",
                   help="mtd: stage 1 (the encoder with the masked transformer decoder); flow: stage 2 (encoder + "
                        "adapter on a frozen diffusers model; --out is then the adapter file); pivot: OmniPortrait's pivot "
                        "encoder on a frozen diffusers SD1.5/SDXL UNet (--out is the pivot encoder file)")
    p.add_argument("--model", help="flow: the frozen base model, a diffusers folder (unet/ or transformer/ and vae/) "
                                   "or a single .safetensors file (with --model-config)")
    p.add_argument("--model-config", help="flow: the diffusers config folder of a single-file model")
    p.add_argument("--vae", help="flow: VAE folder or file (default: the model folder's vae/)")
    p.add_argument("--text-embeds", help="flow: prompt conditioning .safetensors (default: the model folder's "
                                         "text_embeds.safetensors, else zeros)")
    p.add_argument("--encoder", help="flow: start from this encoder file (stage 1's output); default a new encoder")
    p.add_argument("--encoder-out", help="flow: where the trained encoder goes (default: OUT with _encoder)")
    try:                           # stage 1 may define it already (its target resolution)
        p.add_argument("--image-size", type=int, default=None, help="training image size in pixels (flow, pivot: "
                                                                  "default 512)")
    except argparse.ArgumentError:
        pass
    p.add_argument("--mode", choices=("omni_id", "identity_enhanced"), default="omni_id",
                   help="flow: omni_id (text + identity) or identity_enhanced (Infinite-ID, UNets only)")
    p.add_argument("--parallel", choices=("ddp", "fsdp"), default="ddp",
                   help="flow: ddp (every GPU holds the frozen base) or fsdp (the base sharded across the GPUs)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="flow: recompute the base's activations")
    p.add_argument("--guidance", type=float, default=1.0, help="flow: FLUX-dev's guidance input")
    p.add_argument("--class-token", type=int, help="pivot: the index of the class word in --text-embeds' prompt")
    p.add_argument("--face-mask", default="dlib", help="pivot: the targets' face masks from a face analyser (dlib, "
                   "insightface/<pack>), or 'ellipse' (a centred ellipse: aligned face crops only)")
    p.add_argument("--eta", type=float, default=2e-3, help="pivot: weight of the face-localisation loss")


def token_source(spec: str, device, seed: int):
    """The frozen CLIP; without a checkpoint its random weights come from ``seed`` (the same in every process)."""
    import torch
    if not spec.startswith("open_clip:"):
        raise SystemExit(f"error: --clip must be open_clip:MODEL[:CHECKPOINT], not {spec!r}")
    from ..encoders.clip_features import OpenCLIPTokens
    _, name, *checkpoint = spec.split(":", 2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return OpenCLIPTokens.load(name, checkpoint=checkpoint[0] if checkpoint else None, device=device)


def training_device():
    """(torch.distributed backend, device) for this process: NCCL and the LOCAL_RANK GPU, or gloo and the CPU."""
    import torch
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
        return "nccl", device
    return "gloo", torch.device("cpu")


def cmd_train(args) -> int:
    if getattr(args, "stage", "mtd") == "pivot":
        from .train_flow import cmd_train_pivot
        return cmd_train_pivot(args, token_source, training_device)
    if getattr(args, "stage", "mtd") == "flow":
        from .train_flow import cmd_train_flow
        return cmd_train_flow(args, token_source, training_device)
    import torch
    import torch.distributed as dist

    from ..encoders.checkpoint import save_encoder
    from ..encoders.omni_id import EncoderConfig, create_encoder
    from ..training.dataset import IdentityDataset, SamplerConfig
    from ..training.mtd import MTDConfig
    from ..training.run import train_mtd
    from ..training.trainer import TrainConfig

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend, device = training_device()
    if world > 1:
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        encoder_config = EncoderConfig(**json.loads(args.encoder_config))
        low, _, high = args.inputs.partition("-")
        sampler = SamplerConfig(args.sampler, int(low), int(high or low), args.targets)
        decoder_config = json.loads(args.decoder_config)
        run, line = run_settings(args, decoder_config, world)
        if rank == 0:
            print(line, file=sys.stderr, flush=True)
        train = TrainConfig(steps=run.steps, batch=run.batch, grad_accum=run.grad_accum, lr=run.lr,
                            precision=args.precision, seed=args.seed, save_every=args.save_every)
        mtd = MTDConfig(**{**decoder_config, "image_size": run.image_size})
        dataset = IdentityDataset(args.data)
        if rank == 0:
            print(dataset.describe(), file=sys.stderr)
        encoder = create_encoder(encoder_config, seed=args.seed)

        def report(step, loss):
            if rank == 0:
                print(f"step {step}/{run.steps} loss {loss:.5f}", file=sys.stderr, flush=True)

        tokens = token_source(args.clip, device, args.seed)
        if tokens.width != encoder_config.clip_dim:
            raise SystemExit(f"error: {args.clip} gives {tokens.width}-wide tokens; the encoder reads clip_dim="
                             f"{encoder_config.clip_dim} (set it with --encoder-config)")
        trainer = train_mtd(dataset, encoder, tokens, mtd, train, sampler, checkpoint_path=args.checkpoint,
                            on_step=report, device=device)
        trainer.release_parallel()
        if rank == 0:
            save_encoder(encoder.cpu(), args.out, extra={"trained": {"stage": "mtd", "steps": trainer.step,
                                                              "final_loss": trainer.losses[-1]}})
            print(args.out)
        if dist.is_initialized():
            dist.barrier()          # no rank leaves (closing its connections) while rank 0 still writes the file
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
