"""``python -m omniid train --stage flow|pivot``: stage 2 on a diffusers base model, single process or torchrun.

    python -m omniid train --stage flow --model FLUX.1-dev/ --data DIR --clip open_clip:ViT-H-14:CLIP.bin \\
        --encoder encoder.safetensors --out adapter.safetensors --precision bf16 --gradient-checkpointing
    torchrun --nproc_per_node 8 -m omniid train --stage flow ... [--parallel fsdp]
    python -m omniid train --stage pivot --model SDXL/ --text-embeds prompt.safetensors --class-token 5 \\
        --data DIR --clip open_clip:ViT-L-14:CLIP.bin --out pivot.safetensors

flow writes the adapter (``--out``) and the encoder (``--encoder-out``) in the files
OmniIdentityAdapterLoader and OmniIdentityEncoderLoader read; pivot writes the pivot encoder
OmniIdentityApplyPivot reads.
"""
from __future__ import annotations

import json
import os
import sys
from contextlib import contextmanager


def default_encoder_out(out: str) -> str:
    stem, ext = os.path.splitext(out)
    return f"{stem}_encoder{ext or '.safetensors'}"


@contextmanager
def distributed(training_device):
    """(rank, device) of this process, the process group set up under torchrun and torn down after."""
    import torch
    import torch.distributed as dist
    torch.use_deterministic_algorithms(True)
    backend, device = training_device()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend)
    try:
        yield (dist.get_rank() if dist.is_initialized() else 0), device
        if dist.is_initialized():
            dist.barrier()          # no rank leaves (closing its connections) while rank 0 still writes the files
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


STAGE2_DEFAULTS = {"steps": 1000, "batch": 8, "grad_accum": 1, "lr": 1e-4, "image_size": 512}


def stage2_settings(args, stage: str, world: int):
    """(Settings, the line printed at start): ``--recipe`` for ``stage`` (a row of training/recipes.py),
    the flags given explicitly winning, else stage 2's defaults."""
    from ..training.recipes import Settings, resolve
    given = {k: getattr(args, k, None) for k in STAGE2_DEFAULTS}
    explicit = frozenset(k for k, v in given.items() if v is not None)
    settings = Settings(**{k: STAGE2_DEFAULTS[k] if v is None else v for k, v in given.items()})
    try:
        return resolve(stage, getattr(args, "recipe", None) or "custom", settings, explicit, world)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from exc


def _common(args, rank, stage_of):
    """(TrainConfig, dataset, base); ``stage_of(base)`` names the recipe row of this run."""
    import torch
    from ..diffusers_host.models import load_base
    from ..training.dataset import IdentityDataset
    from ..training.trainer import TrainConfig
    if not args.model:
        raise SystemExit(f"error: --stage {args.stage} needs --model (a diffusers folder or single file)")
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    base = load_base(args.model, dtype=dtype, config=args.model_config, vae=args.vae, text_embeds=args.text_embeds)
    settings, line = stage2_settings(args, stage_of(base), int(os.environ.get("WORLD_SIZE", "1")))
    args.image_size = settings.image_size
    train = TrainConfig(steps=settings.steps, batch=settings.batch, grad_accum=settings.grad_accum,
                        lr=settings.lr, precision=args.precision, seed=args.seed, save_every=args.save_every)
    dataset = IdentityDataset(args.data)
    if rank == 0:
        print(line, file=sys.stderr)
        print(dataset.describe(), file=sys.stderr)
    return train, dataset, base


def text_dim_of(base) -> int:
    return base.text["encoder_hidden_states"].shape[-1] if "encoder_hidden_states" in base.text else 0


def _run(args, trainer, base, rank) -> None:
    from ..diffusers_host.train import base_parameters
    total, local = base_parameters(base.model)
    print(f"rank {rank}: {args.parallel}, frozen base {total} parameters, {local} held here"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}", file=sys.stderr, flush=True)

    def report(step, loss):
        if rank == 0:
            print(f"step {step}/{trainer.config.steps} loss {loss:.5f}", file=sys.stderr, flush=True)

    trainer.resume()
    trainer.run(on_step=report)
    trainer.release_parallel()


def cmd_train_flow(args, token_source, training_device) -> int:
    """``token_source`` and ``training_device`` are stage 1's (cli/train.py), handed over by its cmd_train."""
    from ..diffusers_host.train import flow_trainer
    from ..encoders.checkpoint import load_encoder, save_encoder
    from ..encoders.omni_id import EncoderConfig, create_encoder
    from ..guidance.adapter import save_adapter
    from ..training.dataset import SamplerConfig
    from ..training.recipes import flow_stage

    with distributed(training_device) as (rank, device):
        if args.encoder:
            encoder = load_encoder(args.encoder)
        else:
            encoder = create_encoder(EncoderConfig(**json.loads(args.encoder_config)), seed=args.seed)
        train, dataset, base = _common(args, rank, lambda base: flow_stage(encoder.config.architecture))
        low, _, high = args.inputs.partition("-")
        sampler = SamplerConfig(args.sampler, int(low), int(high or low), args.targets)
        tokens = token_source(args.clip, device, args.seed)
        if tokens.width != encoder.config.clip_dim:
            raise SystemExit(f"error: {args.clip} gives {tokens.width}-wide tokens; the encoder reads clip_dim="
                             f"{encoder.config.clip_dim}")
        trainer = flow_trainer(base, encoder, tokens, dataset, train, sampler, args.image_size,
                               checkpoint_path=args.checkpoint, device=device, parallel=args.parallel,
                               gradient_checkpointing=args.gradient_checkpointing, mode=args.mode,
                               guidance=args.guidance)
        _run(args, trainer, base, rank)
        if rank == 0:
            module = trainer.objective.module
            info = {"trained": {"stage": "flow", "steps": trainer.step, "final_loss": trainer.losses[-1],
                                "base": os.path.basename(os.path.normpath(args.model)), "mode": args.mode}}
            save_adapter(module.adapter.cpu().eval(), args.out, extra=info)
            encoder_out = args.encoder_out or default_encoder_out(args.out)
            save_encoder(module.encoder.cpu().eval(), encoder_out, extra=info)
            print(args.out)
            print(encoder_out)
    return 0


def face_mask_source(spec: str):
    """(H, W, 3) image -> (H, W) face mask: the largest face's landmark hull from an analyser, or an ellipse."""
    import torch
    if spec == "ellipse":
        def ellipse(image):
            ys, xs = torch.meshgrid(torch.linspace(-1, 1, image.shape[0]), torch.linspace(-1, 1, image.shape[1]),
                                    indexing="ij")
            return ((xs / 0.6) ** 2 + (ys / 0.8) ** 2 <= 1).float()
        return ellipse
    from ..encoders.face import NoFaceFoundError, create_analyzer
    from ..encoders.face.crop import largest_face_mask
    analyzer = create_analyzer(spec)

    def mask(image):
        try:
            return largest_face_mask(image, analyzer)
        except NoFaceFoundError:
            return torch.ones(image.shape[:2])          # no face: no localisation target
    return mask


def cmd_train_pivot(args, token_source, training_device) -> int:
    import torch
    from ..diffusers_host.train import pivot_trainer
    from ..encoders.clip_features import clip_preprocess
    from ..encoders.pivot import PivotConfig, PivotIDEncoder, load_pivot, save_pivot
    from ..training.recipes import pivot_stage

    if args.class_token is None:
        raise SystemExit("error: --stage pivot needs --class-token (the class word's index in --text-embeds)")
    with distributed(training_device) as (rank, device):
        train, dataset, base = _common(args, rank, lambda base: pivot_stage(text_dim_of(base)))
        clip = token_source(args.clip, device, args.seed)

        @torch.no_grad()
        def image_embeds(images):
            return clip.model.encode_image(clip_preprocess(images.to(clip.device), clip.size, clip.mean,
                                                           clip.std)).float().cpu()

        image_dim = image_embeds(torch.zeros(1, 224, 224, 3)).shape[-1]
        text_dim = text_dim_of(base)
        config = PivotConfig(image_dim=image_dim, text_dim=text_dim)
        if args.encoder:
            pivot = load_pivot(args.encoder)
            if pivot.config != config:
                raise SystemExit(f"error: the pivot encoder ({pivot.config}) does not fit this CLIP and prompt ({config})")
        else:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)
                pivot = PivotIDEncoder(config)
        trainer = pivot_trainer(base, pivot, image_embeds, face_mask_source(args.face_mask), dataset, train,
                                args.targets, args.class_token, args.image_size, checkpoint_path=args.checkpoint,
                                device=device, parallel=args.parallel,
                                gradient_checkpointing=args.gradient_checkpointing, eta=args.eta)
        _run(args, trainer, base, rank)
        if rank == 0:
            save_pivot(trainer.objective.module.cpu().eval(), args.out)
            print(args.out)
    return 0
