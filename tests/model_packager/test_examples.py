"""The bundled examples: reproducible bytes, sane models, and image preprocessing that matches the saved arrays."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path

import cv2
import numpy as np
import onnxruntime as ort
import pytest
from sklearn.datasets import load_breast_cancer, load_digits

from model_packager.examples import (
    VISION_PREPROCESS,
    load_image_folder,
    preprocess_image,
    sanitize_feature_name,
    write_examples,
)

EXPECTED_KEYS = {
    "clinical_model",
    "clinical_calibration",
    "clinical_holdout",
    "vision_model",
    "vision_calibration",
    "vision_holdout",
    "vision_preprocess",
    "digits_lite_calibration",
    "digits_lite_holdout",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, Path], dict[str, Path]]:
    first = write_examples(tmp_path_factory.mktemp("examples_a"))
    second = write_examples(tmp_path_factory.mktemp("examples_b"))
    return first, second


@pytest.fixture(scope="module")
def paths(runs: tuple[dict[str, Path], dict[str, Path]]) -> dict[str, Path]:
    return runs[0]


def _digests(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _run(model: Path, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["input"]
    assert [o.name for o in session.get_outputs()] == ["label", "probabilities"]
    label, probabilities = session.run(None, {"input": x.astype(np.float32)})
    return np.asarray(label), np.asarray(probabilities)


def _read_csv(path: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    body = np.asarray(rows[1:], dtype=np.float64)
    return rows[0], body[:, :-1], body[:, -1].astype(np.int64)


def test_returns_existing_paths(paths: dict[str, Path]) -> None:
    assert set(paths) == EXPECTED_KEYS
    assert paths["clinical_model"].is_file() and paths["vision_model"].is_file()
    assert paths["clinical_calibration"].suffix == ".csv" and paths["clinical_holdout"].suffix == ".csv"
    assert paths["vision_calibration"].is_dir() and paths["vision_holdout"].is_dir()


def test_two_runs_are_byte_identical(runs: tuple[dict[str, Path], dict[str, Path]]) -> None:
    root_a = runs[0]["clinical_model"].parent.parent
    root_b = runs[1]["clinical_model"].parent.parent
    a, b = _digests(root_a), _digests(root_b)
    assert sum(name.endswith(".png") for name in a) == len(load_digits().target)
    assert sum(name.endswith(".csv") for name in a) == 3
    assert a == b  # CSV, PNG, NPZ, JSON and the ONNX models


def test_clinical_feature_names_and_splits(paths: dict[str, Path]) -> None:
    expected = [str(n).replace(" ", "_") for n in load_breast_cancer().feature_names]
    assert len(expected) == 30 and expected[0] == "mean_radius"
    assert [sanitize_feature_name(str(n)) for n in load_breast_cancer().feature_names] == expected
    folder = paths["clinical_model"].parent
    sizes = {}
    for name in ("train", "calibration", "holdout"):
        header, x, y = _read_csv(folder / f"{name}.csv")
        assert header == [*expected, "label"]
        assert x.shape[1] == 30 and set(y.tolist()) == {0, 1}
        sizes[name] = len(y)
    assert sizes == {"train": 341, "calibration": 114, "holdout": 114}
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["feature_names"] == expected
    assert meta["class_names"] == ["malignant", "benign"]
    assert meta["split_sizes"] == sizes
    with np.load(folder / "holdout.npz") as npz:
        assert npz["x"].dtype == np.float32 and npz["y"].dtype == np.int64
        assert npz["feature_names"].tolist() == expected
        _, x_csv, y_csv = _read_csv(paths["clinical_holdout"])
        np.testing.assert_array_equal(npz["x"], x_csv.astype(np.float32))
        np.testing.assert_array_equal(npz["y"], y_csv)


def test_clinical_model_accuracy(paths: dict[str, Path]) -> None:
    with np.load(paths["clinical_model"].parent / "holdout.npz") as npz:
        x, y = npz["x"], npz["y"]
    label, probabilities = _run(paths["clinical_model"], x)
    assert probabilities.shape == (len(y), 2)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    accuracy = float(np.mean(label == y))
    assert accuracy > 0.9
    meta = json.loads((paths["clinical_model"].parent / "meta.json").read_text())
    assert meta["holdout_accuracy"] == pytest.approx(accuracy, abs=1e-6)


def test_vision_model_accuracy(paths: dict[str, Path]) -> None:
    x, y, class_names = load_image_folder(paths["vision_holdout"])
    assert class_names == [str(i) for i in range(10)]
    assert x.shape == (360, 64) and x.dtype == np.float32 and y.dtype == np.int64
    label, probabilities = _run(paths["vision_model"], x)
    assert probabilities.shape == (len(y), 10)
    accuracy = float(np.mean(label == y))
    assert accuracy > 0.85
    meta = json.loads((paths["vision_model"].parent / "meta.json").read_text())
    assert meta["holdout_accuracy"] == pytest.approx(accuracy, abs=1e-6)
    assert meta["class_names"] == class_names
    assert meta["preprocess"] == VISION_PREPROCESS


def test_png_decodes_to_the_saved_holdout_row(paths: dict[str, Path]) -> None:
    holdout = paths["vision_holdout"]
    files = sorted(holdout.glob("*/*.png"), key=lambda p: (p.parent.name, p.name))
    digits = load_digits()
    with np.load(holdout.parent / "holdout.npz") as npz:
        x, y = npz["x"], npz["y"]
    assert len(files) == len(y)
    for k in (0, 1, len(files) // 2, len(files) - 1):
        png = files[k]
        img = cv2.imread(str(png), cv2.IMREAD_UNCHANGED)
        assert img is not None
        assert img.shape == (32, 32) and img.dtype == np.uint8
        row = preprocess_image(png.read_bytes())
        assert row.shape == (64,) and row.dtype == np.float32
        np.testing.assert_array_equal(row, x[k])
        assert y[k] == int(png.parent.name)
        original = digits.images[int(png.stem)].reshape(-1) / 16.0  # the file name is the load_digits index
        np.testing.assert_allclose(row, original, atol=0.5 / 255 + 1e-6)


def test_matches_the_device_preprocessing(paths: dict[str, Path]) -> None:
    from device_agent import imaging
    from edgefleet_contracts.manifest import ImageSpec

    spec = ImageSpec(**VISION_PREPROCESS)  # type: ignore[arg-type]
    for png in sorted(paths["vision_calibration"].glob("*/*.png"))[::37]:
        data = png.read_bytes()
        device_row, _ = imaging.preprocess(data, spec)
        np.testing.assert_array_equal(preprocess_image(data), device_row)


def test_preprocess_image_rejects_non_images() -> None:
    with pytest.raises(ValueError, match="decode"):
        preprocess_image(b"not an image")
    with pytest.raises(ValueError, match="decode"):
        preprocess_image(b"")


def test_load_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        load_image_folder(tmp_path / "missing")
    with pytest.raises(ValueError, match="no class subfolders"):
        load_image_folder(tmp_path)
    (tmp_path / "cat").mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        load_image_folder(tmp_path)
    (tmp_path / "cat" / "broken.png").write_bytes(b"not an image")
    with pytest.raises(ValueError, match="broken.png"):
        load_image_folder(tmp_path)
