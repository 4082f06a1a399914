"""Procedural identities for training tests and the few-to-many miniature.

An identity is a set of fixed traits (skin, hair and eye colours, face width and
height, eye spacing and size, nose length, mouth width, a colour on each cheek); a photo of it
adds a pose (yaw, pitch) and an expression (smile, mouth opening, eye closure) and a
background. Pose moves and foreshortens the features, and a cheek's colour shows only
when the head turns that cheek toward the camera (a photo shows one cheek at most);
expression reshapes the mouth and eyes. No single photo shows every trait, so more
photos pin the identity down better, which is what the few-to-many claim is about.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


def identity_traits(rng: np.random.Generator) -> dict:
    return {
        "skin": rng.uniform(0.35, 0.95, 3), "hair": rng.uniform(0.0, 0.8, 3), "eyes": rng.uniform(0.0, 0.7, 3),
        "face_w": rng.uniform(0.28, 0.38), "face_h": rng.uniform(0.36, 0.46), "eye_gap": rng.uniform(0.09, 0.16),
        "eye_size": rng.uniform(0.025, 0.05), "nose": rng.uniform(0.05, 0.12), "mouth_w": rng.uniform(0.07, 0.14),
        "hair_h": rng.uniform(0.05, 0.2), "cheek_left": rng.uniform(0, 1, 3), "cheek_right": rng.uniform(0, 1, 3),
    }


def render(traits: dict, size: int, yaw: float, pitch: float, smile: float, mouth_open: float, eye_closure: float,
           background: np.ndarray) -> np.ndarray:
    """(size, size, 3) float in [0, 1]; yaw/pitch in [-1, 1] move features across the face."""
    ys, xs = np.mgrid[0:size, 0:size] / size - 0.5
    image = np.broadcast_to(background, (size, size, 3)).copy()

    def ellipse(cx, cy, rx, ry):
        return ((xs - cx) / max(rx, 1e-3)) ** 2 + ((ys - cy) / max(ry, 1e-3)) ** 2 <= 1.0

    t = traits
    fw, fh = t["face_w"] * (1 - 0.15 * abs(yaw)), t["face_h"] * (1 - 0.1 * abs(pitch))
    hair = ellipse(0, -fh * 0.35 - t["hair_h"] * 0.3, fw * 1.05, fh * 0.55 + t["hair_h"] * 0.5)
    image[hair] = t["hair"]
    face = ellipse(0, 0.02, fw, fh)
    image[face] = t["skin"]
    shift_x, shift_y = 0.12 * yaw, 0.08 * pitch
    squeeze = 1 - 0.35 * abs(yaw)
    for side in (-1, 1):
        ex = side * t["eye_gap"] * squeeze + shift_x
        ey = -0.06 + shift_y
        image[ellipse(ex, ey, t["eye_size"] * squeeze, t["eye_size"] * (1 - 0.8 * eye_closure) * 0.7)] = t["eyes"]
    nose = (np.abs(xs - shift_x * 1.2) < 0.015) & (ys > -0.02 + shift_y) & (ys < -0.02 + shift_y + t["nose"])
    image[nose] = t["skin"] * 0.7
    my = 0.02 + shift_y + t["nose"] + 0.04
    mouth_w = t["mouth_w"] * squeeze * (1 + 0.3 * smile)
    curve = ys - my + smile * 0.8 * ((xs - shift_x) ** 2) / max(mouth_w, 1e-3) - smile * 0.02
    mouth = (np.abs(xs - shift_x) < mouth_w) & (np.abs(curve) < 0.01 + 0.05 * mouth_open)
    image[mouth] = np.array([0.55, 0.1, 0.15])
    # each cheek has its own colour, seen only when the head turns to show that side
    for side, colour in ((-1, t["cheek_left"]), (1, t["cheek_right"])):
        if side * yaw < -0.2:
            cheek = ellipse(side * fw * 0.5 + shift_x * 1.5, 0.06 + shift_y, 0.09 * (0.5 + abs(yaw)), 0.11) & face
            image[cheek] = colour
    return image


def random_photo(traits: dict, rng: np.random.Generator, size: int) -> np.ndarray:
    return render(traits, size, yaw=rng.uniform(-1, 1), pitch=rng.uniform(-0.8, 0.8), smile=rng.uniform(0, 1),
                  mouth_open=rng.uniform(0, 1) ** 2, eye_closure=rng.uniform(0, 0.7) ** 2,
                  background=rng.uniform(0.35, 0.65) + rng.uniform(-0.05, 0.05, 3))


def write_identity_dataset(root: Path, identities: int, photos: int = 8, size: int = 64, seed: int = 0) -> Path:
    """``root/id_XXXX/NN.png``: ``identities`` procedural people with ``photos`` photos each."""
    from PIL import Image
    root = Path(root)
    rng = np.random.default_rng(seed)
    for i in range(identities):
        traits = identity_traits(rng)
        folder = root / f"id_{i:04d}"
        folder.mkdir(parents=True, exist_ok=True)
        for j in range(photos):
            pixels = (random_photo(traits, rng, size) * 255).round().astype(np.uint8)
            Image.fromarray(pixels).save(folder / f"{j:02d}.png")
    return root
