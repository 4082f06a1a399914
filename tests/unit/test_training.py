"""Stage-1 training: sampler, masking, MTD, resume after SIGKILL, DDP equivalence."""
import json
import os
import subprocess
import sys
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
from support.testing import kill_at_checkpoint_step, tiny_clip_tokens
from support.tiny_training import TinyHost, TinyPivotHost

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
    killed_at = kill_at_checkpoint_step(process, checkpoint, 3)
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


def test_pose_difference_is_the_sum_over_yaw_pitch_and_roll():
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


def test_faces_below_the_448_px_floor_are_dropped_not_upscaled(tmp_path):
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


def test_omniid_train_prints_the_recipe_it_runs(dataset_dir, tmp_path, tiny_open_clip):
    done = run(train_command(dataset_dir, tmp_path / "enc.safetensors", tmp_path / "ckpt.pt", 1, tiny_open_clip,
                             extra=("--recipe", "quick")))
    assert "recipe quick (mtd): 1 steps, global batch 2 (batch 2 x accum 1 x 1 process(es)), 56 px, lr 0.001" \
        in done.stderr
    assert "kept as given: batch, image_size, lr, steps" in done.stderr
