"""Omni-ID's few-to-many claim in miniature, on the CPU, over seeds: more input photos, better reconstruction.

Procedural identities (tests/support/synthetic_faces.py: traits fixed per person, pose and
expression per photo, a colour on each cheek that shows only when the head turns that cheek
toward the camera) are split into training people (random poses) and held-out people
photographed in a fixed pose schedule (benchmarks/miniature.py: photo 0 shows the left cheek,
photo 1 the right one, photo 2 neither, photos 3-4 one each; targets 5-7 a right-cheek view, a
left-cheek view, a frontal one). One photo cannot hold both cheek colours; three can.

Three encoders of the same architecture train the same number of steps (a fixed step budget,
never a time budget) with the same masked transformer decoder (training/mtd.py: 95% of patches
masked, L1), the few-to-many sampler (1-3 inputs), and per seed the same initial weights, batches
and masks:

- omni_id: the photos' tokens concatenated as the keys/values of learned queries (the paper);
- mean_pool: the photos' CLIP tokens averaged token by token, then encoded as one photo;
- per_photo: each photo encoded alone, the encoder's outputs (the projections) averaged.

Held-out error for k = 1, 3, 5 inputs (photos 0..k-1), targets 5-7, fixed masks: the mean L1 over
masked patches, and the cheek L1 (over the cheek pixels in masked patches, the trait that needs
views). Each method runs with every seed; the paired t-test over seeds says whether Omni-ID's
difference from a baseline exceeds the spread of the seeds. Runs are bitwise repeatable
(one thread, deterministic kernels), so two runs print the same numbers and verdict.

    .venv/bin/python benchmarks/few_to_many.py            # 5 seeds x 3 methods x 300 steps (58 min on a loaded 2-core CPU)
    .venv/bin/python benchmarks/few_to_many.py --quick    # 5 seeds x 3 methods x 4 steps, for CI

Last line: RESULT {json}: per method the per-k mean and std, and the paired tests.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

import miniature
from miniature import mean_std, paired_t, verdict, write_posed_people
from omniid.encoders.omni_id import EncoderConfig, create_encoder
from omniid.training.dataset import FewToManySampler, IdentityDataset, SamplerConfig
from omniid.training.mtd import (ImageCache, MTDConfig, MTDModel, MTDObjective, create_decoder, patchify, random_mask,
                                 unpatchify)
from omniid.training.trainer import TrainConfig, Trainer
from support.synthetic_faces import write_identity_dataset

SETTINGS = {
    "full": dict(train_ids=200, heldout_ids=16, size=32, mtd_patch=4, clip_patch=8, steps=300, batch=8, targets=4,
                 dim=64, queries=8, seeds=5, lr=2e-3),
    "quick": dict(train_ids=12, heldout_ids=4, size=32, mtd_patch=4, clip_patch=8, steps=4, batch=4, targets=4,
                  dim=32, queries=4, seeds=5, lr=2e-3),
}
METHODS = ("omni_id", "mean_pool", "per_photo")
INPUT_COUNTS = (1, 3, 5)
TARGETS = (5, 6, 7)


def patch_tokens(size: int, patch: int):
    """CLIP's stand-in, fixed: (B, S, S, 3) -> (B, 1 + P, 3 * patch^2 + P), each patch's pixels and a
    one-hot position, plus their mean in the class token's place."""
    count = (size // patch) ** 2

    def tokens(images):
        pixels = patchify(images.permute(0, 3, 1, 2) * 2 - 1, patch)
        body = torch.cat([pixels, torch.eye(count).expand(pixels.shape[0], -1, -1)], -1)
        return torch.cat([body.mean(1, keepdim=True), body], 1)

    return tokens, count + 1, 3 * patch * patch + count


class MeanPoolInputs(nn.Module):
    """The photos' tokens averaged over the real photos, then encoded as one photo."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.inner, self.config = encoder, encoder.config

    def forward(self, clip_tokens, counts=None, **_):
        b, n = clip_tokens.shape[:2]
        valid = (torch.arange(n)[None] < torch.tensor(counts or [n] * b)[:, None]).float()[..., None, None]
        pooled = (clip_tokens * valid).sum(1) / valid.sum(1)
        return self.inner(pooled[:, None])


class PerPhotoAverage(nn.Module):
    """The same encoder on each photo alone, its outputs averaged over the real photos."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.inner, self.config = encoder, encoder.config

    def forward(self, clip_tokens, counts=None, **_):
        b, n = clip_tokens.shape[:2]
        each = self.inner(clip_tokens.reshape(b * n, 1, *clip_tokens.shape[2:]))
        each = each.reshape(b, n, *each.shape[1:])
        valid = (torch.arange(n)[None] < torch.tensor(counts or [n] * b)[:, None]).float()[..., None, None]
        return (each * valid).sum(1) / valid.sum(1)


WRAPPERS = {"omni_id": lambda e: e, "mean_pool": MeanPoolInputs, "per_photo": PerPhotoAverage}


def train(method: str, dataset, token_fn, tokens, width, s, seed: int) -> tuple[MTDModel, Trainer]:
    config = EncoderConfig(clip_dim=width, tokens_per_image=tokens, dim=s["dim"], num_queries=s["queries"],
                           num_heads=4, cross_depth=2, self_depth=1, mlp_ratio=2.0)
    encoder = WRAPPERS[method](create_encoder(config, seed=seed))
    decoder = create_decoder(MTDConfig(image_size=s["size"], patch=s["mtd_patch"], dim=s["dim"], num_heads=4,
                                       cross_depth=2, self_depth=1, mlp_ratio=2.0, id_dim=s["dim"]), seed=seed + 1)
    sampler = FewToManySampler(dataset, SamplerConfig(targets=s["targets"]), seed=seed)
    objective = MTDObjective(encoder, decoder, sampler, token_fn, seed=seed, clip_size=s["size"])
    trainer = Trainer(objective, TrainConfig(steps=s["steps"], batch=s["batch"], lr=s["lr"], save_every=0, seed=seed))
    trainer.run()
    return objective.module, trainer


@torch.no_grad()
def heldout_error(model: MTDModel, dataset, cheeks, token_fn, s, repeats: int = 2) -> dict[str, dict[int, float]]:
    """Per k: the mean L1 over masked patches and over the masked cheek pixels, with masks fixed per person."""
    cfg = model.decoder.config
    cache = ImageCache(token_fn, s["size"])
    model.eval()
    out = {"l1": {}, "cheek_l1": {}}
    for k in INPUT_COUNTS:
        total, count, cheek_total, cheek_count = 0.0, 0, 0.0, 0
        for person, identity in enumerate(dataset.identities):
            tokens = cache.clip_tokens(identity.images[:k])[None]
            images = torch.stack([cache.image(identity.images[t], cfg.image_size) for t in TARGETS])
            targets = patchify(images, cfg.patch)
            cheek = torch.from_numpy(cheeks[person, list(TARGETS)])
            for r in range(repeats):
                generators = [torch.Generator().manual_seed(1000 * person + 10 * r + j) for j in range(len(TARGETS))]
                mask = random_mask(len(TARGETS), cfg.patches, cfg.mask_ratio, generators)
                predicted = model(tokens, [k], targets, torch.zeros(len(TARGETS), dtype=torch.long), mask)
                error = (predicted - targets).abs().mean(-1)
                total += float((error * mask).sum())
                count += int(mask.sum())
                pixel_error = (unpatchify(predicted, cfg.patch, cfg.image_size) - images).abs().mean(1)
                pixel_mask = unpatchify(mask[..., None].float().expand_as(targets), cfg.patch, cfg.image_size)[:, 0]
                weight = pixel_mask * cheek.float()
                cheek_total += float((pixel_error * weight).sum())
                cheek_count += int(weight.sum())
        out["l1"][k] = total / count
        out["cheek_l1"][k] = cheek_total / max(cheek_count, 1)
    return out


def report(results: dict, seeds: list[int]) -> dict:
    """Prints the table and the paired tests; returns them for the RESULT line."""
    summary = {"methods": {}, "tests": {}}
    print("\nheld-out error over seeds (mean +/- std, lower is better)")
    print(f"{'method':10s} {'inputs':>6s} {'L1':>18s} {'cheek L1':>18s}")
    for method in METHODS:
        summary["methods"][method] = {}
        for k in INPUT_COUNTS:
            row = {}
            for metric in ("l1", "cheek_l1"):
                row[metric] = mean_std([results[method][seed][metric][k] for seed in seeds])
            summary["methods"][method][str(k)] = {m: [round(v, 6) for v in row[m]] for m in row}
            print(f"{method:10s} {k:6d} {row['l1'][0]:10.5f} +/- {row['l1'][1]:.5f} "
                  f"{row['cheek_l1'][0]:10.5f} +/- {row['cheek_l1'][1]:.5f}")
    print(f"\npaired t-tests over {len(seeds)} seeds (Omni-ID minus baseline; negative: Omni-ID lower)")
    for metric in ("l1", "cheek_l1"):
        for baseline in METHODS[1:]:
            for k in INPUT_COUNTS:
                test = paired_t([results["omni_id"][s][metric][k] for s in seeds],
                                [results[baseline][s][metric][k] for s in seeds])
                phrase = verdict(test, "omni_id", baseline)
                summary["tests"][f"{metric}/{baseline}/{k}"] = {
                    "mean_diff": round(test["mean_diff"], 6), "std_diff": round(test["std_diff"], 6),
                    "t": round(test["t"], 3), "p": round(test["p"], 4), "wins": test["wins"], "verdict": phrase}
                print(f"{metric:8s} vs {baseline:9s} k={k}: diff {test['mean_diff']:+.5f} +/- {test['std_diff']:.5f}, "
                      f"t = {test['t']:+.2f}, p = {test['p']:.4f}, Omni-ID lower in {test['wins']}/{test['n']} "
                      f"seeds -> {phrase}")
    falls = {m: sum(results[m][s]["l1"][1] > results[m][s]["l1"][5] for s in seeds) for m in METHODS}
    summary["falls_1_to_5"] = falls
    tests = summary["tests"]
    print("\nVERDICT: at 5 inputs, Omni-ID vs mean pooling: " + tests["l1/mean_pool/5"]["verdict"]
          + "; vs per-photo averaging: " + tests["l1/per_photo/5"]["verdict"]
          + "; cheek L1 vs mean pooling: " + tests["cheek_l1/mean_pool/5"]["verdict"]
          + "; vs per-photo averaging: " + tests["cheek_l1/per_photo/5"]["verdict"]
          + f"; Omni-ID's L1 falls from 1 to 5 inputs in {falls['omni_id']}/{len(seeds)} seeds")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run for CI (checks the machinery, trains nothing)")
    parser.add_argument("--steps", type=int, help="training steps per method and seed (overrides the setting)")
    parser.add_argument("--seeds", type=int, help="number of seeds (overrides the setting)")
    args = parser.parse_args()
    if args.seeds is not None and args.seeds < 2:
        parser.error("--seeds must be at least 2: the paired tests compare methods over seeds")
    s = dict(SETTINGS["quick" if args.quick else "full"])
    s.update({k: v for k, v in (("steps", args.steps), ("seeds", args.seeds)) if v})
    miniature.deterministic()
    seeds = list(range(s["seeds"]))
    print(f"few-to-many miniature ({'quick' if args.quick else 'full'}): {s['train_ids']} training people, "
          f"{s['heldout_ids']} held-out, {s['size']} px, {s['steps']} steps x batch {s['batch']} per method and seed, "
          f"seeds {seeds}, 1 thread", flush=True)
    start = time.perf_counter()
    results = {m: {} for m in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        train_set = IdentityDataset(write_identity_dataset(Path(tmp) / "train", s["train_ids"], 8, s["size"], seed=1))
        root, _, cheeks = write_posed_people(Path(tmp) / "heldout", s["heldout_ids"], s["size"], seed=2)
        heldout = IdentityDataset(root)
        token_fn, tokens, width = patch_tokens(s["size"], s["clip_patch"])
        for seed in seeds:
            for method in METHODS:
                model, trainer = train(method, train_set, token_fn, tokens, width, s, seed)
                results[method][seed] = heldout_error(model, heldout, cheeks, token_fn, s)
                r = results[method][seed]
                print(f"seed {seed} {method:9s}: final train loss {sum(trainer.losses[-20:]) / min(20, trainer.step):.5f}; "
                      "held-out L1 " + ", ".join(f"{k}: {r['l1'][k]:.5f}" for k in INPUT_COUNTS)
                      + "; cheek L1 " + ", ".join(f"{k}: {r['cheek_l1'][k]:.5f}" for k in INPUT_COUNTS), flush=True)
    summary = report(results, seeds)
    print(f"({time.perf_counter() - start:.0f} s)")
    print("RESULT " + json.dumps({"steps": s["steps"], "seeds": len(seeds), **summary}))


if __name__ == "__main__":
    main()
