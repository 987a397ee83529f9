"""The built-in offline sample: generated images, a label CSV and a stand-in backbone.

``python -m pipeline.sample --work_dir DIR`` writes a small labeled image set (generated, not real
photos: noisy colour fields with shapes, one colour family per class), a label CSV with relative
paths, and a small randomly initialised conv net saved as a TF-Hub-format feature-vector
SavedModel, then runs the preprocessing job on them with the DirectRunner. It needs no network
and no cloud account. The stand-in backbone is NOT pretrained; it only exercises the same code
path a real Hub backbone takes.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw

SAMPLE_CLASSES = {"daisy": (235, 215, 70), "rose": (200, 35, 50), "tulip": (70, 80, 205)}
STANDIN_SIZE = 64
STANDIN_DIM = 32


def save_standin_backbone(path: str, size: int = STANDIN_SIZE, dim: int = STANDIN_DIM) -> str:
    """Saves a small random-weight tf_keras conv net as a Hub-format feature-vector SavedModel.

    Input ``[N, size, size, 3]`` float32 in [0, 1], output ``[N, dim]``; it has trainable and
    batch-norm variables like a real backbone. Written to a temp dir, then renamed into place.
    """
    import tensorflow as tf
    import tf_keras

    tf_keras.utils.set_random_seed(0)
    inputs = tf_keras.Input([size, size, 3])
    x = tf_keras.layers.Conv2D(16, 3, strides=2, padding="same")(inputs)
    x = tf_keras.layers.BatchNormalization()(x)
    x = tf_keras.layers.ReLU()(x)
    x = tf_keras.layers.Conv2D(dim, 3, strides=2, padding="same", activation="relu")(x)
    x = tf_keras.layers.GlobalAveragePooling2D()(x)
    colour = tf_keras.layers.GlobalAveragePooling2D()(inputs)
    outputs = tf_keras.layers.Dense(dim)(tf_keras.layers.Concatenate()([x, colour]))
    model = tf_keras.Model(inputs, outputs)
    tmp = f"{path}.tmp-{os.getpid()}"
    tf.saved_model.save(model, tmp)
    os.replace(tmp, path)
    return path


def sample_image(colour, seed: int, size=(160, 120)) -> bytes:
    """One generated JPEG: a noisy field of ``colour`` with a random darker ellipse."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.array(colour, np.float32) * rng.uniform(0.8, 1.1)
    pixels = np.clip(base[None, None] + rng.normal(0, 30, (h, w, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")
    x0, y0 = rng.integers(0, w // 2), rng.integers(0, h // 2)
    ImageDraw.Draw(image).ellipse(
        [x0, y0, x0 + w // 3, y0 + h // 3], fill=tuple(int(c * 0.5) for c in colour)
    )
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_sample(work_dir: str, per_class: int = 40) -> str:
    """Writes ``work_dir/images/<label>/*.jpg`` and ``work_dir/labels.csv``; returns the CSV path."""
    lines = ["image_uri,label"]
    for k, (label, colour) in enumerate(sorted(SAMPLE_CLASSES.items())):
        folder = os.path.join(work_dir, "images", label)
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            rel = f"images/{label}/{label}_{i:03d}.jpg"
            with open(os.path.join(work_dir, rel), "wb") as f:
                f.write(sample_image(colour, seed=1000 * k + i))
            lines.append(f"{rel},{label}")
    csv_path = os.path.join(work_dir, "labels.csv")
    with open(csv_path, "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    return csv_path


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="hubflow-sample", description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", default="hubflow-sample", help="where everything is written")
    parser.add_argument("--per_class", type=int, default=40, help="images per class (default 40)")
    args, beam_args = parser.parse_known_args(argv)
    work_dir = os.path.abspath(args.work_dir)
    os.makedirs(work_dir, exist_ok=True)
    csv_path = write_sample(work_dir, args.per_class)
    backbone = os.path.join(work_dir, "standin_backbone")
    if not os.path.isdir(backbone):
        save_standin_backbone(backbone)
    output_dir = os.path.join(work_dir, "dataset")
    print(f"sample images: {work_dir}/images  labels: {csv_path}  backbone: {backbone}")

    from pipeline import preprocess

    return preprocess.main(
        [
            f"--input_csv={csv_path}",
            f"--output_dir={output_dir}",
            f"--backbone={backbone}",
            "--overwrite",
            *beam_args,
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
