"""Generated labelled images, so that the offline preset runs anywhere."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

SHAPES = ("disc", "square", "cross", "ring", "bar")
COLOURS = ((220, 50, 47), (38, 139, 210), (133, 153, 0), (211, 54, 130), (181, 137, 0))


def make_shapes(root: str | os.PathLike, *, per_class: int = 60, size: int = 32, seed: int = 0) -> Path:
    """Write ``<root>/<shape>/<i>.png``: one class per shape, in a colour of its own, at a random place
    and scale on a noisy background. Returns ``root``; existing complete folders are reused."""
    from PIL import Image, ImageDraw

    root = Path(root)
    rng = np.random.default_rng(seed)
    for shape, colour in zip(SHAPES, COLOURS, strict=True):
        folder = root / shape
        if folder.is_dir() and len(list(folder.glob("*.png"))) == per_class:
            continue
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            background = rng.normal(128, 30, size=(size, size, 3)).clip(0, 255).astype(np.uint8)
            img = Image.fromarray(background)
            draw = ImageDraw.Draw(img)
            r = rng.uniform(0.2, 0.35) * size
            cx, cy = rng.uniform(r, size - r, size=2)
            box = (cx - r, cy - r, cx + r, cy + r)
            tint = tuple(int(np.clip(v + rng.normal(0, 15), 0, 255)) for v in colour)
            if shape == "disc":
                draw.ellipse(box, fill=tint)
            elif shape == "square":
                draw.rectangle(box, fill=tint)
            elif shape == "cross":
                w = r / 3
                draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=tint)
                draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=tint)
            elif shape == "ring":
                draw.ellipse(box, outline=tint, width=max(2, int(r / 3)))
            else:
                draw.rectangle((cx - r, cy - r / 4, cx + r, cy + r / 4), fill=tint)
            img.save(folder / f"{i:03d}.png")
    return root
