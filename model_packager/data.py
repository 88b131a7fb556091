"""Reading calibration and holdout data: ``.npz`` (``x``, optional ``y``), CSV with a header, image folders.

An image folder is ``DIR/<class name>/<file>`` (PNG/JPEG/BMP); classes are the sorted folder names. Images are
decoded and preprocessed with the agent's own code (``device_agent.imaging``) so that what the packager
measures is exactly what a device computes.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from device_agent.errors import InputError
from device_agent.imaging import decode as decode_image
from device_agent.imaging import image_stats, stat_names, to_input
from edgefleet_contracts.digest import sha256_file
from edgefleet_contracts.manifest import ImageSpec

from .errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp"}


@dataclass
class Dataset:
    x: np.ndarray  # model inputs, float32 [N, ...]
    y: np.ndarray | None  # int64 labels, or None
    feature_names: list[str]  # names of the profiled features (tabular inputs, or derived image statistics)
    features: np.ndarray  # float64 [N, F]: what the reference profile bins
    sha256: str  # of the data file (or of the folder's files in order)
    source: str
    class_names: list[str] | None = None
    images: list[bytes] = field(default_factory=list)  # encoded images, for golden inputs of image packages

    def __len__(self) -> int:
        return int(self.x.shape[0])


def load_npz(path: Path, feature_names: list[str] | None = None) -> Dataset:
    try:
        with np.load(path, allow_pickle=False) as z:
            if "x" not in z:
                raise DataError(f"{path} has no array named 'x' (arrays: {', '.join(z.files)})")
            x = np.asarray(z["x"], dtype=np.float32)
            y = np.asarray(z["y"], dtype=np.int64) if "y" in z else None
            names = [str(n) for n in z["feature_names"]] if "feature_names" in z else None
    except (OSError, ValueError) as exc:
        raise DataError(f"cannot read {path} as .npz: {exc}") from exc
    if x.ndim != 2:
        raise DataError(f"{path}: x must be 2-D [rows, features], got shape {x.shape}")
    if y is not None and len(y) != len(x):
        raise DataError(f"{path}: x has {len(x)} rows but y has {len(y)}")
    names = names or feature_names or [f"f{i}" for i in range(x.shape[1])]
    return Dataset(x, y, names, x.astype(np.float64), sha256_file(path), str(path))


def load_csv(path: Path, label_column: str | None = "label") -> Dataset:
    """Header row of feature names; empty cells are missing (NaN). Raises DataError naming row and column."""
    try:
        with open(path, newline="") as fh:
            rows = list(csv.reader(fh))
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"cannot read {path}: {exc}") from exc
    if len(rows) < 2:
        raise DataError(f"{path} needs a header row and at least one data row")
    header = [h.strip() for h in rows[0]]
    label_idx = header.index(label_column) if label_column and label_column in header else None
    feat_idx = [i for i in range(len(header)) if i != label_idx]
    x = np.empty((len(rows) - 1, len(feat_idx)), dtype=np.float32)
    y = np.empty(len(rows) - 1, dtype=np.int64) if label_idx is not None else None
    for r, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise DataError(f"{path}:{r}: {len(row)} cells, header has {len(header)}")
        for j, i in enumerate(feat_idx):
            cell = row[i].strip()
            try:
                x[r - 2, j] = float(cell) if cell else np.nan
            except ValueError:
                raise DataError(f"{path}:{r}: column {header[i]!r} has non-numeric value {cell[:20]!r}") from None
        if y is not None and label_idx is not None:
            try:
                y[r - 2] = int(row[label_idx])
            except ValueError:
                raise DataError(f"{path}:{r}: label {row[label_idx][:20]!r} is not an integer class index") from None
    names = [header[i] for i in feat_idx]
    return Dataset(x, y, names, x.astype(np.float64), sha256_file(path), str(path))


def load_image_folder(path: Path, spec: ImageSpec) -> Dataset:
    classes = sorted(p.name for p in Path(path).iterdir() if p.is_dir())
    if not classes:
        raise DataError(f"{path} has no class sub-folders (expected {path}/<class>/<image files>)")
    xs, stats, ys, blobs = [], [], [], []
    h = hashlib.sha256()
    for ci, c in enumerate(classes):
        for f in sorted((Path(path) / c).iterdir()):
            if f.suffix.lower() not in IMAGE_SUFFIXES:
                continue
            data = f.read_bytes()
            h.update(f"{c}/{f.name}\0".encode())
            h.update(hashlib.sha256(data).digest())
            try:
                img = decode_image(data, spec)
            except InputError as exc:
                raise DataError(f"{f}: {exc}") from None
            xs.append(to_input(img, spec))
            stats.append(image_stats(img))
            ys.append(ci)
            blobs.append(data)
    if not xs:
        raise DataError(f"{path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return Dataset(np.stack(xs).astype(np.float32), np.asarray(ys, dtype=np.int64), stat_names(spec),
                   np.stack(stats), h.hexdigest(), str(path), class_names=classes, images=blobs)


def load_dataset(path: Path, *, label_column: str | None = "label", image_spec: ImageSpec | None = None) -> Dataset:
    """Dispatch on the path: a folder is an image folder, ``.npz`` or ``.csv`` by suffix. Raises DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data {path} does not exist")
    if path.is_dir():
        if image_spec is None:
            raise DataError(f"{path} is an image folder but the model has no image preprocessing (--preprocess)")
        return load_image_folder(path, image_spec)
    if path.suffix == ".npz":
        return load_npz(path)
    if path.suffix == ".csv":
        return load_csv(path, label_column)
    raise DataError(f"{path}: unsupported data format {path.suffix!r}; use .npz, .csv or an image folder")
