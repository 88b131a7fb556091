"""Image inputs: OpenCV decode and preprocessing exactly as the package declares, plus derived statistics.

The derived statistics (per-channel mean brightness and contrast, and sharpness as the variance of the
Laplacian) are what an image package's reference profile and on-device summaries bin; no pixel ever leaves
the device.
"""

from __future__ import annotations

import struct

import cv2
import numpy as np

from edgefleet_contracts.manifest import ImageSpec

from .errors import InputError

_RESIZE = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}
MAX_IMAGE_BYTES = 20 * 1024 * 1024
# Decoded size cap, checked from the header before OpenCV allocates anything (its own cap is 2**30 pixels, ~3 GB
# as BGR). A compressed image can be thousands of times smaller than its pixels, so the byte limit alone does not
# bound memory. 40 megapixels (~120 MB as BGR) is far more than any model input needs and covers camera photos.
MAX_IMAGE_PIXELS = 40_000_000

_PNG = b"\x89PNG\r\n\x1a\n"
# JPEG start-of-frame markers (baseline, extended, progressive, lossless; Huffman and arithmetic): not C4 (DHT),
# C8 (JPG) or CC (DAC).
_SOF = frozenset({0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})  # TEM and RSTn carry no length


def _jpeg_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from the first start-of-frame segment, walking the segments as libjpeg does; None when
    the segment structure is broken or the scan starts before any frame header."""
    i, n = 2, len(data)
    while i + 1 < n:
        if data[i] != 0xFF:
            return None  # libjpeg would skip such garbage with a warning; we refuse rather than guess
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte before a marker
            i += 1
            continue
        if marker in _STANDALONE:
            i += 2
            continue
        if marker in (0xD8, 0xD9, 0xDA) or i + 4 > n:  # SOI again, EOI or start of scan before a frame header
            return None
        (length,) = struct.unpack_from(">H", data, i + 2)
        if marker in _SOF:
            if length < 7 or i + 9 > n:
                return None
            height, width = struct.unpack_from(">HH", data, i + 5)
            return width, height
        if length < 2:
            return None
        i += 2 + length
    return None


def _bmp_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) from a BMP info header as OpenCV reads it (negative height: rows stored top-down)."""
    if len(data) < 26:
        return None
    (header,) = struct.unpack_from("<I", data, 14)
    if header == 12:  # BITMAPCOREHEADER: 16-bit sides
        return struct.unpack_from("<HH", data, 18)
    if header >= 36:  # BITMAPINFOHEADER and its extensions: signed 32-bit sides
        width, height = struct.unpack_from("<ii", data, 18)
        return width, abs(height)
    return None


def image_size(data: bytes) -> tuple[str, int, int]:
    """(format, width, height) read from the header of PNG, JPEG or BMP bytes, without decoding any pixel.

    Raises InputError for any other format (including ones OpenCV could decode: their headers are not checked,
    so they could not be held to :data:`MAX_IMAGE_PIXELS`) and for a header that cannot be read.
    """
    size: tuple[int, int] | None
    if data.startswith(_PNG):
        # The IHDR chunk must come first: length 13, then width and height as unsigned 32-bit big-endian.
        ok = len(data) >= 24 and data[8:16] == b"\x00\x00\x00\x0dIHDR"
        fmt, size = "PNG", (struct.unpack_from(">II", data, 16) if ok else None)
    elif data.startswith(b"\xff\xd8\xff"):
        fmt, size = "JPEG", _jpeg_size(data)
    elif data.startswith(b"BM"):
        fmt, size = "BMP", _bmp_size(data)
    else:
        raise InputError("image bytes cannot be decoded: not a PNG, JPEG or BMP image (the formats accepted)",
                         kind="bad_image")
    if size is None:
        raise InputError(f"{fmt} image bytes cannot be decoded: no readable size in the header (truncated or "
                         "corrupt?)", kind="bad_image")
    width, height = size
    if width <= 0 or height <= 0:
        raise InputError(f"{fmt} image header gives an empty size {width}x{height}", kind="bad_image")
    return fmt, width, height


def decode(data: bytes, spec: ImageSpec) -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG or BMP) into uint8 HxW (gray) or HxWx3 in the spec's colour order.

    Raises InputError when the bytes are empty, too large, over :data:`MAX_IMAGE_PIXELS` by their header, or not
    an image OpenCV can decode. The pixel count is checked before decoding, so a small file that would decode to
    gigabytes (a decompression bomb) costs a header read.
    """
    if not data:
        raise InputError("image is empty", kind="bad_image")
    if len(data) > MAX_IMAGE_BYTES:
        raise InputError(f"image is {len(data)} bytes, over the {MAX_IMAGE_BYTES}-byte limit", kind="bad_image")
    fmt, width, height = image_size(data)
    if width * height > MAX_IMAGE_PIXELS:
        raise InputError(f"{fmt} image is {width}x{height} = {width * height} pixels, over the "
                         f"{MAX_IMAGE_PIXELS}-pixel limit; downscale it before sending", kind="bad_image")
    buf = np.frombuffer(data, dtype=np.uint8)
    flag = cv2.IMREAD_GRAYSCALE if spec.color == "gray" else cv2.IMREAD_COLOR
    try:
        img = cv2.imdecode(buf, flag)
    except cv2.error:  # OpenCV asserts on some malformed headers instead of returning None
        img = None
    if img is None:
        raise InputError("image bytes cannot be decoded (not a PNG/JPEG/BMP image?)", kind="bad_image")
    if spec.color == "rgb":
        img = cv2.cvtColor(img, cv2.COLOR_BGR2RGB)
    return np.asarray(img)


def to_input(img: np.ndarray, spec: ImageSpec) -> np.ndarray:
    """Resize and normalise a decoded image into one model input row (no batch dimension)."""
    resized = cv2.resize(img, (spec.width, spec.height), interpolation=_RESIZE[spec.resize])
    x = (resized.astype(np.float32) * np.float32(spec.scale) - np.float32(spec.mean)) / np.float32(spec.std)
    if spec.layout == "flat":
        return x.reshape(-1)
    if x.ndim == 2:
        x = x[:, :, None]
    return x if spec.layout == "nhwc" else np.transpose(x, (2, 0, 1))


def stat_names(spec: ImageSpec) -> list[str]:
    chans = ["gray"] if spec.color == "gray" else list(spec.color)
    names = [f"brightness_{c}" for c in chans] + [f"contrast_{c}" for c in chans]
    return names + ["sharpness"]


def image_stats(img: np.ndarray) -> np.ndarray:
    """Per-channel mean and standard deviation (0..255 scale) and the variance of the Laplacian (gray).

    Three OpenCV calls (``meanStdDev`` twice, ``Laplacian`` once): this runs on every image prediction.
    """
    mean, std = cv2.meanStdDev(img)
    gray = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_BGR2GRAY)
    _, lap_std = cv2.meanStdDev(cv2.Laplacian(gray, cv2.CV_32F))
    return np.array([*mean.ravel(), *std.ravel(), float(lap_std[0, 0]) ** 2])


def preprocess(data: bytes, spec: ImageSpec, stats: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Decode once; return (model input row, derived statistics or None when not asked). Raises InputError."""
    img = decode(data, spec)
    return to_input(img, spec), (image_stats(img) if stats else None)
