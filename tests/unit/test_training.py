"""Stage-1 training: sampler, masking, MTD, resume after SIGKILL, DDP equivalence."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from omniid.encoders.omni_id import EncoderConfig, create_encoder
from omniid.training.dataset import DatasetError, FewToManySampler, IdentityDataset, SamplerConfig
from omniid.training.mtd import (MTDConfig, create_decoder, masked_count, patchify, random_mask,
                                 unpatchify)
from omniid.training.run import train_mtd
from omniid.training.trainer import TrainConfig
from support.synthetic_faces import write_identity_dataset
from support.testing import tiny_clip_tokens

ROOT = Path(__file__).resolve().parents[2]
ENCODER = {"clip_dim": 64, "tokens_per_image": 50, "dim": 64, "num_queries": 16, "num_heads": 4,
           "cross_depth": 1, "self_depth": 1, "mlp_ratio": 2.0}
DECODER = {"image_size": 56, "patch": 14, "dim": 64, "num_heads": 4, "cross_depth": 2, "self_depth": 1,
           "mlp_ratio": 2.0}


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = write_identity_dataset(tmp_path_factory.mktemp("identities"), identities=6, photos=8, size=56)
    (root / "too_few").mkdir()
    return root


def test_dataset_lists_identities_and_refuses_empty_folders(dataset_dir, tmp_path):
    dataset = IdentityDataset(dataset_dir)
    assert len(dataset) == 6 and dataset.left_out == ["too_few"]
    assert "6 identities, 48 photos (8-8 per identity)" in dataset.describe()
    with pytest.raises(DatasetError, match="no identity folder with at least 2 photos"):
        IdentityDataset(tmp_path)


def test_few_to_many_sampler_counts_and_ranges(dataset_dir):
    dataset = IdentityDataset(dataset_dir)
    sampler = FewToManySampler(dataset, SamplerConfig("few_to_many", 1, 3, 8), seed=3)
    seen = set()
    for step in range(60):
        batch = sampler.sample(step, 4)
        assert len({s.identity for s in batch}) == 4                      # distinct identities in a batch
        for s in batch:
            assert 1 <= len(s.inputs) <= 3 and len(s.targets) == 8 and set(s.inputs) <= set(s.targets)
            seen.add(len(s.inputs))
    assert seen == {1, 2, 3}
    assert [vars(s) for s in sampler.sample(7, 5)] == [vars(s) for s in sampler.sample(7, 5)]
    two_to_four = FewToManySampler(dataset, SamplerConfig("few_to_many", 2, 4, 5), seed=0).sample(0, 30)
    assert {len(s.inputs) for s in two_to_four} == {2, 3, 4} and {len(s.targets) for s in two_to_four} == {5}
    for s in FewToManySampler(dataset, SamplerConfig("eight_to_eight"), seed=0).sample(0, 6):
        assert s.inputs == s.targets and len(s.targets) == 8
    for s in FewToManySampler(dataset, SamplerConfig("one_to_one"), seed=0).sample(0, 6):
        assert len(s.inputs) == 1 and s.inputs == s.targets
    with pytest.raises(ValueError, match="inputs range 3-1"):
        SamplerConfig("few_to_many", 3, 1)


@pytest.mark.parametrize("ratio", [0.95, 0.85, 0.99])
def test_exactly_the_configured_share_of_patches_is_masked(ratio):
    generators = [torch.Generator().manual_seed(i) for i in range(5)]
    mask = random_mask(5, 400, ratio, generators)
    assert mask.sum(1).tolist() == [round(400 * ratio)] * 5
    assert MTDConfig().patches == 1024 and masked_count(1024, 0.95) == 973          # 448 px, 14 px patches
    assert not torch.equal(mask[0], mask[1])


def test_patchify_round_trips_and_the_decoder_has_the_paper_shape():
    images = torch.rand(2, 3, 56, 56)
    patches = patchify(images, 14)
    assert patches.shape == (2, 16, 14 * 14 * 3)
    assert torch.equal(unpatchify(patches, 14, 56), images)
    paper = MTDConfig()
    assert (paper.cross_depth, paper.self_depth, paper.patch, paper.mask_ratio) == (6, 2, 14, 0.95)
    decoder = create_decoder(MTDConfig(**DECODER, id_dim=64), seed=0)
    out = decoder(patches, torch.randn(2, 16, 64), random_mask(2, 16, 0.95, [torch.Generator()] * 2))
    assert out.shape == patches.shape


def test_mtd_training_lowers_the_loss(dataset_dir):
    torch.manual_seed(0)
    encoder = create_encoder(EncoderConfig(**ENCODER), seed=0)
    trainer = train_mtd(IdentityDataset(dataset_dir), encoder, tiny_clip_tokens(64), MTDConfig(**DECODER),
                        TrainConfig(steps=30, batch=3, lr=1e-3, save_every=0), SamplerConfig())
    losses = trainer.losses
    assert len(losses) == 30 and sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5


# a small open_clip model config: 224 px, 32 px patches, 64 wide -> 50 tokens of width 64, as ENCODER reads
TINY_OPEN_CLIP = {"embed_dim": 32, "vision_cfg": {"image_size": 224, "layers": 2, "width": 64, "patch_size": 32},
                  "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1}}


@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    path = tmp_path_factory.mktemp("open_clip") / "omniid-tiny-vit.json"
    path.write_text(json.dumps(TINY_OPEN_CLIP))
    return path


def train_command(data, out, checkpoint, steps, clip_config, batch=2, extra=()):
    return [sys.executable, "-m", "omniid", "train", "--data", str(data), "--clip", f"open_clip:{clip_config}",
            "--out", str(out), "--checkpoint", str(checkpoint), "--steps", str(steps), "--batch", str(batch),
            "--lr", "1e-3", "--save-every", "1", "--threads", "1", "--encoder-config", json.dumps(ENCODER),
            "--decoder-config", json.dumps(DECODER), *extra]


def test_training_feeds_the_real_open_clip_tokens_in_comfyui_image_layout(dataset_dir, tiny_open_clip):
    """ImageCache hands (B, H, W, 3) photos to the token function, the layout OpenCLIPTokens (and every
    token function of the pack) reads: the tokens equal OpenCLIPTokens on the photo itself."""
    from omniid.encoders.clip_features import OpenCLIPTokens
    from omniid.training.dataset import load_image
    from omniid.training.mtd import ImageCache
    torch.manual_seed(0)
    clip = OpenCLIPTokens.load(str(tiny_open_clip))
    photo = IdentityDataset(dataset_dir).identities[0].images[0]
    cached = ImageCache(clip).clip_tokens([photo])
    direct = clip(load_image(photo, 224).permute(1, 2, 0)[None])
    assert cached.shape == (1, 50, 64)
    torch.testing.assert_close(cached, direct)


def run(cmd, **kwargs):
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, **kwargs)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def test_a_run_killed_with_sigkill_resumes_to_the_same_weights(dataset_dir, tmp_path, tiny_open_clip):
    """The real open_clip path (a small random ViT from a config file) through `omniid train`."""
    steps = 8
    run(train_command(dataset_dir, tmp_path / "straight.safetensors", tmp_path / "straight.pt", steps, tiny_open_clip))
    checkpoint = tmp_path / "killed.pt"
    process = subprocess.Popen(train_command(dataset_dir, tmp_path / "resumed.safetensors", checkpoint, steps,
                                             tiny_open_clip),
                               cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    killed_at = None
    while time.time() < deadline and process.poll() is None:
        if checkpoint.exists():
            step = torch.load(checkpoint, weights_only=True)["step"]
            if step >= 3:
                process.send_signal(signal.SIGKILL)
                killed_at = step
                break
        time.sleep(0.05)
    process.wait()
    assert killed_at is not None and killed_at < steps, "the run ended before it could be killed"
    assert not (tmp_path / "resumed.safetensors").exists()
    run(train_command(dataset_dir, tmp_path / "resumed.safetensors", checkpoint, steps, tiny_open_clip))
    straight, resumed = (load_file(tmp_path / f"{n}.safetensors") for n in ("straight", "resumed"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        assert torch.equal(straight[key], resumed[key]), key


def test_two_torchrun_processes_match_one_with_the_same_global_batch(dataset_dir, tmp_path, tiny_open_clip):
    steps = 4
    run(train_command(dataset_dir, tmp_path / "one.safetensors", tmp_path / "one.pt", steps, tiny_open_clip, batch=2))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = train_command(dataset_dir, tmp_path / "two.safetensors", tmp_path / "two.pt", steps, tiny_open_clip,
                            batch=1)
    run(torchrun + command[1:], env={**os.environ, "OMP_NUM_THREADS": "1"})
    one, two = (load_file(tmp_path / f"{n}.safetensors") for n in ("one", "two"))
    for key in one:
        torch.testing.assert_close(one[key], two[key], atol=2e-5, rtol=1e-4)
    assert any(not torch.equal(one[k], create_encoder(EncoderConfig(**ENCODER), seed=0).state_dict()[k])
               for k in one)                                                    # it did train


class TinyHost:
    """A small epsilon-prediction denoiser with cross-attention layers, standing in for a base model."""
    image_size = 32

    def __init__(self, layers=(32, 32), seed=0):
        g = torch.Generator().manual_seed(seed)
        self.layers = layers
        self.text = torch.randn(4, 32, generator=g)
        self.w_in = [torch.randn(3, d, generator=g) * 0.5 for d in layers]
        self.w_text = [(torch.randn(32, d, generator=g) * 0.2, torch.randn(32, d, generator=g) * 0.2) for d in layers]
        self.w_out = [torch.randn(d, 3, generator=g) * 0.2 for d in layers]
        self.text_calls = []

    def encode(self, images):
        return torch.nn.functional.avg_pool2d(images.permute(0, 3, 1, 2) * 2 - 1, 4)   # (B, 3, 8, 8)

    def sigma_at(self, u):
        return 0.05 + 2.0 * (1 - u)

    def noise(self, x0, sigma, eps):
        return x0 + sigma.reshape(-1, 1, 1, 1) * eps

    def denoise(self, x_t, sigma, identity_kv, text_attention):
        self.text_calls.append(text_attention)
        b = x_t.shape[0]
        h = (x_t / (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt()).flatten(2).transpose(1, 2)   # (B, 64, 3)
        eps = torch.zeros_like(h)
        for i, (k_id, v_id) in enumerate(identity_kv):
            q = h @ self.w_in[i]
            out = torch.nn.functional.scaled_dot_product_attention(q, k_id, v_id)
            if text_attention:
                k_t, v_t = (self.text @ w for w in self.w_text[i])
                out = out + torch.nn.functional.scaled_dot_product_attention(q, k_t.expand(b, -1, -1),
                                                                             v_t.expand(b, -1, -1))
            eps = eps + out @ self.w_out[i]
        eps = eps.transpose(1, 2).reshape(x_t.shape)
        return x_t - sigma.reshape(-1, 1, 1, 1) * eps


@pytest.mark.parametrize("mode", ["omni_id", "identity_enhanced"])
def test_flow_matching_stage_trains_encoder_and_projections(dataset_dir, mode):
    from omniid.guidance.adapter import AdapterConfig, create_adapter
    from omniid.training.dataset import FewToManySampler
    from omniid.training.flow_matching import FlowMatchingObjective
    from omniid.training.trainer import Trainer
    encoder = create_encoder(EncoderConfig(**ENCODER), seed=0)
    adapter = create_adapter(AdapterConfig(family="unet", token_dim=64, layer_dims=(32, 32)), seed=1)
    before = {k: v.clone() for k, v in {**encoder.state_dict(), **adapter.state_dict()}.items()}
    host = TinyHost()
    sampler = FewToManySampler(IdentityDataset(dataset_dir), SamplerConfig(targets=4), seed=0)
    trainer = Trainer(FlowMatchingObjective(encoder, adapter, host, sampler, tiny_clip_tokens(64), mode=mode),
                      TrainConfig(steps=25, batch=2, lr=3e-3, save_every=0))
    losses = trainer.run()
    assert sum(losses[-5:]) < sum(losses[:5])
    assert set(host.text_calls) == {mode == "omni_id"}
    after = {**encoder.state_dict(), **adapter.state_dict()}
    assert not torch.equal(before["queries"], after["queries"])
    assert not torch.equal(before["layers.0.to_k.weight"], after["layers.0.to_k.weight"])



def test_pose_selection_takes_distinct_clusters_far_apart():
    from omniid.training.build_dataset import BuildSettings, FaceEntry, choose_by_pose
    rng = np.random.default_rng(0)
    entries = [FaceEntry(i, None, np.zeros(4), rng.uniform(-60, 60, 3), quality=float(rng.uniform()))
               for i in range(200)]
    chosen = choose_by_pose(entries, BuildSettings())
    assert len(chosen) == 8
    poses = np.stack([c.pose[:3] for c in chosen])
    gaps = np.abs(poses[:, None] - poses[None]).sum(-1) + np.eye(8) * 1e9
    assert gaps.min() > 15.0


def test_fidelity_pose_difference_is_the_sum_over_yaw_pitch_and_roll():
    """MFHQ: 'the sum of absolute pose differences is larger than 15 degrees for each pair'. A turn of the
    head's roll alone, or 8 + 8 degrees of yaw and pitch, is a different pose; 5 + 5 + 4 is not."""
    from omniid.training.build_dataset import BuildSettings, FaceEntry, choose_by_pose, pose_difference
    assert pose_difference(np.array([0, 0, 0]), np.array([8, -8, 0])) == 16
    settings = BuildSettings(photos_per_identity=3, pose_clusters=3)

    def entries(*poses):
        return [FaceEntry(i, None, np.zeros(4), np.array(p, dtype=float), quality=1.0 - i / 10)
                for i, p in enumerate(poses)]

    assert len(choose_by_pose(entries([0, 0, 0], [0, 0, 20], [8, 8, 40]), settings)) == 3
    assert len(choose_by_pose(entries([0, 0, 0], [5, 5, 4], [-5, -5, -4]), settings)) == 1


def test_fidelity_faces_below_the_448_px_floor_are_dropped_not_upscaled(tmp_path):
    from omniid.encoders.face import create_analyzer
    from omniid.training.build_dataset import BuildSettings, build_dataset
    from omniid.training.dataset import load_image
    from support.assets import identity_photo_set
    photo = load_image(identity_photo_set()["id_1.png"], 512).permute(1, 2, 0)
    report = build_dataset(photo[None], create_analyzer("dlib"), tmp_path, BuildSettings(photos_per_identity=1))
    assert report.faces == 1 and report.to_dict()["dropped_too_small"] == 1
    assert 0 < report.too_small[0]["face_size"] < 448 and not report.identities
    relaxed = build_dataset(photo[None], create_analyzer("dlib"), tmp_path / "relaxed",
                            BuildSettings(photos_per_identity=1, min_face_size=0))
    assert len(relaxed.identities) == 1 and relaxed.to_dict()["dropped_too_small"] == 0


def test_dataset_builder_groups_people_and_writes_their_crops(photos, tmp_path):
    from support.assets import identity_photo_set
    identity_photos = identity_photo_set()
    from omniid.encoders.face import create_analyzer
    from omniid.training.build_dataset import BuildSettings, build_dataset
    from PIL import Image

    from omniid.training.dataset import load_image
    from support.assets import load_photo
    size = 384
    batch = [load_image(identity_photos[f"id_{i}.png"], size).permute(1, 2, 0) for i in range(1, 8)]
    biden = load_photo(photos / "biden.jpg")
    biden = np.asarray(Image.fromarray(biden[:biden.shape[1]]).resize((size, size)))     # the top square: the face
    batch += [torch.from_numpy(biden.copy()).float() / 255, torch.zeros(size, size, 3)]
    settings = BuildSettings(photos_per_identity=3, min_pose_difference=0.5, crop_size=112, min_face_size=0)
    report = build_dataset(torch.stack(batch), create_analyzer("dlib"), tmp_path, settings)
    assert report.images_without_face == [8]
    assert len(report.identities) == 1 and report.identities[0]["faces"] == 7
    assert report.identities[0]["after_quality_filter"] == 6                     # 20% dropped
    assert set(report.identities[0]["images"]) <= set(range(7))
    assert report.left_out[0]["faces"] == 1 and "only 1 faces" in report.left_out[0]["reason"]   # Biden alone
    written = sorted((tmp_path / "identity_0000").glob("*.png"))
    assert len(written) == 3
    assert len(IdentityDataset(tmp_path)) == 1


class TinyPivotHost(TinyHost):
    """TinyHost whose text tokens come from the given conditioning; reports one token's attention map."""

    def denoise_conditioned(self, x_t, sigma, conditioning, token):
        h = (x_t / (1 + sigma.reshape(-1, 1, 1, 1) ** 2).sqrt()).flatten(2).transpose(1, 2)
        eps, maps = torch.zeros_like(h), []
        for i in range(len(self.layers)):
            q = h @ self.w_in[i]
            k, v = (conditioning @ w for w in self.w_text[i])
            probs = torch.softmax(q @ k.transpose(1, 2) / q.shape[-1] ** 0.5, -1)
            maps.append(probs[..., token])
            eps = eps + (probs @ v) @ self.w_out[i]
        eps = eps.transpose(1, 2).reshape(x_t.shape)
        return x_t - sigma.reshape(-1, 1, 1, 1) * eps, torch.stack(maps).mean(0), (8, 8)


def test_localisation_loss_is_zero_where_attention_is_the_mask_and_grows_off_it():
    from omniid.training.pivot import localisation_loss
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:24, 8:24] = 1
    on_face = torch.nn.functional.interpolate(mask[:, None], size=(8, 8), mode="area")[:, 0].flatten(1) * 0.3
    off_face = torch.roll(on_face.reshape(1, 8, 8), 4, dims=2).flatten(1)
    assert localisation_loss(on_face, mask, (8, 8)).item() < 1e-12      # scaled by its maximum
    assert localisation_loss(off_face, mask, (8, 8)).item() > 0.2


def test_pivot_training_learns_e_mix_and_localises_it(dataset_dir):
    from omniid.encoders.pivot import PivotConfig, PivotIDEncoder
    from omniid.training.dataset import FewToManySampler
    from omniid.training.pivot import PivotObjective
    from omniid.training.trainer import Trainer
    torch.manual_seed(0)
    pivot = PivotIDEncoder(PivotConfig(image_dim=16, text_dim=32))
    before = pivot.fuse.weight.detach().clone()
    host = TinyPivotHost()
    embed = lambda images: tiny_clip_tokens(16)(images).mean(1)                          # (B, 16) per photo

    def face_mask(image):                                     # (H, W, 3); the synthetic face: an ellipse
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, image.shape[0]), torch.linspace(-1, 1, image.shape[1]),
                                indexing="ij")
        return ((xs / 0.6) ** 2 + (ys / 0.8) ** 2 <= 1).float()

    sampler = FewToManySampler(IdentityDataset(dataset_dir), SamplerConfig("few_to_many", 1, 1, 3), seed=0)
    objective = PivotObjective(pivot, host, sampler, embed, face_mask, torch.randn(1, 6, 32), class_token=3,
                               eta=1.0)
    trainer = Trainer(objective, TrainConfig(steps=40, batch=2, lr=1e-2, save_every=0))
    first = None
    for _ in range(40):
        trainer.train_step()
        first = first or objective.last_parts
    assert objective.last_parts[1] < first[1]                          # the map moved toward the face
    assert not torch.equal(before, pivot.fuse.weight)


def test_mtd_loss_is_the_l1_error_over_each_targets_masked_patches():
    from omniid.training.mtd import mtd_loss
    predicted = torch.zeros(2, 3, 4)
    target = torch.tensor([[[1.0] * 4, [2.0] * 4, [5.0] * 4], [[-1.0] * 4, [0.0] * 4, [3.0] * 4]])
    mask = torch.tensor([[True, True, False], [False, True, True]])
    torch.testing.assert_close(mtd_loss(predicted, target, mask), torch.tensor([1.5, 1.5]))
    torch.testing.assert_close(mtd_loss(predicted, target, mask, "all"), torch.tensor([8 / 3, 4 / 3]))


def tiny_arcface(width=16):
    """A stand-in ArcFace: a fixed random projection of the photo's 4 x 4 colour layout, unit length."""
    weight = torch.randn(48, width, generator=torch.Generator().manual_seed(7))

    def embed(images):                                           # (B, H, W, 3) -> (B, width)
        pooled = torch.nn.functional.adaptive_avg_pool2d(images.permute(0, 3, 1, 2), 4).flatten(1)
        return torch.nn.functional.normalize(pooled @ weight, dim=-1)
    return embed


BASELINE_ENCODER = {**ENCODER, "id_dim": 16, "id_hidden": 32}


@pytest.mark.parametrize("method", ["arcface", "clip", "arcface_clip"])
def test_fidelity_flow_stage_trains_the_papers_baselines_like_omni_id(dataset_dir, method):
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
        assert any(k.startswith("arcface_proj") for k in moved)
        if method == "arcface_clip":
            assert any(k.startswith("transformer") for k in moved)


@pytest.mark.parametrize("method", ["clip", "arcface"])
def test_fidelity_concatenated_baselines_never_attend_to_padding(dataset_dir, method):
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


def test_fidelity_a_trained_clip_adapter_reads_the_photos_concatenated_clip_tokens():
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


def test_fidelity_omniid_train_prints_the_recipe_it_runs(dataset_dir, tmp_path, tiny_open_clip):
    done = run(train_command(dataset_dir, tmp_path / "enc.safetensors", tmp_path / "ckpt.pt", 1, tiny_open_clip,
                             extra=("--recipe", "quick")))
    assert "recipe quick (mtd): 1 steps, global batch 2 (batch 2 x accum 1 x 1 process(es)), 56 px, lr 0.001" \
        in done.stderr
    assert "kept as given: batch, image_size, lr, steps" in done.stderr


class TinyTower:
    """A small ViT as a pivot VisionTower: patch embedding, 3 transformer blocks, final norm, projection."""

    @staticmethod
    def create(dim=32, out=16, depth=3, seed=0):
        from omniid.encoders.pivot import VisionTower

        class Tower(VisionTower):
            layout = "tiny_test_vit"

            def __init__(self):
                super().__init__()
                self.patch = torch.nn.Conv2d(3, dim, 8, 8)
                self.layers = torch.nn.ModuleList(torch.nn.TransformerEncoderLayer(dim, 4, 64, dropout=0.0,
                                                                                   batch_first=True)
                                                  for _ in range(depth))
                self.norm = torch.nn.LayerNorm(dim)
                self.proj = torch.nn.Linear(dim, out, bias=False)
                self.calls = [0] * depth
                for i, layer in enumerate(self.layers):
                    layer.linear1.register_forward_pre_hook(   # inside the block: recomputation counts too
                        lambda m, a, i=i: self.calls.__setitem__(i, self.calls[i] + 1))

            def blocks(self):
                return list(self.layers)

            def stem(self):
                return [self.patch]

            def head(self):
                return [self.norm, self.proj]

            def forward(self, images):                                 # (B, H, W, 3) in [0, 1]
                x = torch.nn.functional.interpolate(images.permute(0, 3, 1, 2), size=(32, 32), mode="bilinear")
                x = self.patch(x * 2 - 1).flatten(2).transpose(1, 2)
                for layer in self.layers:
                    x = layer(x)
                return self.proj(self.norm(x.mean(1)))

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return Tower()


def ellipse_mask(image):
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, image.shape[0]), torch.linspace(-1, 1, image.shape[1]),
                            indexing="ij")
    return ((xs / 0.6) ** 2 + (ys / 0.8) ** 2 <= 1).float()


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
def test_fidelity_pivot_trains_its_visual_encoder_with_the_linear_layer(dataset_dir, blocks):
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


def test_fidelity_pivot_file_carries_the_trained_visual_encoder_and_old_files_load(tmp_path):
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


def test_fidelity_pivot_drops_text_and_id_conditions_ten_percent_of_the_time(dataset_dir):
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


def test_fidelity_localisation_compares_on_the_papers_16_by_16_grid():
    """A_t in [0, 1]^(16 x 16): a finer map (SDXL's 32 x 32 at 1024 px) is averaged onto 16 x 16 first."""
    from omniid.training.pivot import localisation_loss
    mask = torch.zeros(1, 64, 64)
    mask[:, 16:48, 16:48] = 1
    fine = torch.nn.functional.interpolate(mask[:, None], size=(32, 32), mode="area")[:, 0]
    checker = (torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2                 # averages out on 16 x 16
    attention = (fine * (0.5 + checker)).flatten(1)
    assert localisation_loss(attention, mask, (32, 32)).item() < 1e-10
    assert localisation_loss(attention, mask, (32, 32), size=(32, 32)).item() > 0.01     # what a 32 x 32 loss sees
