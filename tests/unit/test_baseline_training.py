"""Omni-ID's baselines (ArcFace, CLIP, ArcFace+CLIP) trained in the same flow-matching stage."""
import pytest
import torch

from omniid.encoders.omni_id import EncoderConfig, create_encoder
from omniid.training.dataset import FewToManySampler, IdentityDataset, SamplerConfig
from omniid.training.trainer import TrainConfig
from support.synthetic_faces import write_identity_dataset
from support.testing import tiny_clip_tokens
from support.tiny_training import TinyHost, tiny_arcface

ENCODER = {"clip_dim": 64, "tokens_per_image": 50, "dim": 64, "num_queries": 16, "num_heads": 4,
           "cross_depth": 1, "self_depth": 1, "mlp_ratio": 2.0}


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    return write_identity_dataset(tmp_path_factory.mktemp("identities"), identities=6, photos=8, size=56)


BASELINE_ENCODER = {**ENCODER, "id_dim": 16, "id_hidden": 32}


@pytest.mark.parametrize("method", ["arcface", "clip", "arcface_clip", "infinite_id"])
def test_flow_stage_trains_the_papers_baselines_like_omni_id(dataset_dir, method):
    """Omni-ID A.1: ArcFace, CLIP and ArcFace+CLIP are trained in the same flow-matching stage;
    the CLIP baseline has no encoder, only the adapter's projections train."""
    from omniid.guidance.adapter import AdapterConfig, create_adapter
    from omniid.training.flow_matching import FlowMatchingObjective
    from omniid.training.trainer import Trainer
    encoder = None if method == "clip" else create_encoder(EncoderConfig(architecture=method, **BASELINE_ENCODER),
                                                           seed=0)
    adapter = create_adapter(AdapterConfig(family="unet", token_dim=64, layer_dims=(32, 32), embeds_kind=method),
                             seed=1)
    before = {k: v.clone() for k, v in (encoder.state_dict() if encoder else {}).items()}
    k_before = adapter.layers[0].to_k.weight.detach().clone()
    sampler = FewToManySampler(IdentityDataset(dataset_dir), SamplerConfig(targets=4), seed=0)
    objective = FlowMatchingObjective(encoder, adapter, TinyHost(), sampler, tiny_clip_tokens(64), method=method,
                                      arcface_fn=tiny_arcface())
    trainable = {n for n, p in objective.module.named_parameters() if p.requires_grad}
    assert trainable == {f"adapter.{n}" for n, _ in adapter.named_parameters()} | (
        {f"encoder.{n}" for n, _ in encoder.named_parameters()} if encoder else set())
    losses = Trainer(objective, TrainConfig(steps=25, batch=2, lr=3e-3, save_every=0)).run()
    assert sum(losses[-5:]) < sum(losses[:5])
    assert not torch.equal(k_before, adapter.layers[0].to_k.weight)
    if encoder is not None:
        moved = [k for k, v in encoder.state_dict().items() if not torch.equal(v, before[k])]
        assert method == "infinite_id" or any(k.startswith("arcface_proj") for k in moved)
        if method == "arcface_clip":
            assert any(k.startswith("transformer") for k in moved)
        if method == "infinite_id":                     # Infinite-ID's extractor: both mappers train
            assert any(k.startswith("clip_mapper") for k in moved) and any(k.startswith("face_mapper") for k in moved)


@pytest.mark.parametrize("method", ["clip", "arcface"])
def test_concatenated_baselines_never_attend_to_padding(dataset_dir, method):
    """Identities of 1 and 3 photos in one batch: each one's loss is what it is alone (groups by token count)."""
    from omniid.guidance.adapter import AdapterConfig, create_adapter
    from omniid.training.dataset import Sample
    from omniid.training.flow_matching import FlowMatchingObjective
    encoder = None if method == "clip" else create_encoder(EncoderConfig(architecture=method, **BASELINE_ENCODER),
                                                           seed=0)
    adapter = create_adapter(AdapterConfig(family="unet", token_dim=64, layer_dims=(32, 32), embeds_kind=method),
                             seed=1)
    sampler = FewToManySampler(IdentityDataset(dataset_dir), SamplerConfig(targets=2), seed=0)
    objective = FlowMatchingObjective(encoder, adapter, TinyHost(), sampler, tiny_clip_tokens(64), method=method,
                                      arcface_fn=tiny_arcface())
    samples = [Sample(0, [0], [1, 2]), Sample(1, [0, 3, 5], [1, 2])]
    with torch.no_grad():
        together = objective.loss(objective.module, samples, 0, 0)
        alone = objective.loss(objective.module, samples[:1], 0, 0) + objective.loss(objective.module, samples[1:], 0, 1)
        _, lengths = objective.module.identity(*objective.cache.padded_tokens(
            [[sampler.dataset.identities[s.identity].images[i] for i in s.inputs] for s in samples]),
            objective.arcface.padded_tokens([[sampler.dataset.identities[s.identity].images[i] for i in s.inputs]
                                             for s in samples])[0] if objective.arcface else None)
    torch.testing.assert_close(together, alone)
    assert lengths[1] == 3 * lengths[0]


def test_a_trained_clip_adapter_reads_the_photos_concatenated_clip_tokens():
    from omniid.encoders.embeds import IdentityEmbeds
    from omniid.guidance.adapter import AdapterConfig, create_adapter
    from omniid.guidance.decoupled import COND, UNCOND
    adapter = create_adapter(AdapterConfig(family="unet", token_dim=64, layer_dims=(32,), embeds_kind="clip"), seed=0)
    clip = torch.randn(3, 50, 64)
    tokens = adapter.identity_tokens(IdentityEmbeds("clip", {"clip": clip, "clip_uncond": torch.randn(1, 50, 64)}))
    torch.testing.assert_close(tokens[COND], torch.cat(list(clip)))
    assert tokens[UNCOND].abs().sum() == 0
    with pytest.raises(ValueError, match="does not fit these embeds: it needs clip"):
        adapter.identity_tokens(IdentityEmbeds("omni_id", {"tokens": torch.randn(4, 64)}))
