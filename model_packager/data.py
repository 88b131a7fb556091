"""Reading calibration and holdout data: ``.npz`` (``x``, optional ``y``), CSV with a header, image folders.

An image folder is ``DIR/<class name>/<file>`` (PNG/JPEG/BMP); classes are the sorted folder names. Images are
decoded and preprocessed with the agent's own code (``device_agent.imaging``) so that what the packager
measures is exactly what a device computes.
"""

from __future__ import annotations

import csv
import hashlib
import zipfile
from dataclasses import dataclass, field, replace
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
            y_raw = np.asarray(z["y"]) if "y" in z else None
            names = [str(n) for n in z["feature_names"]] if "feature_names" in z else None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DataError(f"cannot read {path} as .npz (a damaged or truncated file?): {exc}") from exc
    if x.ndim != 2:
        raise DataError(f"{path}: x must be 2-D [rows, features], got shape {x.shape}")
    if len(x) == 0:
        raise DataError(f"{path}: x has no rows")
    y = None if y_raw is None else _whole_labels(y_raw, path)
    if y is not None and len(y) != len(x):
        raise DataError(f"{path}: x has {len(x)} rows but y has {len(y)}")
    names = names or feature_names or [f"f{i}" for i in range(x.shape[1])]
    return Dataset(x, y, names, x.astype(np.float64), sha256_file(path), str(path))


def _whole_labels(y: np.ndarray, path: Path) -> np.ndarray:
    """``y`` as int64 class indices; DataError naming the first label that is not a whole number (0.5 would
    otherwise be truncated to 0 silently)."""
    if y.ndim != 1:
        raise DataError(f"{path}: y must be 1-D [rows], got shape {y.shape}")
    if y.dtype.kind in "iu":
        return y.astype(np.int64)
    if y.dtype.kind not in "fb":
        raise DataError(f"{path}: y holds {y.dtype} values; labels must be integer class indices")
    yf = y.astype(np.float64)
    bad = np.flatnonzero(~np.isfinite(yf) | (yf != np.round(yf)))
    if len(bad):
        raise DataError(f"{path}: y[{bad[0]}] = {yf[bad[0]]:g} is not a whole number; labels must be integer class "
                        f"indices ({len(bad)} such labels)")
    return yf.astype(np.int64)


def check_labels(data: Dataset, n_classes: int) -> None:
    """Refuse labels outside ``0 .. n_classes - 1`` (they would count as wrong predictions and make the accuracy
    meaningless). Raises DataError naming the file and the first bad row (CSV line, ``y[i]`` otherwise)."""
    if data.y is None:
        return
    bad = np.flatnonzero((data.y < 0) | (data.y >= n_classes))
    if len(bad):
        i = int(bad[0])
        where = f"{data.source}:{i + 2}" if data.source.endswith(".csv") else f"{data.source}: y[{i}]"
        raise DataError(f"{where}: label {int(data.y[i])} is not a class index of this {n_classes}-class model "
                        f"(0..{n_classes - 1}); {len(bad)} labels are out of range")


def complete_rows(x: np.ndarray) -> np.ndarray:
    """Boolean mask of the rows whose every value is finite (no empty cell, NaN or inf)."""
    return np.isfinite(x.reshape(len(x), -1)).all(axis=1)


def complete(data: Dataset) -> Dataset:
    """The rows of ``data`` without an empty, NaN or infinite cell (what a device would run the model on). Raises
    DataError when no row is complete."""
    ok = complete_rows(data.x)
    if ok.all():
        return data
    if not ok.any():
        raise DataError(f"{data.source}: none of its {len(data)} rows is complete (each has an empty, NaN or "
                        "infinite value); the model cannot be evaluated or calibrated on it")
    return replace(data, x=data.x[ok], y=None if data.y is None else data.y[ok], features=data.features[ok],
                   images=[b for b, keep in zip(data.images, ok, strict=False) if keep] if data.images else [])


def check_varies(data: Dataset) -> None:
    """Refuse calibration data whose complete rows are all the same: int8-static quantization derives its scales
    from the spread of the values and would fail with an obscure "scale" error. Raises DataError."""
    flat = data.x.reshape(len(data), -1)
    if len(flat) >= 2 and not np.ptp(flat, axis=0).any():
        raise DataError(f"{data.source}: all {len(flat)} complete rows are identical; calibration data must vary "
                        "(int8-static quantization takes its scales from the spread of the values; --quantize none "
                        "skips it)")


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
