"""Pure image functions: validate, decode, orient, convert, resize and re-encode image bytes.

This module owns the rules that turn untrusted image bytes into the 8-bit RGB JPEGs the rest of
hubflow uses, and the `ImageError` categories reported for images that cannot be used. It imports
Pillow and numpy only (no Beam, no TensorFlow), so every rule is unit-testable on its own.

Decisions:
  * Only JPEG (incl. MPO camera files), PNG, GIF, BMP, WebP and TIFF are opened; Pillow does not
    probe other plugins (e.g. EPS, which would run Ghostscript).
  * The pixel count is checked against ``max_pixels`` from the header, before any pixel data is
    decoded. Pillow's global ``Image.MAX_IMAGE_PIXELS`` is not relied on, but Pillow still
    refuses (and we report as ``too_large``) images above twice that global at open time.
  * Only the first frame of animated or multi-page files is used.
  * Decoding is done at the size needed: a JPEG is decoded with libjpeg's DCT scaling
    (``Image.draft``: 1/2, 1/4, 1/8) to the smallest scale that still covers the stored size,
    then finished with LANCZOS; other formats are box-reduced (``Image.reduce``, through
    ``resize(reducing_gap=...)``) before LANCZOS. The backbone's pixels are resized from the
    stored image, so covering the stored size covers them too. Validation decodes a JPEG at
    1/8 in grayscale: every entropy-coded byte is still read, so it rejects what a full decode
    rejects (truncation, bad markers).
  * The backbone's pixels are framed as ``--crop_fraction`` says (by default the centred square
    of 0.875 of the shorter side; see :data:`schemas.backbones.DEFAULT_CROP_FRACTION`).
  * The EXIF (or XMP) orientation is applied and the re-encoded JPEG carries no EXIF, so decoding
    it with TensorFlow (which ignores EXIF) gives the same pixels.
  * Transparency is composited on white. ICC profiles are ignored (pixels are taken as sRGB).
  * ``I;16*`` and ``I`` pixels are taken as 16-bit (0..65535 -> 0..255); ``F`` pixels as floats
    in [0, 1]. Values outside the range are clipped. Colour-key transparency on these high
    bit-depth modes is ignored.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import struct
import sys

import numpy as np
from PIL import Image

from schemas.backbones import CROP_SQUASH, crop_box
from schemas.errors import EMPTY_FILE, TOO_LARGE, UNDECODABLE

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 89_478_485  # same as Pillow's default bomb threshold
# Largest image file read (--max_file_bytes; larger files are rejected from a stat, unread).
# Phone photos are 2-12 MB and 16-bit TIFF/RAW-derived scans ~50-100 MB: 64 MiB keeps every
# photo and most scans (raise it for big scans) while a worker's reader threads hold at most
# 64 MiB of file bytes each, instead of a whole multi-GB file.
DEFAULT_MAX_FILE_BYTES = 64 << 20
DEFAULT_JPEG_QUALITY = 95
# Longest side of a stored image (--max_image_side; 0 keeps the original). 512 leaves a 4:3
# photo 384 px on its short side: above every preset backbone's input (224, 299) enlarged by
# image-mode training's crop (x1.15) and zoom (x1.1), so no training crop is upsampled. At q95
# the densest of 920 real photos (hymenoptera, cats-vs-dogs) takes 180 KB at 512x384 (280 KB
# at 640 px), so a 12-MP photo is stored within 250 KB.
DEFAULT_MAX_SIDE = 512

SUPPORTED_FORMATS = ("JPEG", "PNG", "GIF", "BMP", "WEBP", "TIFF")

_WHITE = (255, 255, 255)
_ORIENTATION_TAG = 0x0112
# Same mapping as ImageOps.exif_transpose.
_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_SIXTEEN_BIT_MODES = frozenset({"I", "I;16", "I;16L", "I;16B", "I;16N"})
_SUPPORTED_MODES = _SIXTEEN_BIT_MODES | {
    "1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "RGBa", "CMYK", "YCbCr", "LAB", "HSV", "F",
}  # fmt: skip
# Other formats are box-reduced (Image.reduce) as far as they stay this factor above the target
# size, then LANCZOS (Pillow's thumbnail default): 12 MP to 512 px in 1/4 of LANCZOS's time,
# 54 dB PSNR from it.
_REDUCING_GAP = 2.0
# What Pillow may raise on malformed input, beyond OSError and SyntaxError.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
)
_LOAD_ERRORS = (Image.DecompressionBombError, *_DECODE_ERRORS)


class ImageError(ValueError):
    """An image that cannot be used.

    Attributes:
      category: a short code: ``empty_file``, ``undecodable`` or ``too_large``.
      reason: a readable explanation (also ``str(error)``).
    """

    def __init__(self, category: str, reason: str) -> None:
        super().__init__(reason)
        self.category = category
        self.reason = reason

    def __reduce__(self) -> tuple[type[ImageError], tuple[str, str]]:
        return type(self), (self.category, self.reason)

    def __repr__(self) -> str:
        return f"ImageError({self.category!r}, {self.reason!r})"


@dataclasses.dataclass(frozen=True)
class EncodedImage:
    """A re-encoded RGB JPEG, its size in pixels and, if asked for, the backbone's pixels."""

    jpeg: bytes
    height: int
    width: int
    backbone_pixels: np.ndarray | None = None


def sha256_hex(data: bytes) -> str:
    """Returns the hex SHA-256 digest of `data` (used to find duplicate images)."""
    return hashlib.sha256(data).hexdigest()


def validate(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> tuple[int, int]:
    """Checks that `data` is a usable image by decoding it (JPEGs at 1/8 scale, grayscale).

    Args:
      data: the encoded image file.
      max_pixels: the largest accepted width * height, checked before decoding.

    Returns:
      (width, height) as stored, before EXIF orientation.

    Raises:
      ImageError: empty, too large, not a supported image, truncated or corrupt.
      ValueError: `max_pixels` is not positive.
    """
    _check_positive("max_pixels", max_pixels)
    image = _open(data, max_pixels)
    size = image.size
    try:
        # No-op except for JPEG: DCT-scaled decode. The whole entropy-coded stream is still read,
        # so truncation is still detected.
        image.draft("L", (1, 1))
        image.load()
    except _LOAD_ERRORS as e:
        raise _decode_error(image, e) from e
    return size


def decode_rgb(
    data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS, max_side: int | None = None
) -> Image.Image:
    """Decodes the first frame of `data` to an upright 8-bit RGB image.

    EXIF orientation is applied; transparency is composited on white; CMYK, palette, grayscale,
    1-bit, 16-bit and float images are converted with their full range mapped to 0..255.

    Args:
      data: the encoded image file.
      max_pixels: the largest accepted width * height, checked before decoding.
      max_side: if given, downscale (keeping the aspect ratio, never upscaling) so that the longer
        side is at most this many pixels; a JPEG is then decoded at the smallest DCT scale
        that still covers that size. None keeps the original size.

    Returns:
      A loaded PIL image in mode "RGB".

    Raises:
      ImageError: empty, too large, not a supported image, truncated or corrupt.
      ValueError: `max_pixels` or `max_side` is not positive.
    """
    _check_positive("max_pixels", max_pixels)
    if max_side is not None:
        _check_positive("max_side", max_side)
    image = _open(data, max_pixels)
    try:
        target = None
        if max_side is not None and max(image.size) > max_side:
            target = _fit(image.size, max_side)
            # JPEG only: the largest libjpeg scale-down whose result still covers `target`
            # (a 4032x3024 photo for 512 px: 1/4, 1008x756). Within 0.999 embedding cosine of
            # decoding at full size, at a fifth of the time.
            image.draft(None, target)
        image.load()
        transpose = _orientation_transpose(image)
        rgb = _to_rgb(image)
        if target is not None and rgb.size != target:
            rgb = rgb.resize(target, Image.Resampling.LANCZOS, reducing_gap=_REDUCING_GAP)
        if transpose is not None:
            rgb = rgb.transpose(transpose)
    except _LOAD_ERRORS as e:
        raise _decode_error(image, e) from e
    return rgb


def encode_jpeg(image: Image.Image, quality: int = DEFAULT_JPEG_QUALITY) -> bytes:
    """Encodes `image` as an RGB JPEG without EXIF (so its orientation is baked in).

    Args:
      image: an RGB image; other modes are converted as `decode_rgb` does (alpha on white).
      quality: JPEG quality, 1..100.

    Returns:
      The JPEG file bytes.

    Raises:
      ValueError: `quality` is outside 1..100.
    """
    if not 1 <= quality <= 100:
        raise ValueError(f"JPEG quality must be in 1..100, got {quality!r}")
    if image.mode != "RGB":
        image = _to_rgb(image)
    buffer = io.BytesIO()
    # Pillow copies a source JPEG's comment unless told otherwise; keep only pixels.
    image.save(buffer, "JPEG", quality=quality, comment=b"")
    return buffer.getvalue()


def reencode(
    data: bytes,
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
    quality: int = DEFAULT_JPEG_QUALITY,
    backbone_size: int | None = None,
    crop_fraction: float = CROP_SQUASH,
) -> EncodedImage:
    """Decodes `data` with `decode_rgb` and re-encodes it with `encode_jpeg`.

    Args:
      backbone_size: if given, also frame the decoded image (before JPEG compression) with
        `backbone_pixels` into this square size, from the one decode.
      crop_fraction: how `backbone_pixels` frames it (0: squash).

    Returns:
      The JPEG and the height and width of the re-encoded (upright, downscaled) image.

    Raises:
      ImageError: as `decode_rgb`.
      ValueError: a non-positive limit or a quality outside 1..100.
    """
    image = decode_rgb(data, max_pixels=max_pixels, max_side=max_side)
    return EncodedImage(
        jpeg=encode_jpeg(image, quality),
        height=image.height,
        width=image.width,
        backbone_pixels=(
            backbone_pixels(image, backbone_size, crop_fraction) if backbone_size else None
        ),
    )


def backbone_pixels(
    image: Image.Image, size: int, crop_fraction: float = CROP_SQUASH
) -> np.ndarray:
    """Frames an RGB image into ``size x size`` for a backbone: uint8 ``[size, size, 3]``.

    ``crop_fraction`` 0 resizes the whole image straight to the square; a fraction F scales it
    (aspect ratio kept) so its shorter side is ``size / F`` and takes the centred square
    (:func:`schemas.backbones.crop_box`). Pillow's bilinear filter widens with the scale factor
    (antialiased), as TensorFlow's ``resize(antialias=True)`` in
    :func:`backbones.inputs.image_to_backbone_input` does, the function serving applies to the
    images it is sent: the two agree within about 1/255 per value (tested), the rounding of
    Pillow's 8-bit output; both feed :func:`backbones.inputs.pixels_to_backbone_input`. Pillow
    needs a third of TensorFlow's CPU time here, which the preprocessing job spends once per
    image.
    """
    if image.mode != "RGB":
        image = _to_rgb(image)
    if crop_fraction == CROP_SQUASH:
        if image.size != (size, size):
            image = image.resize((size, size), Image.Resampling.BILINEAR)
        return np.asarray(image, dtype=np.uint8)
    width, height, left, top = crop_box(image.width, image.height, size, crop_fraction)
    # Resampling only the crop's source box gives the pixels of scaling the whole image to
    # width x height and cropping (the same sample centres and filter width; within 1 of 255
    # from float rounding), at the cost of the output square alone: 1.0-1.2 ms for a 512 x 384
    # image to 260, against 1.7-2.4 ms for scaling all of it first.
    scale_x, scale_y = image.width / width, image.height / height
    box = (left * scale_x, top * scale_y, (left + size) * scale_x, (top + size) * scale_y)
    image = image.resize((size, size), Image.Resampling.BILINEAR, box=box)
    return np.asarray(image, dtype=np.uint8)


def image_format(data: bytes, max_pixels: int = DEFAULT_MAX_PIXELS) -> str:
    """Pillow's format name of encoded image bytes (``"JPEG"``, ``"PNG"`` …), from the header.

    Raises:
      ImageError: for empty, unrecognised or oversized data (as :func:`validate`).
    """
    return _open(data, max_pixels).format


def _check_positive(name: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{name} must be a positive number of pixels, got {value!r}")


def _open(data: bytes, max_pixels: int) -> Image.Image:
    """Opens `data` lazily (header only) and checks its size and pixel mode."""
    if not data:
        raise ImageError(EMPTY_FILE, "zero-byte file")
    try:
        image = Image.open(io.BytesIO(data), formats=SUPPORTED_FORMATS)
    except Image.UnidentifiedImageError as e:
        raise ImageError(
            UNDECODABLE,
            f"not a recognised image ({len(data)} bytes; supported formats: "
            f"{', '.join(SUPPORTED_FORMATS)})",
        ) from e
    except Image.DecompressionBombError as e:
        raise ImageError(TOO_LARGE, f"decompression bomb: {e}") from e
    except _DECODE_ERRORS as e:
        raise ImageError(UNDECODABLE, f"corrupt image header: {e}") from e
    width, height = image.size
    if width * height > max_pixels:
        raise ImageError(
            TOO_LARGE,
            f"{image.format} image of {width}x{height} = {width * height:,} pixels exceeds the "
            f"limit of {max_pixels:,} pixels (decompression-bomb guard)",
        )
    if image.mode not in _SUPPORTED_MODES:
        raise ImageError(UNDECODABLE, f"unsupported pixel mode {image.mode} ({image.format})")
    return image


def _decode_error(image: Image.Image, error: Exception) -> ImageError:
    """Wraps an exception raised while decoding pixel data of `image`."""
    if isinstance(error, Image.DecompressionBombError):  # e.g. a later frame's header
        return ImageError(TOO_LARGE, f"decompression bomb ({image.format}): {error}")
    return ImageError(UNDECODABLE, f"truncated or corrupt image data ({image.format}): {error}")


def _fit(size: tuple[int, int], max_side: int) -> tuple[int, int]:
    """The size with the longer side equal to `max_side`, keeping the aspect ratio."""
    width, height = size
    if width >= height:
        return max_side, max(1, round(height * max_side / width))
    return max(1, round(width * max_side / height)), max_side


def _orientation_transpose(image: Image.Image) -> Image.Transpose | None:
    """The transposition that makes `image` upright, from its EXIF (or XMP) orientation."""
    try:
        return _ORIENTATION_TRANSPOSE.get(image.getexif().get(_ORIENTATION_TAG))
    except _DECODE_ERRORS as e:
        # Malformed metadata does not make the pixels unusable.
        logger.debug("Ignoring unreadable EXIF in a %s image: %s", image.format, e)
        return None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Converts a loaded image of any supported mode to 8-bit RGB, compositing alpha on white."""
    mode = image.mode
    if mode == "F" or mode in _SIXTEEN_BIT_MODES:
        return _to_8bit_gray(image).convert("RGB")
    keyed = image.info.get("transparency") is not None
    if mode == "RGB" and not keyed:
        return image
    if mode == "P" and not keyed and image.palette is not None and image.palette.mode == "RGB":
        return image.convert("RGB")
    if keyed or mode in ("P", "PA", "RGBa"):
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA"):
        composite = Image.new("RGB", image.size, _WHITE)
        composite.paste(image, mask=image)
        return composite
    return image.convert("RGB")


def _to_8bit_gray(image: Image.Image) -> Image.Image:
    """Scales a 16-bit integer or float grayscale image to mode "L" (rounded, clipped)."""
    if image.mode == "F":
        return image.point(lambda v: v * 255.0 + 0.5).convert("L")
    if image.mode == "I;16N":  # native byte order; Pillow converts it to "I" lossily
        native = "I;16" if sys.byteorder == "little" else "I;16B"
        image = Image.frombytes(native, image.size, image.tobytes())
    if image.mode != "I":
        image = image.convert("I")
    return image.point(lambda v: v * (1 / 257) + 0.5).convert("L")
