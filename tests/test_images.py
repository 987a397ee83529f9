"""Tests for pipeline.images: decoding edge cases, limits, orientation, conversion and encoding."""

from __future__ import annotations

import hashlib
import io
import pickle
import struct
import time
import zlib

import numpy as np
import pytest
from PIL import Image, ImageFile

from pipeline import images
from schemas import errors
from tests.conftest import record_jpeg_drafts

RED = (255, 0, 0)
GREEN = (0, 255, 0)
BLUE = (0, 0, 255)
WHITE = (255, 255, 255)


def _encode(image: Image.Image, fmt: str, **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _open(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _near(pixel, expected, tol: int) -> bool:
    return all(abs(int(a) - int(b)) <= tol for a, b in zip(pixel, expected, strict=True))


def _halves(size: tuple[int, int], left=RED, right=BLUE) -> Image.Image:
    """An RGB image whose left half is `left` and right half `right`."""
    width, height = size
    image = Image.new("RGB", size, right)
    image.paste(left, (0, 0, width // 2, height))
    return image


def _noise(size: tuple[int, int], seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (1-bit) with no real pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b""))
        + chunk(b"IEND", b"")
    )


def _jpeg_claiming(width: int, height: int) -> bytes:
    """A small baseline JPEG whose SOF0 header is patched to claim width x height."""
    data = bytearray(_encode(Image.new("RGB", (16, 16), RED), "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


@pytest.fixture(scope="module")
def bomb_png() -> bytes:
    """A real, valid 10000x10000 1-bit PNG (100M pixels, over the default limit), ~12 kB."""
    return _encode(Image.new("1", (10_000, 10_000)), "PNG")


@pytest.fixture
def forbid_decoding(monkeypatch):
    """Makes any pixel decoding fail the test."""

    def fail(self, *args, **kwargs):
        raise AssertionError("pixel data was decoded")

    monkeypatch.setattr(Image.Image, "load", fail)
    monkeypatch.setattr(ImageFile.ImageFile, "load", fail)


DECODERS = {
    "validate": images.validate,
    "decode_rgb": images.decode_rgb,
    "reencode": images.reencode,
}


# --- Round trips ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fmt, params",
    [
        ("JPEG", {}),
        ("PNG", {}),
        ("GIF", {}),
        ("BMP", {}),
        ("WEBP", {"quality": 90}),
        ("TIFF", {"compression": "tiff_lzw"}),
    ],
)
def test_reencode_round_trips_each_format_to_rgb_jpeg(fmt, params):
    data = _encode(_halves((48, 32)), fmt, **params)
    assert Image.open(io.BytesIO(data)).format == fmt

    assert images.validate(data) == (48, 32)
    encoded = images.reencode(data)

    assert (encoded.width, encoded.height) == (48, 32)
    out = _open(encoded.jpeg)
    assert (out.format, out.mode, out.size) == ("JPEG", "RGB", (48, 32))
    assert _near(out.getpixel((5, 16)), RED, 40)
    assert _near(out.getpixel((42, 16)), BLUE, 40)


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "TIFF", "PNG"])
def test_animated_and_multipage_files_use_the_first_frame(fmt):
    frames = [Image.new("RGB", (24, 16), colour) for colour in (RED, GREEN, BLUE)]
    params = {"lossless": True} if fmt == "WEBP" else {}
    data = _encode(frames[0], fmt, save_all=True, append_images=frames[1:], **params)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3

    decoded = images.decode_rgb(data)

    assert (decoded.mode, decoded.size) == ("RGB", (24, 16))
    assert _near(decoded.getpixel((12, 8)), RED, 2)


def test_mpo_camera_file_decodes_its_first_image():
    first, second = Image.new("RGB", (32, 16), RED), Image.new("RGB", (32, 16), BLUE)
    data = _encode(first, "MPO", save_all=True, append_images=[second])
    assert Image.open(io.BytesIO(data)).format == "MPO"

    decoded = images.decode_rgb(data, max_side=8)

    assert decoded.size == (8, 4)
    assert _near(decoded.getpixel((4, 2)), RED, 12)


# --- Rejections ----------------------------------------------------------------------------


@pytest.mark.parametrize("progressive", [False, True], ids=["baseline", "progressive"])
@pytest.mark.parametrize("decoder", DECODERS)
def test_truncated_jpeg_is_undecodable(decoder, progressive):
    data = _encode(_noise((96, 64)), "JPEG", progressive=progressive)

    with pytest.raises(images.ImageError) as excinfo:
        DECODERS[decoder](data[: len(data) // 2])

    assert excinfo.value.category == errors.UNDECODABLE
    assert "truncated" in str(excinfo.value) and "JPEG" in str(excinfo.value)


def test_validate_rejects_truncated_jpeg_in_its_scaled_draft_mode(monkeypatch):
    drafts = record_jpeg_drafts(monkeypatch)
    data = _encode(_noise((96, 64)), "JPEG")

    assert images.validate(data) == (96, 64)
    assert drafts and drafts[-1] == (12, 8)  # decoded at 1/8
    with pytest.raises(images.ImageError) as excinfo:
        images.validate(data[: int(len(data) * 0.9)])
    assert excinfo.value.category == errors.UNDECODABLE
    assert drafts[-1] == (12, 8)


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # a cut TIFF directory
@pytest.mark.parametrize(
    "fmt, params",
    [
        ("PNG", {}),
        ("GIF", {}),
        ("BMP", {}),
        ("WEBP", {}),
        ("TIFF", {}),
        ("TIFF", {"compression": "tiff_lzw"}),
    ],
)
@pytest.mark.parametrize("decoder", ["validate", "decode_rgb"])
def test_truncated_files_of_other_formats_are_undecodable(decoder, fmt, params):
    data = _encode(_noise((96, 64)), fmt, **params)

    with pytest.raises(images.ImageError) as excinfo:
        DECODERS[decoder](data[: len(data) // 2])

    assert excinfo.value.category == errors.UNDECODABLE


def test_corrupt_png_header_is_undecodable_not_a_pillow_error():
    data = bytearray(_encode(Image.new("RGB", (8, 8)), "PNG"))
    data[16:20] = struct.pack(">I", 9)  # IHDR width changed, checksum left stale

    with pytest.raises(images.ImageError) as excinfo:
        images.decode_rgb(bytes(data))

    assert excinfo.value.category == errors.UNDECODABLE


@pytest.mark.parametrize("decoder", DECODERS)
def test_zero_byte_file_is_empty_file(decoder):
    with pytest.raises(images.ImageError) as excinfo:
        DECODERS[decoder](b"")

    assert excinfo.value.category == errors.EMPTY_FILE


@pytest.mark.parametrize("decoder", DECODERS)
def test_text_file_is_undecodable(decoder):
    with pytest.raises(images.ImageError) as excinfo:
        DECODERS[decoder](b"hello, not an image")

    assert excinfo.value.category == errors.UNDECODABLE
    assert "not a recognised image" in str(excinfo.value)


@pytest.mark.parametrize("fmt", ["PPM", "ICO", "TGA"])
@pytest.mark.parametrize("decoder", DECODERS)
def test_formats_outside_the_supported_list_are_undecodable(decoder, fmt):
    data = _encode(Image.new("RGB", (16, 16), RED), fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # Pillow itself could read it

    with pytest.raises(images.ImageError) as excinfo:
        DECODERS[decoder](data)

    assert excinfo.value.category == errors.UNDECODABLE


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.parametrize(
    "pillow_limit", [None, Image.MAX_IMAGE_PIXELS], ids=["no-global", "global"]
)
@pytest.mark.parametrize("decoder", DECODERS)
def test_bomb_png_is_rejected_from_its_header_without_decoding(
    decoder, pillow_limit, bomb_png, monkeypatch, forbid_decoding
):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)  # our check, not Pillow's

    start = time.perf_counter()
    with pytest.raises(images.ImageError) as excinfo:
        DECODERS[decoder](bomb_png)

    assert time.perf_counter() - start < 0.5
    assert excinfo.value.category == errors.TOO_LARGE
    assert "10000x10000" in str(excinfo.value)


@pytest.mark.parametrize(
    "pillow_limit", [None, Image.MAX_IMAGE_PIXELS], ids=["no-global", "global"]
)
@pytest.mark.parametrize(
    "data",
    [_png_header_only(100_000, 100_000), _jpeg_claiming(30_000, 30_000)],
    ids=["png", "jpeg"],
)
@pytest.mark.parametrize("decoder", DECODERS)
def test_giant_headers_are_too_large(decoder, data, pillow_limit, monkeypatch, forbid_decoding):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", pillow_limit)

    with pytest.raises(images.ImageError) as excinfo:
        DECODERS[decoder](data)

    assert excinfo.value.category == errors.TOO_LARGE


@pytest.mark.parametrize("decoder", DECODERS)
def test_max_pixels_limit_rejects_larger_images_and_accepts_equal(decoder):
    data = _encode(Image.new("RGB", (100, 50), GREEN), "JPEG")

    with pytest.raises(images.ImageError) as excinfo:
        DECODERS[decoder](data, max_pixels=4_999)
    assert excinfo.value.category == errors.TOO_LARGE

    DECODERS[decoder](data, max_pixels=5_000)


def test_image_error_is_a_value_error_that_pickles():
    error = images.ImageError(errors.TOO_LARGE, "too many pixels")

    clone = pickle.loads(pickle.dumps(error))

    assert isinstance(clone, ValueError)
    assert (clone.category, str(clone)) == (errors.TOO_LARGE, "too many pixels")


@pytest.mark.parametrize(
    "call",
    [
        lambda data: images.validate(data, max_pixels=0),
        lambda data: images.decode_rgb(data, max_side=0),
        lambda data: images.reencode(data, quality=0),
        lambda data: images.reencode(data, quality=101),
    ],
)
def test_invalid_arguments_raise_value_error_not_image_error(call):
    data = _encode(Image.new("RGB", (8, 8)), "PNG")

    with pytest.raises(ValueError) as excinfo:
        call(data)

    assert not isinstance(excinfo.value, images.ImageError)


# --- Mode conversion -----------------------------------------------------------------------


def test_cmyk_jpeg_colours_survive_conversion():
    data = _encode(Image.new("CMYK", (16, 16), (0, 255, 255, 0)), "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"

    decoded = images.decode_rgb(data)

    assert decoded.mode == "RGB"
    assert _near(decoded.getpixel((8, 8)), RED, 12)


def test_rgba_png_composites_on_white():
    image = Image.new("RGBA", (3, 1))
    image.putpixel((0, 0), (0, 0, 255, 0))  # invisible blue
    image.putpixel((1, 0), (255, 0, 0, 255))
    image.putpixel((2, 0), (255, 0, 0, 128))

    decoded = images.decode_rgb(_encode(image, "PNG"))

    assert decoded.mode == "RGB"
    assert decoded.getpixel((0, 0)) == WHITE
    assert decoded.getpixel((1, 0)) == RED
    assert _near(decoded.getpixel((2, 0)), (255, 127, 127), 2)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_image_with_transparency_composites_on_white(fmt):
    image = Image.new("P", (2, 1))
    image.putpalette([*GREEN, *RED])
    image.putpixel((1, 0), 1)
    data = _encode(image, fmt, transparency=0)
    assert Image.open(io.BytesIO(data)).mode == "P"

    decoded = images.decode_rgb(data)

    assert decoded.getpixel((0, 0)) == WHITE
    assert decoded.getpixel((1, 0)) == RED


def test_rgb_png_colour_key_transparency_composites_on_white():
    data = _encode(_halves((4, 2), left=RED, right=BLUE), "PNG", transparency=BLUE)

    decoded = images.decode_rgb(data)

    assert decoded.getpixel((0, 0)) == RED
    assert decoded.getpixel((3, 0)) == WHITE


def test_la_image_composites_on_white():
    image = Image.new("LA", (2, 1))
    image.putpixel((0, 0), (100, 0))
    image.putpixel((1, 0), (100, 255))
    data = _encode(image, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "LA"

    decoded = images.decode_rgb(data)

    assert decoded.getpixel((0, 0)) == WHITE
    assert decoded.getpixel((1, 0)) == (100, 100, 100)


def _high_bit_depth(kind: str) -> tuple[bytes, str]:
    if kind == "png-I;16":
        return _encode(Image.fromarray(np.array([[0, 65535, 32896]], np.uint16)), "PNG"), "I;16"
    if kind == "tiff-I;16B":
        raw = np.array([[0, 65535, 32896]], ">u2").tobytes()
        return _encode(Image.frombytes("I;16B", (3, 1), raw), "TIFF"), "I;16B"
    if kind == "tiff-I":
        return _encode(Image.fromarray(np.array([[0, 65535, 32896]], np.int32)), "TIFF"), "I"
    return _encode(Image.fromarray(np.array([[0.0, 1.0, 0.5]], np.float32)), "TIFF"), "F"


@pytest.mark.parametrize("kind", ["png-I;16", "tiff-I;16B", "tiff-I", "tiff-F"])
def test_high_bit_depth_images_are_scaled_not_clipped(kind):
    data, mode = _high_bit_depth(kind)
    assert Image.open(io.BytesIO(data)).mode == mode

    decoded = images.decode_rgb(data)

    assert decoded.mode == "RGB"
    assert [decoded.getpixel((x, 0)) for x in range(3)] == [(0, 0, 0), WHITE, (128, 128, 128)]


@pytest.mark.parametrize(
    "mode, value, expected",
    [("1", 0, (0, 0, 0)), ("1", 1, WHITE), ("L", 77, (77, 77, 77))],
)
def test_bilevel_and_grayscale_become_rgb(mode, value, expected):
    decoded = images.decode_rgb(_encode(Image.new(mode, (4, 4), value), "PNG"))

    assert (decoded.mode, decoded.getpixel((1, 1))) == ("RGB", expected)


# --- Orientation ---------------------------------------------------------------------------


def _marked(size: tuple[int, int]) -> Image.Image:
    """Blue with a red square in the stored top-left corner."""
    image = Image.new("RGB", size, BLUE)
    image.paste(RED, (0, 0, size[0] // 4, size[1] // 4))
    return image


def _red_corner(image: Image.Image) -> str:
    width, height = image.size
    inset = 3
    corners = {
        "top-left": (inset, inset),
        "top-right": (width - 1 - inset, inset),
        "bottom-left": (inset, height - 1 - inset),
        "bottom-right": (width - 1 - inset, height - 1 - inset),
    }
    red = [name for name, xy in corners.items() if _near(image.getpixel(xy), RED, 60)]
    blue = [name for name, xy in corners.items() if _near(image.getpixel(xy), BLUE, 60)]
    assert len(red) == 1 and len(blue) == 3, (red, blue)
    return red[0]


@pytest.mark.parametrize(
    "orientation, size, corner",
    [
        (1, (64, 32), "top-left"),
        (3, (64, 32), "bottom-right"),
        (6, (32, 64), "top-right"),
        (8, (32, 64), "bottom-left"),
    ],
)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_is_applied(fmt, orientation, size, corner):
    exif = Image.Exif()
    exif[0x0112] = orientation
    data = _encode(_marked((64, 32)), fmt, exif=exif)

    decoded = images.decode_rgb(data)

    assert images.validate(data) == (64, 32)  # as stored
    assert decoded.size == size
    assert _red_corner(decoded) == corner


def test_reencoded_jpeg_has_orientation_baked_in_and_no_exif():
    exif = Image.Exif()
    exif[0x0112] = 6
    exif[0x010F] = "SomeCamera"
    data = _encode(_marked((64, 32)), "JPEG", exif=exif, comment=b"private note")

    encoded = images.reencode(data)

    out = _open(encoded.jpeg)
    assert (encoded.width, encoded.height) == out.size == (32, 64)
    assert not out.getexif() and "exif" not in out.info and "comment" not in out.info
    assert images.decode_rgb(encoded.jpeg).size == (32, 64)  # not rotated a second time
    assert _red_corner(out) == "top-right"


def test_unreadable_exif_is_ignored_not_fatal():
    data = _encode(_marked((64, 32)), "JPEG", exif=b"Exif\x00\x00garbage-not-tiff")

    assert images.decode_rgb(data).size == (64, 32)


# --- Resizing and encoding -----------------------------------------------------------------


@pytest.mark.parametrize(
    "size, max_side, expected",
    [
        ((300, 150), 100, (100, 50)),
        ((150, 300), 100, (50, 100)),
        ((300, 150), 300, (300, 150)),
        ((300, 150), 1000, (300, 150)),  # never upscaled
        ((400, 3), 100, (100, 1)),
    ],
)
def test_max_side_downscales_keeping_aspect(size, max_side, expected):
    data = _encode(_halves(size), "PNG")

    encoded = images.reencode(data, max_side=max_side)

    assert (encoded.width, encoded.height) == expected
    assert _open(encoded.jpeg).size == expected


def test_large_jpeg_downscale_uses_dct_scaling_and_keeps_content(monkeypatch):
    decoded_sizes = record_jpeg_drafts(monkeypatch)
    data = _encode(_halves((1600, 800)), "JPEG")

    decoded = images.decode_rgb(data, max_side=100)

    assert decoded.size == (100, 50)
    assert decoded_sizes == [(200, 100)]  # 1/8 scale, still 2x the target
    assert _near(decoded.getpixel((10, 25)), RED, 12)
    assert _near(decoded.getpixel((90, 25)), BLUE, 12)


def test_max_side_applies_to_the_upright_image():
    exif = Image.Exif()
    exif[0x0112] = 6
    data = _encode(_marked((1600, 800)), "JPEG", exif=exif)

    decoded = images.decode_rgb(data, max_side=100)

    assert decoded.size == (50, 100)
    assert _red_corner(decoded) == "top-right"


def test_jpeg_quality_changes_size():
    image = _noise((128, 128))

    low, high = images.encode_jpeg(image, quality=30), images.encode_jpeg(image, quality=95)

    assert len(low) < 0.7 * len(high)
    data = _encode(image, "PNG")
    assert len(images.reencode(data, quality=30).jpeg) == len(low)


def test_encode_jpeg_composites_non_rgb_input_on_white():
    out = _open(images.encode_jpeg(Image.new("RGBA", (16, 16), (0, 0, 0, 0))))

    assert out.mode == "RGB"
    assert _near(out.getpixel((8, 8)), WHITE, 2)


def test_sha256_hex_matches_hashlib():
    data = b"\x00\x01 some image bytes"

    assert images.sha256_hex(data) == hashlib.sha256(data).hexdigest()
    assert images.sha256_hex(data) != images.sha256_hex(data + b"!")


@pytest.mark.parametrize("size", [(500, 375), (375, 500), (224, 224), (100, 80), (1200, 900)])
def test_backbone_pixels_match_the_serving_resize(size):
    """The job's Pillow resize stays within ~1/255 of what the serving graph computes."""
    import tensorflow as tf

    from backbones.inputs import image_to_backbone_input, pixels_to_backbone_input

    rng = np.random.default_rng(sum(size))
    w, h = size
    # Smooth content plus noise, like a photo.
    yy, xx = np.mgrid[0:h, 0:w]
    base = 127 + 80 * np.sin(xx[..., None] / 17.0 + np.arange(3)) * np.cos(yy[..., None] / 23.0)
    pixels = np.clip(base + rng.normal(0, 20, (h, w, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels, "RGB")

    ours = images.backbone_pixels(image, 224)
    assert ours.shape == (224, 224, 3) and ours.dtype == np.uint8
    job = pixels_to_backbone_input(tf.constant(ours[None])).numpy()[0]
    serving = image_to_backbone_input(tf.constant(pixels), 224).numpy()
    diff = np.abs(job - serving)
    assert diff.max() <= 3 / 255, diff.max()
    assert diff.mean() <= 0.6 / 255, diff.mean()


def test_backbone_pixels_converts_other_modes():
    image = Image.new("L", (60, 40), 128)
    out = images.backbone_pixels(image, 32)
    assert out.shape == (32, 32, 3) and int(out[0, 0, 0]) == 128
