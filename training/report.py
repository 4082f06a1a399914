"""The similarity report image: each generated image with its scores, and the references."""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

THUMB = 192


def _thumb(image: torch.Tensor) -> Image.Image:
    array = (image[..., :3].detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    picture = Image.fromarray(array)
    picture.thumbnail((THUMB, THUMB))
    canvas = Image.new("RGB", (THUMB, THUMB), (32, 32, 32))
    canvas.paste(picture, ((THUMB - picture.width) // 2, (THUMB - picture.height) // 2))
    return canvas


def render_report(generated: torch.Tensor, references: torch.Tensor, lines: Sequence[Sequence[str]],
                  title: str, summary: Sequence[str]) -> torch.Tensor:
    """(1, H, W, 3) report: a row of generated thumbnails with their score lines under each,
    a row of reference thumbnails, a title and summary lines."""
    font = ImageFont.load_default()
    columns = max(len(generated), len(references), 1)
    text_h = 14 * max((len(l) for l in lines), default=1) + 6
    header = 16 * (1 + len(summary)) + 8
    width = columns * (THUMB + 8) + 8
    height = header + THUMB + text_h + 24 + THUMB + 8
    canvas = Image.new("RGB", (width, height), (20, 20, 20))
    draw = ImageDraw.Draw(canvas)
    draw.text((8, 6), title, fill=(255, 255, 255), font=font)
    for i, line in enumerate(summary):
        draw.text((8, 22 + 16 * i), line, fill=(200, 220, 255), font=font)
    for i, image in enumerate(generated):
        x = 8 + i * (THUMB + 8)
        canvas.paste(_thumb(image), (x, header))
        for j, text in enumerate(lines[i] if i < len(lines) else ()):
            draw.text((x + 2, header + THUMB + 3 + 14 * j), text, fill=(230, 230, 230), font=font)
    y = header + THUMB + text_h
    draw.text((8, y + 4), "references", fill=(180, 180, 180), font=font)
    for i, image in enumerate(references):
        canvas.paste(_thumb(image), (8 + i * (THUMB + 8), y + 20))
    return torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255.0)[None]


def score_lines(similarity: Optional[float], same: Optional[bool], clip_i: Optional[float],
                clip_t: Optional[float]) -> list[str]:
    lines = ["ID: no face" if similarity is None else f"ID {similarity:.3f} {'same' if same else 'different'}"]
    if clip_i is not None:
        lines.append(f"CLIP-I {clip_i:.3f}")
    if clip_t is not None:
        lines.append(f"CLIP-T {clip_t:.3f}")
    return lines


def loss_plot(losses: Sequence[float], title: str, width: int = 640, height: int = 360) -> torch.Tensor:
    """A line chart of the loss per step (and its running mean) as an IMAGE (1, H, W, 3)."""
    canvas = Image.new("RGB", (width, height), (24, 26, 32))
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    left, right, top, bottom = 56, width - 12, 28, height - 28
    draw.text((8, 6), title, fill=(255, 255, 255), font=font)
    values = np.asarray(list(losses), dtype=np.float64)
    if len(values) == 0:
        draw.text((left, top + 10), "no steps yet", fill=(200, 200, 200), font=font)
    else:
        low, high = float(values.min()), float(values.max())
        span = high - low or 1.0
        def xy(i, v):
            x = left + (right - left) * (i / max(len(values) - 1, 1))
            return x, bottom - (bottom - top) * (v - low) / span
        draw.rectangle((left, top, right, bottom), outline=(90, 90, 100))
        for frac in (0.0, 0.5, 1.0):
            y = bottom - (bottom - top) * frac
            draw.text((4, y - 6), f"{low + span * frac:.4g}", fill=(170, 170, 180), font=font)
        draw.line([xy(i, v) for i, v in enumerate(values)], fill=(120, 160, 255), width=1)
        window = max(1, len(values) // 20)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        if len(smooth) > 1:
            draw.line([xy(i + window - 1, v) for i, v in enumerate(smooth)], fill=(255, 190, 80), width=2)
        draw.text((left, bottom + 8), f"step 1 .. {len(values)}   last {values[-1]:.5g}   "
                                      f"mean of last {window}: {values[-window:].mean():.5g}",
                  fill=(200, 200, 200), font=font)
    return torch.from_numpy(np.asarray(canvas).copy()).float().div(255.0)[None]


def captioned(image: torch.Tensor, lines: Sequence[str], width: int = 512) -> torch.Tensor:
    """(1, H, W, 3) image scaled to ``width`` with ``lines`` of text on a dark band below it."""
    picture = Image.fromarray((image[0].clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8))
    picture = picture.resize((width, max(1, round(picture.height * width / picture.width))))
    font = ImageFont.load_default()
    band = 8 + 14 * len(lines)
    canvas = Image.new("RGB", (width, picture.height + band), (24, 24, 24))
    canvas.paste(picture, (0, 0))
    draw = ImageDraw.Draw(canvas)
    for i, line in enumerate(lines):
        draw.text((6, picture.height + 4 + 14 * i), line, fill=(235, 235, 235), font=font)
    return torch.from_numpy(np.asarray(canvas).astype(np.float32) / 255.0)[None]
