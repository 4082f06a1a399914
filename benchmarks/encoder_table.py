"""Omni-ID's encoder table in miniature, on the CPU: Omni-ID vs ArcFace, CLIP and ArcFace+CLIP through the
same flow-matching stage, generating held-out people from 1 and 5 photos, scored without any encoder.

Omni-ID appendix A.1 trains every representation "in the same Flow Matching Decoder stage" and
compares identity similarity with 1 to 7 input photos. Here, per seed:

- stage 1: the Omni-ID encoder trains with the masked transformer decoder on the training people
  (few_to_many.train: the project's MTDObjective, few-to-many sampler, 1-3 inputs);
- stage 2 (training/flow_matching.py, FlowMatchingObjective): each representation trains its
  encoder (none for CLIP) and the adapter's per-layer K/V projections against a frozen tiny base
  model (PaletteHost below, on tests/support/tiny_training.py's TinyHost: 16 x 16 latents, two
  attention layers), the same steps, batch and learning rate for all four;
- generation: for each held-out person (benchmarks/miniature.py: photos in a fixed pose schedule,
  photo 0 shows the left cheek only) and k = 1 or 5 input photos, an Euler sampler draws images
  from noise with the adapter's identity keys/values;
- scoring, independent of every encoder: the person's trait colours (skin, hair, each cheek) are
  read back from the generated image: a trait's error is the distance from its colour to the
  nearest generated pixel; identification: the held-out person whose traits fit the image best
  (top-1 among the held-out people; chance = 1 / people).

Stand-ins: CLIP is a fixed patch-pixel feature (few_to_many.patch_tokens); ArcFace is an embedding
of the synthetic traits one view shows (colours and shape, and the colour of a cheek only when
that view shows it), a fixed random projection to 32 dimensions made unit length.

    .venv/bin/python benchmarks/encoder_table.py            # 3 seeds (10-40 min on a 2-core CPU)
    .venv/bin/python benchmarks/encoder_table.py --quick    # 2 seeds, 6 steps, for CI

Last line: RESULT {json}: per method and k the mean and std over seeds of trait error, cheek error,
identification accuracy.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import miniature
from few_to_many import patch_tokens, train as train_mtd
from miniature import HELDOUT_YAWS, TRAITS, mean_std, paired_t, verdict, write_people
from omniid.encoders.omni_id import EncoderConfig, create_encoder
from omniid.guidance.adapter import AdapterConfig, create_adapter
from omniid.training.dataset import FewToManySampler, IdentityDataset, SamplerConfig, load_image
from omniid.training.flow_matching import FlowMatchingObjective
from omniid.training.trainer import TrainConfig, Trainer
from support.tiny_training import TinyHost

SETTINGS = {
    "full": dict(train_ids=200, heldout_ids=16, size=32, mtd_patch=4, clip_patch=8, steps=300, batch=8, targets=4,
                 dim=64, queries=8, lr=2e-3, fm_steps=400, fm_lr=2e-3, seeds=3, samples=4, euler=16),
    "quick": dict(train_ids=24, heldout_ids=8, size=32, mtd_patch=4, clip_patch=8, steps=6, batch=4, targets=4,
                  dim=32, queries=4, lr=2e-3, fm_steps=6, fm_lr=2e-3, seeds=2, samples=2, euler=6),
}
METHODS = ("omni_id", "arcface", "clip", "arcface_clip")
INPUT_COUNTS = (1, 5)
ARCFACE_DIM = 32
GEOMETRY = ("face_w", "face_h", "eye_gap", "eye_size", "nose", "mouth_w", "hair_h")


class PaletteHost(TinyHost):
    """A frozen tiny base model that can generate, but only through its identity attention.

    TinyHost's interface and schedule (epsilon parameterisation, sigma 0.05-2.05), with 16 x 16
    latents (2 x 2 average pooling of a 32 px photo). Its denoiser is, per latent pixel, the
    posterior mean under a prior of narrow colour clusters (variance s^2 = 0.01) whose centres
    its attention layers supply: D = (s^2 x_t + sigma^2 c) / (s^2 + sigma^2), c the colour the
    layers return; queries are fixed random features of (x_t, 1) / (sigma^2 + s^2) (the form of a
    cluster's posterior logit), keys/values the adapter's identity K/V, outputs mapped to colour
    by fixed random weights. An adapter can teach it a person's colours (the palette attention
    selects from), not their layout (nothing in it knows where a pixel is), so the read-back
    below scores colours only."""

    spread = 0.01

    def __init__(self, layers=(32, 32), seed=0):
        super().__init__(layers, seed)
        g = torch.Generator().manual_seed(seed + 100)
        self.w_q = [torch.randn(4, d, generator=g) * 0.1 for d in layers]
        self.w_colour = [torch.randn(d, 3, generator=g) * d ** -0.5 for d in layers]

    def encode(self, images):
        return torch.nn.functional.avg_pool2d(images.permute(0, 3, 1, 2) * 2 - 1, 2)

    def denoise(self, x_t, sigma, identity_kv, text_attention):
        self.text_calls.append(text_attention)
        s2 = sigma.reshape(-1, 1, 1) ** 2
        h = x_t.flatten(2).transpose(1, 2)                                        # (B, P, 3)
        features = torch.cat([h, torch.ones_like(h[..., :1])], -1) / (s2 + self.spread)
        colour = torch.zeros_like(h)
        for w_q, w_colour, (k_id, v_id) in zip(self.w_q, self.w_colour, identity_kv):
            colour = colour + torch.nn.functional.scaled_dot_product_attention(features @ w_q, k_id, v_id) @ w_colour
        denoised = (self.spread * h + s2 * colour) / (self.spread + s2)
        return denoised.transpose(1, 2).reshape(x_t.shape)


def view_traits(traits: dict, yaw: float) -> np.ndarray:
    """What one photo shows of a person: colours, shape, and each cheek's colour only if it is turned
    toward the camera (synthetic_faces.render: side * yaw < -0.2), with a flag for seen."""
    left, right = yaw > 0.2, yaw < -0.2
    parts = [traits["skin"], traits["hair"], traits["eyes"], [traits[g] * 5 for g in GEOMETRY],
             traits["cheek_left"] * left, [float(left)], traits["cheek_right"] * right, [float(right)]]
    return np.concatenate([np.asarray(p, dtype=np.float64).ravel() for p in parts])


def image_key(image: torch.Tensor) -> str:
    return hashlib.sha1(image.contiguous().numpy().tobytes()).hexdigest()


def trait_arcface(datasets: list, people: list[list[dict]], size: int):
    """ArcFace's stand-in: (B, H, W, 3) photos -> (B, 32) unit embeddings of the traits each photo shows.
    The photos are recognised by their pixels (each is one of the datasets' photos)."""
    projection = np.random.default_rng(7).normal(size=(len(view_traits(people[0][0], 0.0)), ARCFACE_DIM))
    table = {}
    for dataset, traits in zip(datasets, people):
        for identity, person in zip(dataset.identities, traits):
            for path, yaw in zip(identity.images, person["yaws"]):
                embedding = view_traits(person, yaw) @ projection
                table[image_key(load_image(path, size))] = embedding / np.linalg.norm(embedding)

    def embed(images: torch.Tensor) -> torch.Tensor:
        return torch.tensor(np.stack([table[image_key(i.permute(2, 0, 1))] for i in images]), dtype=torch.float32)
    return embed


def stage2(method: str, omni_encoder, dataset, host, token_fn, arcface_fn, tokens, width, s, seed):
    """The flow-matching stage for one representation; returns the trained AdapterTraining module."""
    baseline = dict(clip_dim=width, tokens_per_image=tokens, dim=s["dim"], num_queries=s["queries"], num_heads=4,
                    cross_depth=2, self_depth=1, mlp_ratio=2.0, id_dim=ARCFACE_DIM, id_hidden=2 * s["dim"])
    encoder = {"omni_id": omni_encoder, "clip": None}.get(method)
    if method in ("arcface", "arcface_clip"):
        encoder = create_encoder(EncoderConfig(architecture=method, **baseline), seed=seed)
    adapter = create_adapter(AdapterConfig(family="unet", token_dim=width if method == "clip" else s["dim"],
                                           layer_dims=host.layers, embeds_kind=method), seed=seed + 2)
    sampler = FewToManySampler(dataset, SamplerConfig(targets=s["targets"]), seed=seed)
    objective = FlowMatchingObjective(encoder, adapter, host, sampler, token_fn, seed=seed, clip_size=s["size"],
                                      method=method, arcface_fn=arcface_fn, face_size=s["size"])
    trainer = Trainer(objective, TrainConfig(steps=s["fm_steps"], batch=s["batch"], lr=s["fm_lr"], save_every=0,
                                             seed=seed))
    trainer.run()
    return objective, trainer


@torch.no_grad()
def generate(objective, host, photos: list, samples: int, euler: int, seed: int) -> torch.Tensor:
    """(samples, 3, 16, 16) colours in [0, 1] drawn with Euler steps from noise, conditioned on ``photos``."""
    module = objective.module.eval()
    tokens, counts = objective.cache.padded_tokens([photos]) if module.method != "arcface" else (None, [len(photos)])
    arcface = objective.arcface.padded_tokens([photos])[0] if objective.arcface is not None else None
    layer_kv, _ = module(tokens, counts, arcface)
    kv = [(k.expand(samples, -1, -1), v.expand(samples, -1, -1)) for k, v in layer_kv]
    sigmas = host.sigma_at(torch.linspace(0.0, 1.0, euler + 1).clamp(0.001, 0.999))
    shape = (samples, 3, host.image_size // 2, host.image_size // 2)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * sigmas[0]
    for i in range(euler):
        sigma = sigmas[i].expand(samples)
        denoised = host.denoise(x, sigma, kv, text_attention=True)
        if i == euler - 1:
            x = denoised
        else:
            x = x + (x - denoised) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
    return ((x + 1) / 2).clamp(0, 1)


def trait_distances(images: torch.Tensor, people: list[dict]) -> np.ndarray:
    """(images, people, traits): distance from each person's trait colour to the image's nearest pixel."""
    pixels = images.flatten(2).transpose(1, 2).double().numpy()                 # (I, P, 3)
    colours = np.array([[person[t] for t in TRAITS] for person in people])      # (N, T, 3)
    d = np.linalg.norm(pixels[:, None, None, :, :] - colours[None, :, :, None, :], axis=-1)   # (I, N, T, P)
    return d.min(-1)


def score(objective, host, heldout, people: list[dict], s, seed: int) -> dict:
    """Per k: the own trait error, the cheek error and the identification accuracy over held-out people."""
    out = {}
    cheek = [TRAITS.index("cheek_left"), TRAITS.index("cheek_right")]
    for k in INPUT_COUNTS:
        trait, cheeks, hits = [], [], []
        for i, identity in enumerate(heldout.identities):
            images = generate(objective, host, identity.images[:k], s["samples"], s["euler"], 1000 * seed + i)
            d = trait_distances(images, people)                                  # (samples, N, T)
            trait.append(d[:, i].mean())
            cheeks.append(d[:, i, cheek].mean())
            hits.append(float((d.mean(-1).argmin(-1) == i).mean()))
        out[k] = {"trait": float(np.mean(trait)), "cheek": float(np.mean(cheeks)), "id_acc": float(np.mean(hits))}
    return out


def reference(host, heldout, people: list[dict]) -> dict:
    """The same read-back on the held-out people's own target photos (5-7, side by side as one image, so both
    cheeks show) through the host's encoding: what a perfect generation would score."""
    trait, cheeks, hits = [], [], []
    for i, identity in enumerate(heldout.identities):
        photos = torch.cat([load_image(p, host.image_size) for p in identity.images[5:8]], 2).permute(1, 2, 0)
        d = trait_distances((host.encode(photos[None]) + 1) / 2, people)
        trait.append(d[:, i].mean())
        cheeks.append(d[:, i, 2:].mean())
        hits.append(float((d.mean(-1).argmin(-1) == i).mean()))
    return {"trait": float(np.mean(trait)), "cheek": float(np.mean(cheeks)), "id_acc": float(np.mean(hits))}


def report(results: dict, seeds: list[int], real: dict, people: int) -> dict:
    summary = {"methods": {}, "tests": {}}
    print(f"\nheld-out people generated from k photos, traits read back (mean +/- std over {len(seeds)} seeds); "
          f"trait/cheek error: lower is better; identification: higher, chance {1 / people:.3f}")
    print(f"{'method':13s} {'k':>2s} {'trait error':>18s} {'cheek error':>18s} {'identification':>18s}")
    for method in METHODS:
        summary["methods"][method] = {}
        for k in INPUT_COUNTS:
            row = {m: mean_std([results[method][sd][k][m] for sd in seeds]) for m in ("trait", "cheek", "id_acc")}
            summary["methods"][method][str(k)] = {m: [round(v, 6) for v in row[m]] for m in row}
            print(f"{method:13s} {k:2d} " + " ".join(f"{row[m][0]:10.4f} +/- {row[m][1]:.4f}"
                                                      for m in ("trait", "cheek", "id_acc")))
    print(f"{'real photos':13s} {'-':>2s} {real['trait']:10.4f}{'':11s} {real['cheek']:10.4f}{'':11s} "
          f"{real['id_acc']:10.4f}   (targets 5-7 side by side through the host's encoding)")
    print(f"\npaired t-tests over {len(seeds)} seeds on the trait error (Omni-ID minus baseline; negative: Omni-ID lower)")
    for k in INPUT_COUNTS:
        for baseline in METHODS[1:]:
            test = paired_t([results["omni_id"][sd][k]["trait"] for sd in seeds],
                            [results[baseline][sd][k]["trait"] for sd in seeds])
            phrase = verdict(test, "omni_id", baseline)
            summary["tests"][f"trait/{baseline}/{k}"] = {"mean_diff": round(test["mean_diff"], 6), "p": round(test["p"], 4),
                                                         "wins": test["wins"], "verdict": phrase}
            print(f"k={k} vs {baseline:12s}: diff {test['mean_diff']:+.4f} +/- {test['std_diff']:.4f}, p = {test['p']:.4f}, "
                  f"Omni-ID lower in {test['wins']}/{test['n']} seeds -> {phrase}")
    for method in METHODS:
        test = paired_t([results[method][sd][5]["trait"] for sd in seeds], [results[method][sd][1]["trait"] for sd in seeds])
        phrase = verdict(test, "5 photos", "1 photo")
        summary["tests"][f"few_to_many/{method}"] = {"mean_diff": round(test["mean_diff"], 6), "p": round(test["p"], 4),
                                                     "wins": test["wins"], "verdict": phrase}
        print(f"{method:13s} 5 vs 1 photos: diff {test['mean_diff']:+.4f} +/- {test['std_diff']:.4f}, "
              f"p = {test['p']:.4f}, 5 lower in {test['wins']}/{test['n']} seeds -> {phrase}")
    order = sorted(METHODS, key=lambda m: summary["methods"][m]["5"]["trait"][0])
    summary["order_at_5"] = order
    print("\nORDER at 5 photos (trait error, best first): " + " < ".join(order)
          + "; the paper's (ID similarity, MFHQ, 5 inputs): omni_id < clip < arcface_clip < arcface")
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny run for CI (checks the machinery, trains nothing)")
    parser.add_argument("--seeds", type=int, help="number of seeds (overrides the setting)")
    parser.add_argument("--steps", type=int, help="stage-1 steps per seed (overrides the setting)")
    parser.add_argument("--fm-steps", type=int, help="stage-2 steps per method and seed (overrides the setting)")
    args = parser.parse_args()
    if args.seeds is not None and args.seeds < 2:
        parser.error("--seeds must be at least 2: the paired tests compare methods over seeds")
    s = dict(SETTINGS["quick" if args.quick else "full"])
    s.update({k: v for k, v in (("seeds", args.seeds), ("steps", args.steps), ("fm_steps", args.fm_steps)) if v})
    miniature.deterministic()
    seeds = list(range(s["seeds"]))
    print(f"encoder table miniature ({'quick' if args.quick else 'full'}): {s['train_ids']} training people, "
          f"{s['heldout_ids']} held-out, {s['size']} px; stage 1 {s['steps']} steps, stage 2 {s['fm_steps']} steps "
          f"x batch {s['batch']} per method; {s['samples']} images per person and k, {s['euler']} Euler steps; "
          f"seeds {seeds}, 1 thread", flush=True)
    start = time.perf_counter()
    host = PaletteHost()
    results = {m: {} for m in METHODS}
    with tempfile.TemporaryDirectory() as tmp:
        train_root, train_people, _ = write_people(Path(tmp) / "train", s["train_ids"], s["size"], seed=1)
        heldout_root, heldout_people, _ = write_people(Path(tmp) / "heldout", s["heldout_ids"], s["size"], seed=2,
                                                       yaws=HELDOUT_YAWS)
        train_set, heldout = IdentityDataset(train_root), IdentityDataset(heldout_root)
        token_fn, tokens, width = patch_tokens(s["size"], s["clip_patch"])
        arcface_fn = trait_arcface([train_set, heldout], [train_people, heldout_people], s["size"])
        real = reference(host, heldout, heldout_people)
        for seed in seeds:
            mtd, _ = train_mtd("omni_id", train_set, token_fn, tokens, width, s, seed)
            for method in METHODS:
                objective, trainer = stage2(method, mtd.encoder, train_set, host, token_fn, arcface_fn, tokens, width,
                                            s, seed)
                results[method][seed] = score(objective, host, heldout, heldout_people, s, seed)
                r = results[method][seed]
                print(f"seed {seed} {method:12s}: stage-2 loss {sum(trainer.losses[-20:]) / min(20, trainer.step):.4f}; "
                      + "; ".join(f"k={k} trait {r[k]['trait']:.4f} cheek {r[k]['cheek']:.4f} id {r[k]['id_acc']:.3f}"
                                  for k in INPUT_COUNTS), flush=True)
    summary = report(results, seeds, real, s["heldout_ids"])
    print(f"({time.perf_counter() - start:.0f} s)")
    print("RESULT " + json.dumps({"seeds": len(seeds), "fm_steps": s["fm_steps"], "real_photos": real, **summary}))


if __name__ == "__main__":
    main()
