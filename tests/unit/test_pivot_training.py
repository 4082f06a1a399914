"""OmniPortrait's Pivot ID Encoder: its visual encoder trains, its file carries it, condition dropout, 16 x 16 grid."""
import pytest
import torch

from omniid.training.dataset import FewToManySampler, IdentityDataset, SamplerConfig
from omniid.training.trainer import TrainConfig
from support.synthetic_faces import write_identity_dataset
from support.testing import tiny_clip_tokens
from support.tiny_training import TinyPivotHost, TinyTower, ellipse_mask


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return write_identity_dataset(tmp_path_factory.mktemp("identities"), identities=6, photos=8, size=56)


def pivot_objective(dataset_dir, tower=None, **kwargs):
    from omniid.encoders.pivot import PivotConfig, PivotIDEncoder
    from omniid.training.pivot import PivotObjective
    torch.manual_seed(0)
    pivot = PivotIDEncoder(PivotConfig(image_dim=16, text_dim=32))
    sampler = FewToManySampler(IdentityDataset(dataset_dir), SamplerConfig("few_to_many", 1, 1, 3), seed=0)
    embed = None if tower is not None else (lambda images: tiny_clip_tokens(16)(images).mean(1))
    return pivot, PivotObjective(pivot, TinyPivotHost(), sampler, embed, ellipse_mask, torch.randn(1, 6, 32),
                                 class_token=3, eta=1.0, vision=tower, **kwargs)


@pytest.mark.parametrize("blocks", [2, -1])
def test_pivot_trains_its_visual_encoder_with_the_linear_layer(dataset_dir, blocks):
    """OmniPortrait: "only the Pivot ID Encoder and linear layer are optimized": the visual encoder's last N
    blocks (or all) train with the fusing layer, its trained blocks recompute activations (checkpointing)."""
    from omniid.encoders.pivot import prepare_vision
    from omniid.training.trainer import Trainer
    tower = TinyTower.create()
    names = prepare_vision(tower, blocks, gradient_checkpointing=True)
    before = {k: v.detach().clone() for k, v in tower.state_dict().items()}
    pivot, objective = pivot_objective(dataset_dir, tower)
    fuse_before = pivot.fuse.weight.detach().clone()
    trainer = Trainer(objective, TrainConfig(steps=4, batch=2, lr=1e-2, save_every=0))
    assert {id(p) for g in trainer.optimizer.param_groups for p in g["params"]} == (
        {id(p) for p in pivot.parameters()} | {id(p) for n, p in tower.named_parameters() if n in names})
    tower.calls[:] = [0, 0, 0]
    trainer.train_step()
    first_trained = 0 if blocks == -1 else 3 - blocks
    assert tower.calls[first_trained:] == [2] * (3 - first_trained)      # forward + recomputation in backward
    assert tower.calls[:first_trained] == [1] * first_trained
    trainer.run()
    changed = {k for k, v in tower.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == set(names)
    assert any(k.startswith("layers.2.") for k in changed) and "proj.weight" in changed
    assert ("patch.weight" in changed) == (blocks == -1) and not any(k.startswith("layers.0.") for k in changed
                                                                     if blocks == 2)
    assert not torch.equal(fuse_before, pivot.fuse.weight)


def test_pivot_file_carries_the_trained_visual_encoder_and_old_files_load(tmp_path):
    import json as json_
    from omniid.encoders.checkpoint import METADATA_KEY, atomic_save
    from omniid.encoders.pivot import (PivotConfig, PivotIDEncoder, load_pivot, load_vision_state, prepare_vision,
                                       save_pivot, trained_vision_state)
    tower = TinyTower.create(seed=1)
    prepare_vision(tower, 1)
    with torch.no_grad():
        for p in tower.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p))                        # "trained"
    pivot = PivotIDEncoder(PivotConfig(16, 32, vision_blocks=1, vision_layout=tower.layout),
                           trained_vision_state(tower))
    save_pivot(pivot, str(tmp_path / "p.safetensors"))
    loaded = load_pivot(str(tmp_path / "p.safetensors"))
    assert loaded.config == pivot.config and set(loaded.vision_state) == {n for n, p in tower.named_parameters()
                                                                          if p.requires_grad}
    images = torch.rand(2, 40, 40, 3)
    fresh = TinyTower.create(seed=1)                               # the CLIP vision model it was trained from
    assert not torch.allclose(fresh(images), tower(images))
    torch.testing.assert_close(load_vision_state(fresh, loaded.vision_state, loaded.config.vision_layout)(images),
                               tower(images))
    with pytest.raises(ValueError, match="trained as a 'other'"):
        load_vision_state(TinyTower.create(), loaded.vision_state, "other")
    # a version-1 file (the fusing layer only) still loads, with nothing for the visual encoder
    old = PivotIDEncoder(PivotConfig(16, 32))
    atomic_save(old.state_dict(), str(tmp_path / "v1.safetensors"),
                {METADATA_KEY: json_.dumps({"format": "omni_identity.pivot", "version": 1,
                                            "config": {"image_dim": 16, "text_dim": 32}})})
    v1 = load_pivot(str(tmp_path / "v1.safetensors"))
    assert v1.vision_state == {} and v1.config.vision_blocks == 0
    torch.testing.assert_close(v1.fuse.weight, old.fuse.weight)


def test_pivot_drops_text_and_id_conditions_ten_percent_of_the_time(dataset_dir):
    """OmniPortrait: "10% dropout is applied to text and ID conditions" (independently, per sample)."""
    from omniid.training.pivot import CONDITION_DROPOUT, condition_drops
    draws = [condition_drops(0, step, i, CONDITION_DROPOUT, CONDITION_DROPOUT) for step in range(500) for i in range(4)]
    text, ids = (sum(d[k] for d in draws) / len(draws) for k in (0, 1))
    assert 0.08 < text < 0.12 and 0.08 < ids < 0.12
    both = sum(d[0] and d[1] for d in draws) / len(draws)
    assert 0.003 < both < 0.02                                     # independent: about 1%

    # text dropped: the host sees the unconditional tokens with e_mix at the class word
    unconditional = torch.randn(1, 6, 32)
    seen = []
    pivot, objective = pivot_objective(dataset_dir, text_dropout=1.0, id_dropout=0.0, unconditional=unconditional)
    original = objective.host.denoise_conditioned
    objective.host.denoise_conditioned = lambda x, s, c, t: seen.append(c.detach()) or original(x, s, c, t)
    samples = objective.draw(0, 2)
    objective.loss(objective.module, samples, 0, 0)
    kept = [i for i in range(6) if i != 3]
    torch.testing.assert_close(seen[0][:, kept], unconditional[:, kept].expand(len(seen[0]), -1, -1))
    # ID dropped: the visual encoder gets no gradient, e_mix is the fusion of the text with a zero image
    tower = TinyTower.create()
    from omniid.encoders.pivot import prepare_vision
    prepare_vision(tower, 1)
    _, objective = pivot_objective(dataset_dir, tower, text_dropout=0.0, id_dropout=1.0)
    objective.loss(objective.module, objective.draw(0, 2), 0, 0).backward()
    assert all(p.grad is None or not p.grad.any() for p in tower.parameters())


def test_localisation_compares_on_the_papers_16_by_16_grid():
    """A_t in [0, 1]^(16 x 16): a finer map (SDXL's 32 x 32 at 1024 px) is averaged onto 16 x 16 first."""
    from omniid.training.pivot import localisation_loss
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1
    fine = torch.nn.functional.interpolate(mask[:, None], size=(32, 32), mode="area")[:, 0]
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2                 # averages out on 16 x 16
    attention = (fine * (0.5 + checker)).flatten(1)
    assert localisation_loss(attention, mask, (32, 32)).item() < 1e-10
    assert localisation_loss(attention, mask, (32, 32), size=(32, 32)).item() > 0.01     # what a 32 x 32 loss sees
