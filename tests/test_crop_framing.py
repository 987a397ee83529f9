"""``--crop_fraction``: how an image is framed into the backbone's square input.

The preprocessing job (Pillow), image training and the export (TensorFlow) must frame alike, or
the exported model sees other pixels than the embeddings it was trained on. A dataset records
its framing; one made before the flag existed was squashed.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_hub as hub
from PIL import Image

from backbones.inputs import decode_to_backbone_input, image_to_backbone_input
from pipeline import images, preprocess, reuse
from schemas import csv_format, features, serving
from schemas import manifest as manifest_lib
from schemas.backbones import CROP_OPTION, CROP_SQUASH, DEFAULT_CROP_FRACTION, crop_box
from schemas.cli import UsageError
from tests.conftest import CLASS_COLOURS, TINY_SIZE
from training import task
from training.config import parse_config as parse_train_config


def test_crop_box_keeps_the_aspect_ratio_and_centres_the_square():
    # 500x375 for a 260 input at 0.875: shorter side 260 / 0.875 = 297.1 -> 297.
    assert crop_box(500, 375, 260, 0.875) == (396, 297, 68, 18)
    assert crop_box(375, 500, 260, 0.875) == (297, 396, 18, 68)
    assert crop_box(300, 300, 260, 1.0) == (260, 260, 0, 0)
    # A tiny image is scaled up to cover the input; the square always fits.
    width, height, left, top = crop_box(7, 3, 64, 0.875)
    assert min(width, height) == 73 and left + 64 <= width and top + 64 <= height


def _banded(width: int, height: int) -> Image.Image:
    """Blue, with a red band over the left eighth: what a centre crop leaves out."""
    pixels = np.zeros([height, width, 3], np.uint8)
    pixels[...] = (40, 60, 200)
    pixels[:, : width // 8] = (220, 20, 20)
    return Image.fromarray(pixels, "RGB")


def test_centre_crop_leaves_out_the_edges_that_squashing_keeps():
    image = _banded(400, 200)
    squashed = images.backbone_pixels(image, 64, CROP_SQUASH)
    cropped = images.backbone_pixels(image, 64, 0.875)
    assert squashed.shape == cropped.shape == (64, 64, 3)
    assert (squashed[:, :, 0] > 150).any()  # the band, squeezed in
    assert (cropped[:, :, 0] < 100).all()  # gone: only the centre of the wide image


@pytest.mark.parametrize("crop_fraction", [0.875, 1.0, 0.5])
@pytest.mark.parametrize(
    "size", [(500, 375), (375, 500), (224, 224), (100, 80), (1201, 899), (2400, 24)]
)
def test_job_and_serving_frame_the_same_pixels(size, crop_fraction):
    """Pillow (the job) and the graph (image training, the export) crop the same box and stay
    within the ~1/255 of the squash path; a 100:1 panorama too (both compute only the crop's
    square: scaled whole, it would be 44,800 x 448 pixels at 0.5)."""
    rng = np.random.default_rng(sum(size))
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 80 * np.sin(xx[..., None] / 17.0 + np.arange(3)) * np.cos(yy[..., None] / 23.0)
    pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)

    ours = images.backbone_pixels(Image.fromarray(pixels, "RGB"), 224, crop_fraction)
    serving_input = image_to_backbone_input(tf.constant(pixels), 224, crop_fraction).numpy()
    diff = np.abs(ours / 255.0 - serving_input)
    assert diff.max() <= 3 / 255, diff.max()
    assert diff.mean() <= 0.6 / 255, diff.mean()
    # A batch frames as its images do one by one.
    batch = image_to_backbone_input(tf.constant(pixels[None]), 224, crop_fraction).numpy()[0]
    np.testing.assert_allclose(batch, serving_input, atol=1e-6)


@pytest.mark.parametrize("value", ["1.5", "-0.1", "nan", "big"])
def test_a_bad_crop_fraction_is_refused_naming_the_flag(tmp_path, value):
    with pytest.raises(UsageError, match=f"--{CROP_OPTION}"):
        preprocess.parse_config(
            [
                f"--image_dir={tmp_path}",
                f"--output_dir={tmp_path / 'o'}",
                f"--crop_fraction={value}",
            ]
        )


def test_the_default_is_the_centre_crop_and_0_squashes(tmp_path):
    args = [f"--image_dir={tmp_path}", f"--output_dir={tmp_path / 'o'}"]
    config, _ = preprocess.parse_config(args)
    assert config.crop_fraction == DEFAULT_CROP_FRACTION == 0.875
    assert config.options[CROP_OPTION] == 0.875  # what the manifest records
    for zero in ("0", "-0"):
        config, _ = preprocess.parse_config([*args, f"--crop_fraction={zero}"])
        assert config.crop_fraction == CROP_SQUASH
        assert str(config.options[CROP_OPTION]) == "0.0"  # not "-0.0" in the manifest


def _manifest(options: dict) -> manifest_lib.Manifest:
    backbone = {"name": "tiny", "handle": "/m", "image_size": 32, "embedding_dim": 16}
    data = {
        "schema_version": manifest_lib.SCHEMA_VERSION,
        "labels": ["a", "b"],
        "backbone": backbone,
        "backbone_sha256": "ab" * 32,
        "inference_runtime": "tensorflow",
        "splits": manifest_lib.empty_splits(["a", "b"]),
        "rows": {"read": 0, "written": 0, "duplicates": 0, "rejected": 0},
        "options": {"max_image_side": 512, "jpeg_quality": 95, **options},
    }
    return manifest_lib.Manifest.from_json(json.loads(json.dumps(data)))


def test_a_dataset_from_before_the_flag_reads_as_squashed_and_is_not_reused():
    old = _manifest({})
    assert old.crop_fraction() == CROP_SQUASH
    assert _manifest({CROP_OPTION: 0.875}).crop_fraction() == 0.875
    # An incremental run that frames otherwise reuses nothing, and says why.
    args = (old, old.backbone, "ab" * 32, "tensorflow", 512, 95)
    assert reuse.mismatch(*args, crop_fraction=CROP_SQUASH) is None
    reason = reuse.mismatch(*args, crop_fraction=0.875)
    assert f"--{CROP_OPTION} 0" in reason and "0.875" in reason


def _wide_photo(colour, seed: int) -> bytes:
    """A wide noisy photo of one class colour, with a band of the opposite colour down its left
    quarter, which a centre crop leaves out."""
    rng = np.random.default_rng(seed)
    pixels = np.clip(np.array(colour) + rng.normal(0, 25, (48, 96, 3)), 0, 255)
    pixels[:, :24] = 255 - np.array(colour)
    buffer = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8), "RGB").save(buffer, "JPEG", quality=95)
    return buffer.getvalue()


@pytest.mark.slow
@pytest.mark.parametrize("crop_fraction", [DEFAULT_CROP_FRACTION, CROP_SQUASH])
def test_the_export_frames_image_bytes_as_the_stored_embeddings_were(
    tiny_backbone, tmp_path, crop_fraction
):
    """End to end: the job embeds the framed image, the manifest records the framing, and the
    export serving the stored JPEG bytes gives what the head gives on the stored embeddings."""
    root = tmp_path / "images"
    for k, label in enumerate(["daisy", "tulip"]):
        (root / label).mkdir(parents=True)
        for i in range(10):
            (root / label / f"{i}.jpg").write_bytes(_wide_photo(CLASS_COLOURS[label], 100 * k + i))
    data_dir = tmp_path / "data"
    preprocess.run(
        [
            f"--image_dir={root}",
            f"--output_dir={data_dir}",
            f"--backbone={tiny_backbone}",
            f"--crop_fraction={crop_fraction}",
            "--eval_fraction=0.3",
            "--test_fraction=0.3",
        ]
    )
    manifest = manifest_lib.read_manifest(str(data_dir))
    assert manifest.crop_fraction() == crop_fraction

    records = []
    for split in csv_format.SPLITS:
        pattern = os.path.join(data_dir, features.tfrecord_pattern(split))
        records += list(features.read_dataset(pattern, manifest.backbone.embedding_dim))
    jpegs = tf.constant([r[features.IMAGE_ENCODED].numpy() for r in records])
    stored = np.stack([r[features.EMBEDDING].numpy() for r in records])
    model = hub.load(tiny_backbone)

    def cosines(framing: float) -> np.ndarray:
        embedded = model(decode_to_backbone_input(jpegs, TINY_SIZE, framing)).numpy()
        return np.sum(stored * embedded, 1) / (
            np.linalg.norm(stored, axis=1) * np.linalg.norm(embedded, axis=1)
        )

    # The stored embedding is the backbone on the stored image framed this way, not the other.
    other = CROP_SQUASH if crop_fraction else DEFAULT_CROP_FRACTION
    assert cosines(crop_fraction).min() >= 0.999
    assert cosines(other).min() < 0.99

    result = task.train(
        parse_train_config(
            [
                f"--data_dir={data_dir}",
                f"--model_dir={tmp_path / 'model'}",
                "--no_tune",
                "--epochs=5",
            ]
        )
    )
    serve = tf.saved_model.load(result.export_dir).signatures[serving.SIGNATURE_NAME]
    served = serve(image_bytes=jpegs)["probabilities"].numpy()
    expected = result.model(stored, training=False).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-3)
