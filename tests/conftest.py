"""Shared fixtures: a tiny Hub-format backbone and generated labeled images, all offline."""

from __future__ import annotations

import io
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

import schemas  # noqa: E402, F401 - pins Keras 2 before TensorFlow resolves tf.keras

TINY_SIZE = 32
TINY_DIM = 16

# Class colours for generated "photos": separable by colour, with texture noise.
CLASS_COLOURS = {"daisy": (230, 220, 60), "rose": (200, 30, 40), "tulip": (60, 70, 200)}


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory) -> str:
    """A tiny Hub-format feature-vector SavedModel (a tf_keras conv net, tf.saved_model.save)."""
    from backbones.standin import save_standin_backbone

    return save_standin_backbone(
        str(tmp_path_factory.mktemp("backbone") / "tiny"), TINY_SIZE, TINY_DIM
    )


def photo(colour, size=(48, 40), seed=0, fmt="JPEG", mode="RGB") -> bytes:
    """A noisy image of one dominant colour, encoded in ``fmt``."""
    rng = np.random.default_rng(seed)
    w, h = size
    base = np.array(colour, dtype=np.float32)[None, None, :]
    pixels = np.clip(base + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB").convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def write_dataset(root, per_class: int = 12, labels=None) -> dict[str, list[str]]:
    """Writes ``root/<label>/<label>_<i>.jpg`` noisy colour photos; returns label -> relative paths."""
    files: dict[str, list[str]] = {}
    for k, label in enumerate(labels or CLASS_COLOURS):
        folder = root / label
        folder.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            rel = f"{label}/{label}_{i}.jpg"
            size = (48 + 4 * (i % 3), 40 + 2 * (i % 4))
            (root / rel).write_bytes(photo(CLASS_COLOURS[label], size, seed=1000 * k + i))
            files.setdefault(label, []).append(rel)
    return files


def record_jpeg_drafts(monkeypatch) -> list[tuple[int, int]]:
    """The sizes JPEGs are decoded at (their size after ``draft``), appended as they happen."""
    from PIL import JpegImagePlugin

    sizes = []
    original = JpegImagePlugin.JpegImageFile.draft

    def recording_draft(self, mode, size):
        result = original(self, mode, size)
        sizes.append(self.size)
        return result

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", recording_draft)
    return sizes


@pytest.fixture
def no_gcs(monkeypatch):
    """Makes any use of Beam's gs:// filesystem fail at once (instead of retrying for minutes
    without network): a dry run must not list, read or write gs:// paths."""
    from apache_beam.io.gcp import gcsfilesystem

    def refuse(*args, **kwargs):
        raise AssertionError(f"gs:// was accessed: {args[1:]}")

    for name in ("match", "exists", "create", "open", "mkdirs", "delete", "rename", "copy"):
        monkeypatch.setattr(gcsfilesystem.GCSFileSystem, name, refuse)


def preprocessed_folders(tmp_path_factory, backbone: str, per_class: int, name: str) -> str:
    """Generated class folders (:func:`write_dataset`) run through the real preprocessing job
    with ``backbone``, a quarter each hashed into eval and test; returns the data dir."""
    from pipeline import preprocess

    root = tmp_path_factory.mktemp(f"{name}_images")
    write_dataset(root, per_class=per_class)
    out = tmp_path_factory.mktemp(f"{name}_data")
    preprocess.run(
        [
            f"--image_dir={root}",
            f"--output_dir={out}",
            f"--backbone={backbone}",
            "--eval_fraction=0.25",
            "--test_fraction=0.25",
        ]
    )
    return str(out)
