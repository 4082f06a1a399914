"""Omni-ID's few-to-many claim in miniature, on the CPU: more input photos, better reconstruction.

Procedural identities (omniid/synthetic_faces.py: traits fixed per person, pose and
expression per photo, a colour on each cheek that only shows when the head turns that
cheek toward the camera) are split into training and held-out people. Two small
encoders of the same architecture train the same number of steps (Omni-ID's count in
the time budget) with the same masked transformer decoder (95% of patches masked, L1), the
few-to-many sampler (1-3 inputs, all 8 photos as targets) and the same seed:

- Omni-ID: the photos' tokens concatenated as keys/values of learned queries;
- mean pooling: the same encoder run on each photo alone, its outputs averaged over the
  photos (what packs without a multi-image encoder do with several photos).

Held-out error: for each held-out person, k = 1, 3, 5 of photos 0-4 are the inputs and
photos 5-7 the targets (the same for every k), with fixed masks; mean L1 over masked
patches. The feature extractor stands in for CLIP: each 14 px patch's pixels and its
position, fixed. Goal: the error falls with k, and Omni-ID beats mean pooling at k = 5.

    .venv/bin/python benchmarks/few_to_many.py            # 4 minutes of Omni-ID training, ~9 minutes in all
    .venv/bin/python benchmarks/few_to_many.py --quick    # the same experiment, smaller, < 1 minute

Last line: RESULT {"heldout_error": {"1": e1, "3": e3, "5": e5}, "heldout_error_mean_pool": e}.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn as nn

import support_path  # noqa: F401  (test assets)
from omniid.encoders.omni_id import EncoderConfig, create_encoder
from omniid.training.dataset import FewToManySampler, IdentityDataset, SamplerConfig
from omniid.training.mtd import ImageCache, MTDConfig, MTDModel, MTDObjective, create_decoder, patchify, random_mask
from omniid.training.trainer import TrainConfig, Trainer
from support.synthetic_faces import write_identity_dataset

SETTINGS = {
    "full": dict(train_ids=400, heldout_ids=40, size=56, mtd_patch=7, seconds=240, batch=8, dim=128, queries=16),
    "quick": dict(train_ids=80, heldout_ids=16, size=56, mtd_patch=7, seconds=12, batch=8, dim=96, queries=16),
}
INPUT_COUNTS = (1, 3, 5)


def patch_tokens(size: int, patch: int = 14):
    """(B, S, S, 3) -> (B, 1 + P, 3 * patch^2 + P): each patch's pixels and a one-hot position,
    plus a mean token in CLIP's class-token place."""
    count = (size // patch) ** 2

    def tokens(images):
        images = images.permute(0, 3, 1, 2)
        if images.shape[-1] != size:
            images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
        pixels = patchify(images * 2 - 1, patch)
        position = torch.eye(count).expand(pixels.shape[0], -1, -1)
        body = torch.cat([pixels, position], -1)
        return torch.cat([body.mean(1, keepdim=True), body], 1)

    return tokens, count + 1, 3 * patch * patch + count


class MeanPoolEncoder(nn.Module):
    """The same encoder on each photo alone, outputs averaged over the real photos."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.inner = encoder
        self.config = encoder.config

    def forward(self, clip_tokens, counts=None, **_):
        b, n = clip_tokens.shape[:2]
        counts = counts or [n] * b
        each = self.inner(clip_tokens.reshape(b * n, 1, *clip_tokens.shape[2:]))
        each = each.reshape(b, n, *each.shape[1:])
        valid = (torch.arange(n)[None] < torch.tensor(counts)[:, None]).float()[..., None, None]
        return (each * valid).sum(1) / valid.sum(1)


def train(kind: str, dataset, token_fn, tokens, width, s, seed=0, steps=None):
    config = EncoderConfig(clip_dim=width, tokens_per_image=tokens, dim=s["dim"], num_queries=s["queries"],
                           num_heads=4, cross_depth=2, self_depth=1, mlp_ratio=2.0)
    encoder = create_encoder(config, seed=seed)
    if kind == "mean_pool":
        encoder = MeanPoolEncoder(encoder)
    decoder = create_decoder(MTDConfig(image_size=s["size"], patch=s["mtd_patch"], dim=s["dim"], num_heads=4, cross_depth=2,
                                       self_depth=1, mlp_ratio=2.0, id_dim=s["dim"]), seed=seed + 1)
    objective = MTDObjective(encoder, decoder, FewToManySampler(dataset, SamplerConfig(), seed=seed), token_fn,
                             seed=seed, clip_size=s["size"])
    trainer = Trainer(objective, TrainConfig(steps=10**9, batch=s["batch"], lr=1e-3, save_every=0, seed=seed))
    start = time.perf_counter()
    while (trainer.step < steps) if steps else (time.perf_counter() - start < s["seconds"]):
        trainer.train_step()
    return objective.module, trainer, time.perf_counter() - start


@torch.no_grad()
def heldout_error(model: MTDModel, dataset, token_fn, s, repeats: int = 4) -> dict[int, float]:
    cfg = model.decoder.config
    cache = ImageCache(token_fn, s["size"])
    model.eval()
    out = {}
    for k in INPUT_COUNTS:
        errors = []
        for person, identity in enumerate(dataset.identities):
            tokens = cache.clip_tokens(identity.images[:k])[None]
            targets = patchify(torch.stack([cache.image(p, cfg.image_size) for p in identity.images[5:8]]), cfg.patch)
            for r in range(repeats):
                generators = [torch.Generator().manual_seed(1000 * person + 10 * r + j) for j in range(3)]
                mask = random_mask(3, cfg.patches, cfg.mask_ratio, generators)
                predicted = model(tokens, [k], targets, torch.zeros(3, dtype=torch.long), mask)
                error = (predicted - targets).abs().mean(-1)
                errors.append(float((error * mask).sum() / mask.sum()))
        out[k] = sum(errors) / len(errors)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer people, 12 s of training for Omni-ID")
    parser.add_argument("--seconds", type=float, help="training time per encoder (overrides the setting)")
    args = parser.parse_args()
    s = dict(SETTINGS["quick" if args.quick else "full"])
    if args.seconds:
        s["seconds"] = args.seconds
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        train_set = IdentityDataset(write_identity_dataset(Path(tmp) / "train", s["train_ids"], 8, s["size"], seed=1))
        heldout = IdentityDataset(write_identity_dataset(Path(tmp) / "heldout", s["heldout_ids"], 8, s["size"], seed=2))
        token_fn, tokens, width = patch_tokens(s["size"])
        results, steps = {}, None
        for kind in ("omni_id", "mean_pool"):      # Omni-ID sets the step count, the baseline gets as many
            model, trainer, seconds = train(kind, train_set, token_fn, tokens, width, s, steps=steps)
            steps = trainer.step
            results[kind] = heldout_error(model, heldout, token_fn, s)
            print(f"{kind:9s}: {trainer.step} steps in {seconds:.0f} s, final train loss "
                  f"{sum(trainer.losses[-20:]) / min(20, len(trainer.losses)):.4f}; held-out L1 "
                  + ", ".join(f"{k} inputs {e:.4f}" for k, e in results[kind].items()), flush=True)
    omni, pool = results["omni_id"], results["mean_pool"]
    falls = omni[1] > omni[3] > omni[5]
    print(f"error falls with more inputs: {falls}; Omni-ID vs mean pooling at 5 inputs: "
          f"{omni[5]:.4f} vs {pool[5]:.4f} ({'better' if omni[5] < pool[5] else 'NOT better'})")
    print("RESULT " + json.dumps({"heldout_error": {str(k): round(v, 5) for k, v in omni.items()},
                                  "heldout_error_mean_pool": round(pool[5], 5),
                                  "heldout_error_mean_pool_by_inputs": {str(k): round(v, 5) for k, v in pool.items()}}))


if __name__ == "__main__":
    main()
