"""``python -m omniid train --stage flow``: stage 2 on a diffusers base model, single process or torchrun.

    python -m omniid train --stage flow --model FLUX.1-dev/ --data DIR --clip open_clip:ViT-H-14:CLIP.bin \\
        --encoder encoder.safetensors --out adapter.safetensors --precision bf16 --gradient-checkpointing
    torchrun --nproc_per_node 8 -m omniid train --stage flow ... [--parallel fsdp]

Writes the adapter (``--out``) and the encoder (``--encoder-out``) in the files
OmniIdentityAdapterLoader and OmniIdentityEncoderLoader read.
"""
from __future__ import annotations

import json
import os
import sys


def default_encoder_out(out: str) -> str:
    stem, ext = os.path.splitext(out)
    return f"{stem}_encoder{ext or '.safetensors'}"


def cmd_train_flow(args, token_source, training_device) -> int:
    """``token_source`` and ``training_device`` are stage 1's (cli/train.py), handed over by its cmd_train."""
    import torch
    import torch.distributed as dist

    from ..diffusers_host.models import load_base
    from ..diffusers_host.train import flow_trainer
    from ..encoders.checkpoint import load_encoder, save_encoder
    from ..encoders.omni_id import EncoderConfig, create_encoder
    from ..guidance.adapter import save_adapter
    from ..training.dataset import IdentityDataset, SamplerConfig
    from ..training.trainer import TrainConfig

    if not args.model:
        raise SystemExit("error: --stage flow needs --model (a diffusers folder or single file)")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    backend, device = training_device()
    if world > 1:
        dist.init_process_group(backend)
    rank = dist.get_rank() if dist.is_initialized() else 0
    try:
        low, _, high = args.inputs.partition("-")
        sampler = SamplerConfig(args.sampler, int(low), int(high or low), args.targets)
        train = TrainConfig(steps=args.steps, batch=args.batch, grad_accum=args.grad_accum, lr=args.lr,
                            precision=args.precision, seed=args.seed, save_every=args.save_every)
        dataset = IdentityDataset(args.data)
        if rank == 0:
            print(dataset.describe(), file=sys.stderr)
        if args.encoder:
            encoder = load_encoder(args.encoder)
        else:
            encoder = create_encoder(EncoderConfig(**json.loads(args.encoder_config)), seed=args.seed)
        tokens = token_source(args.clip, device, args.seed)
        if tokens.width != encoder.config.clip_dim:
            raise SystemExit(f"error: {args.clip} gives {tokens.width}-wide tokens; the encoder reads clip_dim="
                             f"{encoder.config.clip_dim}")
        dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
        base = load_base(args.model, dtype=dtype, config=args.model_config, vae=args.vae, text_embeds=args.text_embeds)
        trainer = flow_trainer(base, encoder, tokens, dataset, train, sampler, args.image_size,
                               checkpoint_path=args.checkpoint, device=device, parallel=args.parallel,
                               gradient_checkpointing=args.gradient_checkpointing, mode=args.mode,
                               guidance=args.guidance)

        from ..diffusers_host.train import base_parameters
        total, local = base_parameters(base.model)
        print(f"rank {rank}: {args.parallel}, frozen base {total} parameters, {local} held here"
              f"{', gradient checkpointing' if args.gradient_checkpointing else ''}", file=sys.stderr, flush=True)

        def report(step, loss):
            if rank == 0:
                print(f"step {step}/{args.steps} loss {loss:.5f}", file=sys.stderr, flush=True)

        trainer.resume()
        trainer.run(on_step=report)
        if rank == 0:
            module = trainer.objective.module
            info = {"trained": {"stage": "flow", "steps": trainer.step, "final_loss": trainer.losses[-1],
                                "base": os.path.basename(os.path.normpath(args.model)), "mode": args.mode}}
            save_adapter(module.adapter.cpu().eval(), args.out, extra=info)
            encoder_out = args.encoder_out or default_encoder_out(args.out)
            save_encoder(module.encoder.cpu().eval(), encoder_out, extra=info)
            print(args.out)
            print(encoder_out)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0
