"""Template thumbnails that say what a workflow does at a glance: its title and its stages, left to
right, each with the titles of its nodes (not a picture of the wires)."""
from __future__ import annotations

from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

WIDTH, HEIGHT = 640, 360


def _wrap(draw, text: str, font, width: int) -> list[str]:
    words, lines, line = text.split(), [], ""
    for word in words:
        candidate = f"{line} {word}".strip()
        if draw.textlength(candidate, font=font) <= width or not line:
            line = candidate
        else:
            lines.append(line)
            line = word
    return lines + ([line] if line else [])


def thumbnail(path: Path, title: str, stages: list[tuple[str, str, list[str]]]) -> Path:
    """stages: (group title, colour '#rrggbb', node titles) in order."""
    image = Image.new("RGB", (WIDTH, HEIGHT), (30, 31, 34))
    draw = ImageDraw.Draw(image)
    heading, label, small = (ImageFont.load_default(size=s) for s in (22, 15, 12))
    y = 12
    for line in _wrap(draw, title, heading, WIDTH - 24)[:2]:
        draw.text((12, y), line, fill=(240, 240, 240), font=heading)
        y += 28
    top, gap = y + 8, 10
    width = (WIDTH - 24 - gap * (len(stages) - 1)) / max(1, len(stages))
    for i, (name, color, nodes) in enumerate(stages):
        x0 = 12 + i * (width + gap)
        draw.rounded_rectangle([x0, top, x0 + width, HEIGHT - 12], radius=8, fill=color)
        draw.text((x0 + 8, top + 6), name, fill=(255, 255, 255), font=label)
        ty = top + 30
        for node in nodes:
            for line in _wrap(draw, node, small, int(width) - 16):
                if ty > HEIGHT - 30:
                    break
                draw.text((x0 + 8, ty), line, fill=(235, 235, 235), font=small)
                ty += 15
            ty += 3
        if i < len(stages) - 1:
            ay = top + 16
            draw.polygon([(x0 + width + 1, ay - 5), (x0 + width + gap - 1, ay), (x0 + width + 1, ay + 5)],
                         fill=(220, 220, 220))
    image.save(path, quality=88)
    return path
