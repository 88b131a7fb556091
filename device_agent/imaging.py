"""Image inputs: OpenCV decode and preprocessing exactly as the package declares, plus derived statistics.

The derived statistics (per-channel mean brightness and contrast, and sharpness as the variance of the
Laplacian) are what an image package's reference profile and on-device summaries bin; no pixel ever leaves
the device.
"""

from __future__ import annotations

import cv2
import numpy as np

from edgefleet_contracts.manifest import ImageSpec

from .errors import InputError

_RESIZE = {"area": cv2.INTER_AREA, "linear": cv2.INTER_LINEAR, "nearest": cv2.INTER_NEAREST}
MAX_IMAGE_BYTES = 20 * 1024 * 1024


def decode(data: bytes, spec: ImageSpec) -> np.ndarray:
    """Decode encoded image bytes (PNG, JPEG, …) into uint8 HxW (gray) or HxWx3 in the spec's colour order.

    Raises InputError when the bytes are empty, too large or not an image OpenCV can decode.
    """
    if not data:
        raise InputError("image is empty", kind="bad_image")
    if len(data) > MAX_IMAGE_BYTES:
        raise InputError(f"image is {len(data)} bytes, over the {MAX_IMAGE_BYTES}-byte limit", kind="bad_image")
    buf = np.frombuffer(data, dtype=np.uint8)
    flag = cv2.IMREAD_GRAYSCALE if spec.color == "gray" else cv2.IMREAD_COLOR
    img = cv2.imdecode(buf, flag)
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
