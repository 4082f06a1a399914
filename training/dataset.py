"""Identity datasets and the few-to-many sampler.

Layout: one folder per identity under a root, any number of photos in each (8 in the
paper: MFHQ). Each training sample is one identity: a few input photos (1-3) and its
targets (all 8). The sampler is a pure function of (seed, step), so a resumed run
draws exactly what an uninterrupted one would, and every process of a distributed run
agrees on the global batch without talking.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
SAMPLER_MODES = ("few_to_many", "eight_to_eight", "one_to_one")


class DatasetError(ValueError):
    """A dataset folder that cannot be trained on; the message says why."""


@dataclass
class Identity:
    name: str
    images: list[Path]


class IdentityDataset:
    """Identities from ``root/<identity>/<photo>``; folders with fewer than ``min_images`` are left out."""

    def __init__(self, root: str | os.PathLike, min_images: int = 2):
        self.root = Path(root)
        if not self.root.is_dir():
            raise DatasetError(f"dataset folder {self.root} does not exist")
        self.identities: list[Identity] = []
        self.left_out: list[str] = []
        for folder in sorted(p for p in self.root.iterdir() if p.is_dir()):
            images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
            if len(images) >= min_images:
                self.identities.append(Identity(folder.name, images))
            else:
                self.left_out.append(folder.name)
        if not self.identities:
            raise DatasetError(f"{self.root} has no identity folder with at least {min_images} photos "
                               "(expected one sub-folder of photos per person)")

    def __len__(self) -> int:
        return len(self.identities)

    def describe(self) -> str:
        counts = [len(i.images) for i in self.identities]
        text = f"{len(self)} identities, {sum(counts)} photos ({min(counts)}-{max(counts)} per identity) in {self.root}"
        if self.left_out:
            text += f"; left out (too few photos): {', '.join(self.left_out)}"
        return text


def load_image(path: Path, size: int) -> torch.Tensor:
    """A photo as (3, size, size) float in [0, 1]: centre square crop, then resize."""
    from PIL import Image, ImageOps
    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        side = min(image.size)
        left, top = (image.width - side) // 2, (image.height - side) // 2
        image = image.crop((left, top, left + side, top + side)).resize((size, size), Image.Resampling.BICUBIC)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1).float().div(255.0)


@dataclass(frozen=True)
class SamplerConfig:
    mode: str = "few_to_many"
    inputs_min: int = 1
    inputs_max: int = 3
    targets: int = 8

    def __post_init__(self):
        if self.mode not in SAMPLER_MODES:
            raise ValueError(f"sampler mode must be one of {SAMPLER_MODES}, not {self.mode!r}")
        if not 1 <= self.inputs_min <= self.inputs_max:
            raise ValueError(f"inputs range {self.inputs_min}-{self.inputs_max} is empty or below 1")
        if self.targets < 1:
            raise ValueError("targets must be >= 1")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Sample:
    identity: int
    inputs: list[int]          # photo indices within the identity
    targets: list[int]


class FewToManySampler:
    """Draws identities and their input/target photos for a step.

    few_to_many: k ~ U{inputs_min..inputs_max} inputs, ``targets`` targets (all photos when
    an identity has that many; inputs are among them, as in the paper). eight_to_eight:
    ``targets`` photos are both inputs and targets. one_to_one: one photo reconstructs itself.
    """

    def __init__(self, dataset: IdentityDataset, config: SamplerConfig, seed: int = 0):
        self.dataset, self.config, self.seed = dataset, config, seed

    def sample(self, step: int, count: int) -> list[Sample]:
        rng = np.random.default_rng([self.seed, step])
        n = len(self.dataset)
        order = np.concatenate([rng.permutation(n) for _ in range(-(-count // n))])[:count]
        out = []
        for identity in order:
            photos = len(self.dataset.identities[identity].images)
            c = self.config
            if c.mode == "one_to_one":
                chosen = [int(rng.integers(photos))]
                out.append(Sample(int(identity), chosen, chosen))
                continue
            targets = sorted(rng.choice(photos, size=min(c.targets, photos), replace=False).tolist())
            if c.mode == "eight_to_eight":
                out.append(Sample(int(identity), list(targets), targets))
                continue
            k = int(rng.integers(c.inputs_min, min(c.inputs_max, len(targets)) + 1))
            inputs = sorted(rng.choice(targets, size=k, replace=False).tolist())
            out.append(Sample(int(identity), inputs, targets))
        return out
