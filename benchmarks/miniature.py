"""What the two miniature benchmarks (few_to_many.py, encoder_table.py) share: determinism, held-out
people photographed in fixed poses, and statistics over seeds (mean, std, a paired t-test).

Held-out people are the procedural identities of tests/support/synthetic_faces.py, photographed
in a fixed pose schedule so that what each input shows is known: a cheek's colour shows only
when the head turns that cheek toward the camera, so photo 0 (turned right: left cheek) holds
one cheek colour, photo 1 (turned left) the other, photo 2 (frontal) neither, photos 3-4 each
one again. One photo therefore cannot hold the whole identity; three can.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

import support_path  # noqa: F401  (test assets)
from support.synthetic_faces import identity_traits, render

# yaw per photo: inputs 0-4, then targets 5-7 (a right-cheek view, a left-cheek view, a frontal one)
HELDOUT_YAWS = (0.75, -0.75, 0.0, 0.45, -0.45, -0.8, 0.8, 0.1)
TRAITS = ("skin", "hair", "cheek_left", "cheek_right")           # the colours trait read-back scores


def deterministic() -> None:
    """Bitwise-repeatable CPU runs: one thread, deterministic kernels (and no machine dependence)."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)


def write_people(root: Path, people: int, size: int, seed: int, yaws=None) -> tuple[Path, list[dict], np.ndarray]:
    """``root/id_XXXX/NN.png``: ``people`` procedural people, 8 photos each, in the ``yaws`` schedule
    (random poses when None). Returns the root, each person's traits with the yaw of each photo
    (``traits["yaws"]``), and the (people, 8, size, size) bool mask of the cheek pixels per photo."""
    from PIL import Image
    root = Path(root)
    rng = np.random.default_rng(seed)
    everyone, cheeks = [], np.zeros((people, len(HELDOUT_YAWS), size, size), dtype=bool)
    for i in range(people):
        traits = identity_traits(rng)
        folder = root / f"id_{i:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        photo_yaws = list(yaws) if yaws is not None else rng.uniform(-1, 1, len(HELDOUT_YAWS)).tolist()
        for j, yaw in enumerate(photo_yaws):
            pose = dict(yaw=yaw, pitch=rng.uniform(-0.4, 0.4), smile=rng.uniform(0, 1),
                        mouth_open=rng.uniform(0, 1) ** 2, eye_closure=rng.uniform(0, 0.7) ** 2,
                        background=rng.uniform(0.35, 0.65) + rng.uniform(-0.05, 0.05, 3))
            pixels = render(traits, size, **pose)
            marked = render({**traits, "cheek_left": np.full(3, -1.0), "cheek_right": np.full(3, -1.0)}, size, **pose)
            cheeks[i, j] = (marked < 0).any(-1)
            Image.fromarray((pixels * 255).round().astype(np.uint8)).save(folder / f"{j:02d}.png")
        everyone.append({**traits, "yaws": photo_yaws})
    return root, everyone, cheeks


def write_posed_people(root: Path, people: int, size: int, seed: int) -> tuple[Path, list[dict], np.ndarray]:
    """Held-out people in the HELDOUT_YAWS schedule (see the module)."""
    return write_people(root, people, size, seed, HELDOUT_YAWS)


# -- statistics over seeds ---------------------------------------------------------------------

def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1)."""
    values = np.asarray(values, dtype=np.float64)
    return float(values.mean()), float(values.std(ddof=1)) if len(values) > 1 else 0.0


def _betacf(a: float, b: float, x: float) -> float:
    """Continued fraction of the regularised incomplete beta function (modified Lentz)."""
    tiny, c, d = 1e-300, 1.0, 1.0 - (a + b) * x / (a + 1.0)
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        for numerator in (m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m)),
                          -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))):
            d = 1.0 + numerator * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + numerator / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularised incomplete beta function."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):
        return front * _betacf(a, b, x) / a
    return 1.0 - front * _betacf(b, a, 1.0 - x) / b


def paired_t(a, b) -> dict:
    """Paired t-test of a - b over seeds: mean difference, its std, t, two-sided p, and wins (a < b)."""
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    n = len(d)
    mean, sd = mean_std(d)
    if n < 2:
        t, p = math.nan, math.nan
    elif sd == 0.0:
        t = 0.0 if mean == 0.0 else math.copysign(math.inf, mean)
        p = 1.0 if mean == 0.0 else 0.0
    else:
        t = mean / (sd / math.sqrt(n))
        p = incomplete_beta((n - 1) / 2.0, 0.5, (n - 1) / ((n - 1) + t * t))
    return {"n": n, "mean_diff": mean, "std_diff": sd, "t": t, "p": p, "wins": int((d < 0).sum())}


def verdict(test: dict, better: str, worse: str, alpha: float = 0.05) -> str:
    """One phrase: whether ``better`` (the a of paired_t, lower is better) beats ``worse`` beyond the spread."""
    if not test["p"] == test["p"]:
        return "no test (fewer than 2 seeds)"
    if test["p"] < alpha:
        winner = better if test["mean_diff"] < 0 else worse
        return f"{winner} lower, significant (p = {test['p']:.3g} < {alpha})"
    return f"no significant difference (p = {test['p']:.3g} >= {alpha})"
