"""The demo's offline sample data: generated images with a label CSV.

The images are generated, not photos: circles, squares and triangles of random colour, size,
position and rotation on noisy backgrounds, so only the shape tells the classes apart.
"""

from __future__ import annotations

import io
import os

import numpy as np
from PIL import Image, ImageDraw

SAMPLE_CLASSES = ("circle", "square", "triangle")


def sample_image(shape: str, seed: int, size=(160, 120)) -> bytes:
    """One generated JPEG: a ``shape`` of random colour, size, position and rotation on a noisy
    background of another random colour. Colour carries no information; only the shape does."""
    rng = np.random.default_rng(seed)
    w, h = size
    background, fill = rng.integers(0, 256, 3), rng.integers(0, 256, 3)
    while np.abs(background - fill).sum() < 150:  # keep the shape visible
        fill = rng.integers(0, 256, 3)
    pixels = np.clip(background[None, None] + rng.normal(0, 20, (h, w, 3)), 0, 255)
    image = Image.fromarray(pixels.astype(np.uint8), "RGB")
    radius = rng.uniform(0.18, 0.38) * min(w, h)
    cx, cy = rng.uniform(radius, w - radius), rng.uniform(radius, h - radius)
    angle = rng.uniform(0, 2 * np.pi)
    draw = ImageDraw.Draw(image)
    colour = tuple(int(c) for c in fill)
    if shape == "circle":
        draw.ellipse([cx - radius, cy - radius, cx + radius, cy + radius], fill=colour)
    else:
        corners = 4 if shape == "square" else 3
        points = [
            (
                cx + radius * np.cos(angle + 2 * np.pi * i / corners),
                cy + radius * np.sin(angle + 2 * np.pi * i / corners),
            )
            for i in range(corners)
        ]
        draw.polygon(points, fill=colour)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_sample(work_dir: str, per_class: int = 40) -> str:
    """Writes ``work_dir/images/<shape>/*.jpg`` and ``work_dir/labels.csv``; returns the CSV path."""
    lines = ["image_uri,label"]
    for k, shape in enumerate(SAMPLE_CLASSES):
        folder = os.path.join(work_dir, "images", shape)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            rel = f"images/{shape}/{shape}_{i:03d}.jpg"
            with open(os.path.join(work_dir, rel), "wb") as f:
                f.write(sample_image(shape, seed=1000 * k + i))
            lines.append(f"{rel},{shape}")
    csv_path = os.path.join(work_dir, "labels.csv")
    with open(csv_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return csv_path
