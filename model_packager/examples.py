"""Reproducible example models and data sets for demos and tests, built only from data bundled in scikit-learn.

:func:`write_examples` writes two small, fully reproducible examples (nothing is downloaded):

* ``clinical/``: a tabular binary classifier (``load_breast_cancer``), ``StandardScaler -> MLPClassifier`` exported
  to ONNX, with ``train.csv`` / ``calibration.csv`` / ``holdout.csv`` (header = 30 snake_case feature names plus a
  final ``label`` column), ``calibration.npz`` / ``holdout.npz`` and ``meta.json``.
* ``vision/``: a 10-class digit classifier (``load_digits``) trained on exactly what :func:`preprocess_image` makes
  of the written 32x32 grayscale PNGs, stored in an image-folder layout ``vision/<split>/<label>/<index>.png``,
  plus ``model.onnx``, ``calibration.npz`` / ``holdout.npz`` and ``meta.json``.

Splits are stratified 60/20/20 (train/calibration/holdout) with ``random_state=seed``. Every data file (CSV, NPZ,
PNG, JSON) is byte-identical between runs with the same seed; the ONNX files are too (the opset imports are put in a
canonical order because skl2onnx's order depends on Python's string hash seed).

Both ONNX models have one float32 input ``"input"`` and the outputs ``"label"`` (int64) and ``"probabilities"``
(float32, ZipMap off). The StandardScaler is exported as plain ``Sub``/``Div`` (skl2onnx option ``div="div"``)
instead of the ``ai.onnx.ml`` ``Scaler`` op: with ``Scaler``, ``onnxruntime.quantization.quant_pre_process`` removes
the ``Cast`` behind it, the quantizer then cannot type the first ``MatMul`` input, ``quantize_dynamic`` fails and
``quantize_static`` silently leaves every ``MatMul`` activation unquantized.

scikit-learn, skl2onnx and onnxruntime are imported lazily, so :func:`preprocess_image` and
:func:`load_image_folder` only need numpy and OpenCV.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import zipfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import cv2
import numpy as np
import numpy.typing as npt

from edgefleet_contracts.manifest import ImageSpec

if TYPE_CHECKING:
    import onnx

__all__ = [
    "CLINICAL_CLASS_NAMES",
    "IMAGE_SUFFIXES",
    "SPLITS",
    "VISION_PREPROCESS",
    "load_image_folder",
    "preprocess_image",
    "sanitize_feature_name",
    "write_examples",
]

FloatArray = npt.NDArray[np.float32]
IntArray = npt.NDArray[np.int64]

#: How the device turns an encoded image into the vision model's input (field names match
#: ``edgefleet_contracts.ImageSpec``). In this order: ``cv2.imdecode(buf, cv2.IMREAD_GRAYSCALE)`` (uint8);
#: ``cv2.resize(img, (width, height), interpolation=cv2.INTER_AREA)``; ``x = img.astype(float32) * float32(scale)``;
#: ``x = (x - float32(mean)) / float32(std)``; flatten row-major to ``[width * height]``, batched as ``[N, 64]``.
VISION_PREPROCESS: Final[dict[str, int | float | str]] = {
    "width": 8,
    "height": 8,
    "color": "gray",
    "resize": "area",
    "scale": 1 / 255,
    "mean": 0.0,
    "std": 1.0,
    "layout": "flat",
}

#: Split names, in the order they are made and written.
SPLITS: Final[tuple[str, str, str]] = ("train", "calibration", "holdout")
#: Class names of the clinical model; index = label (``load_breast_cancer``: 0 = malignant, 1 = benign).
CLINICAL_CLASS_NAMES: Final[tuple[str, str]] = ("malignant", "benign")
#: File suffixes :func:`load_image_folder` reads (case-insensitive); other files are ignored.
IMAGE_SUFFIXES: Final[frozenset[str]] = frozenset({".png", ".jpg", ".jpeg", ".bmp"})

_TARGET_OPSET: Final[dict[str, int]] = {"": 17, "ai.onnx.ml": 3}
_INPUT_NAME: Final = "input"
_OUTPUTS: Final[dict[str, str]] = {"label": "label", "probabilities": "probabilities"}
_VISION_PNG_SIZE: Final = 32  # written PNGs are 32x32, upscaled from the 8x8 digits with INTER_NEAREST
_ZIP_EPOCH: Final = (1980, 1, 1, 0, 0, 0)


# ---- public helpers ------------------------------------------------------------------------------------------------


def sanitize_feature_name(name: str) -> str:
    """Return ``name`` as lowercase snake_case (``"mean radius"`` -> ``"mean_radius"``).

    Raises:
        ValueError: if nothing alphanumeric is left.
    """
    out = re.sub(r"[^a-z0-9]+", "_", name.strip().lower()).strip("_")
    if not out:
        raise ValueError(f"feature name {name!r} has no letters or digits")
    return out


def vision_spec() -> ImageSpec:
    """:data:`VISION_PREPROCESS` as the contract's ImageSpec (what the package declares to devices)."""
    v = VISION_PREPROCESS
    return ImageSpec(int(v["width"]), int(v["height"]), str(v["color"]), str(v["resize"]), float(v["scale"]),
                     float(v["mean"]), float(v["std"]), str(v["layout"]))


def preprocess_image(data: bytes) -> FloatArray:
    """Decode an encoded image (PNG, JPEG, BMP...) and preprocess it as described by :data:`VISION_PREPROCESS`.

    Returns a float32 array of shape ``[height * width]`` (``[64]``).

    Raises:
        ValueError: if ``data`` is empty or not an image OpenCV can decode.
    """
    from device_agent.errors import InputError
    from device_agent.imaging import decode, to_input

    spec = vision_spec()
    try:
        x = to_input(decode(data, spec), spec)
    except InputError as exc:
        raise ValueError(f"cannot decode image ({len(data)} bytes): {exc}") from exc
    return np.ascontiguousarray(x.reshape(-1), dtype=np.float32)


def load_image_folder(folder: Path) -> tuple[FloatArray, IntArray, list[str]]:
    """Read an image-folder data set ``folder/<class>/<image>`` through :func:`preprocess_image`.

    Class names are the sorted names of the non-hidden subfolders; a label is the index of its class name. Images
    are the files with a suffix in :data:`IMAGE_SUFFIXES`, read in sorted class then sorted file-name order.

    Returns ``(x, y, class_names)`` with ``x`` float32 ``[N, 64]`` and ``y`` int64 ``[N]``.

    Raises:
        FileNotFoundError: if ``folder`` does not exist.
        NotADirectoryError: if ``folder`` is not a directory.
        ValueError: if there is no class subfolder, a class subfolder holds no image, or an image cannot be decoded.
        OSError: if a file cannot be read.
    """
    if not folder.exists():
        raise FileNotFoundError(f"image folder {folder} does not exist")
    if not folder.is_dir():
        raise NotADirectoryError(f"image folder {folder} is not a directory")
    class_names = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not class_names:
        raise ValueError(f"image folder {folder} has no class subfolders (expected {folder}/<class>/<image>)")
    rows: list[FloatArray] = []
    labels: list[int] = []
    for label, name in enumerate(class_names):
        files = sorted(
            p
            for p in (folder / name).iterdir()
            if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
        )
        if not files:
            suffixes = ", ".join(sorted(IMAGE_SUFFIXES))
            raise ValueError(f"class folder {folder / name} holds no images ({suffixes})")
        for path in files:
            try:
                rows.append(preprocess_image(path.read_bytes()))
            except ValueError as exc:
                raise ValueError(f"{path}: {exc}") from exc
            labels.append(label)
    return np.stack(rows).astype(np.float32), np.asarray(labels, dtype=np.int64), class_names


# ---- the examples --------------------------------------------------------------------------------------------------


def write_examples(out: Path, seed: int = 0) -> dict[str, Path]:
    """Write the clinical (tabular) and vision (image) examples under ``out``; see the module docstring.

    ``out/clinical`` and ``out/vision`` are created if needed; the image folders ``out/vision/{train,calibration,
    holdout}`` are deleted and rewritten so no stale image from an earlier run can leak into a split. Nothing is
    downloaded.

    Returns the paths ``clinical_model``, ``clinical_calibration``, ``clinical_holdout`` (CSV files),
    ``vision_model``, ``vision_calibration`` and ``vision_holdout`` (image folders).

    Raises:
        ImportError: if scikit-learn, skl2onnx or onnxruntime (the ``packager`` extra) is not installed.
        OSError: if the files cannot be written.
        RuntimeError: if an exported ONNX model disagrees with its scikit-learn model.
    """
    clinical = _write_clinical(out / "clinical", seed)
    vision = _write_vision(out / "vision", seed)
    preprocess = out / "vision" / "preprocess.json"
    _write_json(preprocess, dict(VISION_PREPROCESS))
    lite = _write_digits_lite(out / "digits_lite")
    return {
        "vision_preprocess": preprocess,
        "digits_lite_calibration": lite["calibration"],
        "digits_lite_holdout": lite["holdout"],
        "clinical_model": clinical["model"],
        "clinical_calibration": clinical["calibration"],
        "clinical_holdout": clinical["holdout"],
        "vision_model": vision["model"],
        "vision_calibration": vision["calibration"],
        "vision_holdout": vision["holdout"],
    }


def _write_digits_lite(folder: Path) -> dict[str, Path]:
    """Data for the committed LiteRT fixture, preprocessed as it was trained (``digits / 16``, flat [N, 64]) with
    the fixture script's split (test_size=0.25, random_state=0, stratified): 400 training rows for calibration
    and the fixture's test split as holdout."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    y = d.target.astype(np.int64)
    xa, xb, ya, yb = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"calibration": folder / "calibration.npz", "holdout": folder / "holdout.npz"}
    _write_npz(paths["calibration"], {"x": xa[:400], "y": ya[:400]})
    _write_npz(paths["holdout"], {"x": xb, "y": yb})
    return paths


def _split(n: int, y: IntArray, seed: int) -> dict[str, IntArray]:
    """Stratified 60/20/20 split of ``range(n)`` into sorted index arrays keyed by :data:`SPLITS`."""
    from sklearn.model_selection import train_test_split

    idx = np.arange(n, dtype=np.int64)
    train, rest = train_test_split(idx, test_size=0.4, stratify=y, random_state=seed)
    calibration, holdout = train_test_split(rest, test_size=0.5, stratify=y[rest], random_state=seed)
    return {
        name: np.sort(np.asarray(part, dtype=np.int64))
        for name, part in zip(SPLITS, (train, calibration, holdout), strict=True)
    }


def _write_clinical(folder: Path, seed: int) -> dict[str, Path]:
    from sklearn.datasets import load_breast_cancer
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler

    folder.mkdir(parents=True, exist_ok=True)
    data = load_breast_cancer()
    feature_names = [sanitize_feature_name(str(n)) for n in data.feature_names]
    if len(set(feature_names)) != len(feature_names):  # pragma: no cover - fixed data set
        raise RuntimeError("sanitised breast-cancer feature names collide")
    if tuple(str(n) for n in data.target_names) != CLINICAL_CLASS_NAMES:  # pragma: no cover - fixed data set
        raise RuntimeError(f"unexpected breast-cancer class names {list(data.target_names)}")
    x_all = np.asarray(data.data, dtype=np.float64)
    y_all = np.asarray(data.target, dtype=np.int64)
    parts = _split(len(y_all), y_all, seed)

    paths: dict[str, Path] = {}
    for name, idx in parts.items():
        paths[name] = folder / f"{name}.csv"
        _write_csv(paths[name], feature_names, x_all[idx], y_all[idx])
    for name in ("calibration", "holdout"):
        idx = parts[name]
        _write_npz(
            folder / f"{name}.npz",
            {
                "x": x_all[idx].astype(np.float32),
                "y": y_all[idx],
                "feature_names": np.asarray(feature_names, dtype=np.str_),
            },
        )

    clf = MLPClassifier(hidden_layer_sizes=(32, 16), max_iter=800, random_state=seed)
    pipe = Pipeline([("scaler", StandardScaler()), ("mlp", clf)])
    pipe.fit(x_all[parts["train"]], y_all[parts["train"]])
    # div="div": Sub/Div in the default domain instead of ai.onnx.ml Scaler (see module docstring).
    model = _to_onnx(
        pipe,
        "edgefleet_clinical",
        n_features=x_all.shape[1],
        options={id(clf): {"zipmap": False}, StandardScaler: {"div": "div"}},
    )
    paths["model"] = folder / "model.onnx"
    paths["model"].write_bytes(model.SerializeToString())

    x_hold = x_all[parts["holdout"]].astype(np.float32)
    y_hold = y_all[parts["holdout"]]
    onnx_labels = _check_onnx(paths["model"], x_hold, np.asarray(pipe.predict(x_hold), dtype=np.int64))
    x_train = x_all[parts["train"]]
    meta: dict[str, Any] = {
        "name": "clinical",
        "kind": "tabular",
        "source": "sklearn.datasets.load_breast_cancer",
        "seed": seed,
        "feature_names": feature_names,
        "feature_ranges": {  # over the train split
            n: [float(lo), float(hi)]
            for n, lo, hi in zip(feature_names, x_train.min(axis=0), x_train.max(axis=0), strict=True)
        },
        "class_names": list(CLINICAL_CLASS_NAMES),
        "split_sizes": {name: int(len(idx)) for name, idx in parts.items()},
        "model": {
            "file": "model.onnx",
            "estimator": "Pipeline(StandardScaler, MLPClassifier(hidden_layer_sizes=(32, 16), max_iter=800))",
            "input": {"name": _INPUT_NAME, "dtype": "float32", "shape": [-1, len(feature_names)]},
            "outputs": _OUTPUTS,
            "opset": {op.domain: op.version for op in model.opset_import},
            "n_iter": int(clf.n_iter_),
        },
        "holdout_accuracy": _accuracy(onnx_labels, y_hold),
    }
    _write_json(folder / "meta.json", meta)
    return paths


def _write_vision(folder: Path, seed: int) -> dict[str, Path]:
    from sklearn.datasets import load_digits
    from sklearn.neural_network import MLPClassifier

    folder.mkdir(parents=True, exist_ok=True)
    data = load_digits()
    images = np.asarray(data.images, dtype=np.float64)  # [N, 8, 8], values 0..16
    y_all = np.asarray(data.target, dtype=np.int64)
    class_names = [str(c) for c in range(10)]
    parts = _split(len(y_all), y_all, seed)
    pixels = np.rint(images * (255.0 / 16.0)).astype(np.uint8)

    paths: dict[str, Path] = {}
    for name, idx in parts.items():
        split_dir = folder / name
        if split_dir.exists():
            shutil.rmtree(split_dir)
        for c in class_names:
            (split_dir / c).mkdir(parents=True)
        for i in idx:
            big = cv2.resize(pixels[i], (_VISION_PNG_SIZE, _VISION_PNG_SIZE), interpolation=cv2.INTER_NEAREST)
            ok, png = cv2.imencode(".png", big)
            if not ok:  # pragma: no cover - encoding a uint8 array cannot fail
                raise OSError(f"OpenCV could not encode digit {i} as PNG")
            (split_dir / class_names[y_all[i]] / f"{int(i):04d}.png").write_bytes(png.tobytes())
        paths[name] = split_dir

    # Train and evaluate on exactly what the device's preprocessing makes of the written PNGs.
    loaded: dict[str, tuple[FloatArray, IntArray]] = {}
    for name in SPLITS:
        x, y, names = load_image_folder(paths[name])
        if names != class_names:  # pragma: no cover - we just wrote these folders
            raise RuntimeError(f"{paths[name]}: unexpected class folders {names}")
        loaded[name] = (x, y)
    for name in ("calibration", "holdout"):
        _write_npz(folder / f"{name}.npz", {"x": loaded[name][0], "y": loaded[name][1]})

    clf = MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=seed)
    clf.fit(*loaded["train"])
    n_features = int(VISION_PREPROCESS["width"]) * int(VISION_PREPROCESS["height"])
    model = _to_onnx(clf, "edgefleet_vision", n_features=n_features, options={id(clf): {"zipmap": False}})
    paths["model"] = folder / "model.onnx"
    paths["model"].write_bytes(model.SerializeToString())

    x_hold, y_hold = loaded["holdout"]
    onnx_labels = _check_onnx(paths["model"], x_hold, np.asarray(clf.predict(x_hold), dtype=np.int64))
    meta: dict[str, Any] = {
        "name": "vision",
        "kind": "image",
        "source": "sklearn.datasets.load_digits",
        "seed": seed,
        "class_names": class_names,
        "preprocess": dict(VISION_PREPROCESS),
        "image_files": {
            "layout": "<split>/<label>/<index>.png",
            "size": [_VISION_PNG_SIZE, _VISION_PNG_SIZE],
            "encoding": "8-bit grayscale PNG of round(v * 255 / 16), upscaled 8x8 -> 32x32 with INTER_NEAREST",
        },
        "split_sizes": {name: int(len(idx)) for name, idx in parts.items()},
        "model": {
            "file": "model.onnx",
            "estimator": "MLPClassifier(hidden_layer_sizes=(64,), max_iter=500)",
            "input": {"name": _INPUT_NAME, "dtype": "float32", "shape": [-1, n_features]},
            "outputs": _OUTPUTS,
            "opset": {op.domain: op.version for op in model.opset_import},
            "n_iter": int(clf.n_iter_),
        },
        "holdout_accuracy": _accuracy(onnx_labels, y_hold),
    }
    _write_json(folder / "meta.json", meta)
    return paths


# ---- ONNX ----------------------------------------------------------------------------------------------------------


def _to_onnx(
    model: object, name: str, n_features: int, options: Mapping[object, Mapping[str, object]]
) -> onnx.ModelProto:
    """Convert a fitted scikit-learn model with skl2onnx, byte-reproducibly.

    skl2onnx names the graph with a random uuid unless given ``name`` and orders ``opset_import`` by Python's
    string hash seed; both are pinned here.

    Raises:
        onnx.checker.ValidationError: if the converted model is invalid.
        RuntimeError: if the outputs are not ``label`` and ``probabilities``.
    """
    import onnx
    from skl2onnx import convert_sklearn
    from skl2onnx.common.data_types import FloatTensorType

    proto: onnx.ModelProto = convert_sklearn(
        model,
        name=name,
        initial_types=[(_INPUT_NAME, FloatTensorType([None, n_features]))],
        options=dict(options),
        target_opset=dict(_TARGET_OPSET),
    )
    # skl2onnx emits opset_import in an order that depends on PYTHONHASHSEED; sort it so the bytes are stable.
    imports = sorted((op.domain, op.version) for op in proto.opset_import)
    del proto.opset_import[:]
    proto.opset_import.extend(onnx.helper.make_opsetid(domain, version) for domain, version in imports)
    onnx.checker.check_model(proto)
    outputs = [o.name for o in proto.graph.output]
    if outputs != list(_OUTPUTS.values()):  # pragma: no cover - skl2onnx contract
        raise RuntimeError(f"unexpected ONNX outputs {outputs}")
    return proto


def _check_onnx(path: Path, x: FloatArray, expected: IntArray) -> IntArray:
    """Run ``path`` in onnxruntime on ``x`` and return its labels.

    Raises:
        RuntimeError: if the ONNX labels differ from ``expected`` (the scikit-learn predictions) on more than one row
            (float32 vs float64 arithmetic can flip a sample sitting exactly on the boundary).
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    label, _ = session.run([_OUTPUTS["label"], _OUTPUTS["probabilities"]], {_INPUT_NAME: x})
    labels = np.asarray(label, dtype=np.int64).reshape(-1)
    mismatches = int(np.count_nonzero(labels != expected))
    if mismatches > 1:
        raise RuntimeError(f"{path}: ONNX and scikit-learn disagree on {mismatches}/{len(expected)} holdout rows")
    return labels


# ---- deterministic file writers ------------------------------------------------------------------------------------


def _accuracy(predicted: IntArray, expected: IntArray) -> float:
    return round(float(np.mean(predicted == expected)), 6)


def _write_csv(path: Path, feature_names: Sequence[str], x: npt.NDArray[np.float64], y: IntArray) -> None:
    """Header = feature names + ``label``; floats as Python's shortest round-trip repr, ``\\n`` line endings."""
    with path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh, lineterminator="\n")
        writer.writerow([*feature_names, "label"])
        for row, label in zip(x, y, strict=True):
            writer.writerow([*(repr(float(v)) for v in row), int(label)])


def _write_npz(path: Path, arrays: Mapping[str, npt.NDArray[Any]]) -> None:
    """Like ``np.savez`` but byte-reproducible: ``np.savez`` stamps each member with the current time."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, array in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=_ZIP_EPOCH)
            info.create_system = 3  # unix, whatever the host
            info.external_attr = 0o644 << 16
            with zf.open(info, "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.ascontiguousarray(array), allow_pickle=False)
    path.write_bytes(buf.getvalue())


def _write_json(path: Path, doc: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def slowed_model(model_path: Path, layers: int = 120) -> bytes:
    """A deliberately slower variant of an ONNX classifier, for rollout demos and tests: the model plus
    ``layers`` layers of Tanh(h @ W) (512 wide) whose result is added to the probabilities times zero. The outputs
    are identical (so its golden-input smoke test passes); the compute per prediction grows by orders of
    magnitude, which is what a rollout's latency gate and a device's probation must catch.

    Raises onnx's checker error if the model does not have one input and a ``probabilities`` output.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    model = onnx.load(str(model_path))
    g = model.graph
    width = g.input[0].type.tensor_type.shape.dim[-1].dim_value
    for node in g.node:
        node.output[:] = ["probabilities_raw" if o == "probabilities" else o for o in node.output]
        node.input[:] = ["probabilities_raw" if i == "probabilities" else i for i in node.input]
    rng = np.random.default_rng(0)
    g.initializer.extend([
        numpy_helper.from_array((rng.standard_normal((width, 512)) * 0.05).astype(np.float32), "slow_w0"),
        numpy_helper.from_array((rng.standard_normal((512, 512)) * 0.05).astype(np.float32), "slow_w"),
    ])
    nodes = [helper.make_node("MatMul", [g.input[0].name, "slow_w0"], ["slow_h0"])]
    for i in range(layers):
        nodes += [helper.make_node("MatMul", [f"slow_h{i}", "slow_w"], [f"slow_m{i}"]),
                  helper.make_node("Tanh", [f"slow_m{i}"], [f"slow_h{i + 1}"])]
    nodes += [helper.make_node("ReduceSum", [f"slow_h{layers}"], ["slow_s"], keepdims=1),
              helper.make_node("Constant", [], ["slow_zero"],
                               value=helper.make_tensor("z", TensorProto.FLOAT, [], [0.0])),
              helper.make_node("Mul", ["slow_s", "slow_zero"], ["slow_nothing"]),
              helper.make_node("Add", ["probabilities_raw", "slow_nothing"], ["probabilities"])]
    g.node.extend(nodes)
    onnx.checker.check_model(model)
    return bytes(model.SerializeToString())
