"""Paper recipes: each training stage's batch, steps, resolution and learning rate, one switch away."""
import argparse
import sys

import pytest

from omniid.training.recipes import PAPER, QUICK, Settings, flow_stage, pivot_stage, resolve, split_batch

GIVEN = Settings(steps=7, lr=3e-3, image_size=64, batch=8, grad_accum=1)


def test_paper_recipe_sets_each_stage_to_its_papers_values():
    # Omni-ID appendix A.2 / A.1 and OmniPortrait "Loss & Training"
    expected = {"mtd": (250_000, 1e-4, 448, 256), "flow": (5_000, 1e-4, 512, 32), "flow_arcface": (75_000, 1e-4, 512, 32),
                "pivot_sd15": (80_000, 2e-5, 512, 8), "pivot_sdxl": (60_000, 2e-5, 1024, 8)}
    for stage, (steps, lr, size, global_batch) in expected.items():
        for world in (1, 8) if stage.startswith(("mtd", "flow")) else (1,):
            settings, line = resolve(stage, "paper", GIVEN, world=world)
            assert (settings.steps, settings.lr, settings.image_size) == (steps, lr, size), stage
            assert settings.global_batch(world) == global_batch * (world if stage.startswith("pivot") else 1), stage
            assert settings.batch <= GIVEN.batch and f"{steps} steps" in line and "recipe paper" in line


def test_custom_keeps_the_values_and_explicit_values_win_over_the_recipe():
    assert resolve("flow", "custom", GIVEN)[0] == GIVEN
    settings, line = resolve("mtd", "paper", GIVEN, explicit=frozenset({"steps", "image_size"}))
    assert (settings.steps, settings.image_size, settings.lr, settings.global_batch()) == (7, 64, 1e-4, 256)
    assert "kept as given: image_size, steps" in line
    settings, _ = resolve("flow", "paper", GIVEN, explicit=frozenset({"batch"}))
    assert (settings.batch, settings.grad_accum, settings.steps) == (8, 4, 5_000)        # the batch asked for, x 4
    settings, _ = resolve("flow", "paper", GIVEN, explicit=frozenset({"batch", "grad_accum"}))
    assert (settings.batch, settings.grad_accum) == (8, 1)
    with pytest.raises(ValueError, match="does not divide the paper's global batch 32"):
        resolve("flow", "paper", Settings(7, 3e-3, 64, 12, 1), explicit=frozenset({"batch"}))
    quick, _ = resolve("flow", "quick", GIVEN)
    assert (quick.steps, quick.batch, quick.grad_accum) == (QUICK["flow"].steps, QUICK["flow"].batch, 1)
    with pytest.raises(ValueError, match="recipe must be one of"):
        resolve("flow", "fast", GIVEN)


def test_split_batch_reaches_the_global_batch_with_the_largest_micro_batch_that_fits():
    for effective, micro, world in ((256, 8, 1), (256, 12, 1), (32, 5, 1), (32, 8, 8), (256, 3, 4)):
        batch, accum = split_batch(effective, micro, world)
        assert batch * accum * world == effective and batch <= micro
        assert not any((effective // world) % b == 0 for b in range(batch + 1, micro + 1))
    assert flow_stage("arcface") == "flow_arcface" and flow_stage("clip") == "flow"
    assert pivot_stage(2048) == "pivot_sdxl" and pivot_stage(768) == "pivot_sd15"
    assert PAPER["pivot_sd15"].batch is None                       # the paper gives none: the run's is kept


def test_omniid_train_accepts_a_recipe_and_keeps_explicit_flags():
    from omniid.cli.train import add_parser, run_settings
    parser = argparse.ArgumentParser()
    add_parser(parser.add_subparsers())
    base = ["train", "--data", "d", "--clip", "open_clip:x", "--out", "o"]
    settings, line = run_settings(parser.parse_args(base + ["--recipe", "paper", "--batch", "16"]), {}, 1)
    assert (settings.steps, settings.image_size, settings.lr) == (250_000, 448, 1e-4)
    assert (settings.batch, settings.grad_accum) == (16, 16) and "kept as given: batch" in line
    settings, line = run_settings(parser.parse_args(base + ["--recipe", "paper", "--steps", "5"]),
                                  {"image_size": 56}, 2)
    assert (settings.steps, settings.image_size, settings.global_batch(2)) == (5, 56, 256)
    assert "kept as given: image_size, steps" in line
    settings, _ = run_settings(parser.parse_args(base), {}, 1)
    assert (settings.steps, settings.batch, settings.grad_accum, settings.image_size) == (1000, 8, 1, 448)


def test_recipe_sets_the_diffusers_stages_too():
    from argparse import Namespace
    from omniid.cli.train_flow import stage2_settings
    from omniid.training.recipes import Settings

    unset = dict(steps=None, batch=None, grad_accum=None, lr=None, image_size=None)
    flow, line = stage2_settings(Namespace(recipe="paper", **unset), "flow", world=2)
    assert flow == Settings(steps=5000, lr=1e-4, image_size=512, batch=8, grad_accum=2)
    assert line.startswith("recipe paper (flow): 5000 steps, global batch 32")
    pivot, _ = stage2_settings(Namespace(recipe="paper", **dict(unset, steps=3)), "pivot_sdxl", world=1)
    assert pivot == Settings(steps=3, lr=2e-5, image_size=1024, batch=8, grad_accum=1)
    custom, _ = stage2_settings(Namespace(recipe="custom", **unset), "flow", world=1)
    assert custom == Settings(steps=1000, lr=1e-4, image_size=512, batch=8, grad_accum=1)
