"""Stage 1 end to end: dataset + sampler + encoder + MTD -> trained encoder (CLI and node share it)."""
from __future__ import annotations

from typing import Callable, Optional

from ..encoders.omni_id import IdentityEncoder
from .dataset import FewToManySampler, IdentityDataset, SamplerConfig
from .mtd import MTDConfig, MTDObjective, create_decoder
from .trainer import TrainConfig, Trainer


def decoder_config_for(encoder: IdentityEncoder, mtd: MTDConfig) -> MTDConfig:
    """The decoder reads the encoder's tokens: its id_dim follows the encoder."""
    data = mtd.to_dict()
    data["id_dim"] = encoder.config.dim
    return MTDConfig(**data)


def mtd_trainer(dataset: IdentityDataset, encoder: IdentityEncoder, token_fn, mtd: MTDConfig, train: TrainConfig,
                sampler: SamplerConfig, checkpoint_path: Optional[str] = None, device=None) -> Trainer:
    """The stage-1 trainer: a fresh decoder for ``encoder``, the few-to-many sampler, not yet run."""
    if encoder.config.architecture != "omni_id":
        raise ValueError(f"MTD training trains an omni_id encoder, not {encoder.config.architecture!r}")
    decoder = create_decoder(decoder_config_for(encoder, mtd), seed=train.seed + 1)
    objective = MTDObjective(encoder, decoder, FewToManySampler(dataset, sampler, seed=train.seed), token_fn,
                             seed=train.seed)
    return Trainer(objective, train, checkpoint_path, device=device)


def train_mtd(dataset: IdentityDataset, encoder: IdentityEncoder, token_fn, mtd: MTDConfig, train: TrainConfig,
              sampler: SamplerConfig, checkpoint_path: Optional[str] = None, resume: bool = True,
              on_step: Optional[Callable[[int, float], None]] = None,
              should_stop: Optional[Callable[[], bool]] = None, device=None) -> Trainer:
    trainer = mtd_trainer(dataset, encoder, token_fn, mtd, train, sampler, checkpoint_path, device=device)
    if resume:
        trainer.resume()
    trainer.run(on_step=on_step, should_stop=should_stop)
    return trainer
