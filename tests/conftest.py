"""Shared fixtures: a real tiny clinical model, a real key folder and a real signed package."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest


@dataclass(frozen=True)
class Built:
    root: Path  # workspace
    keys: Path
    model: Path
    calibration: Path
    holdout: Path
    package: Path  # clinical 1.0.0 for x86_64-avx2, quantize none


def _tiny_clinical(folder: Path) -> tuple[Path, Path, Path]:
    from skl2onnx import to_onnx
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = load_breast_cancer(return_X_y=True)
    x = x.astype(np.float32)
    xa, xb, ya, yb = train_test_split(x, y, test_size=0.4, random_state=0, stratify=y)
    xc, xd, yc, yd = train_test_split(xb, yb, test_size=0.5, random_state=0, stratify=yb)
    pipe = make_pipeline(StandardScaler(), MLPClassifier((64, 32), max_iter=600, random_state=0)).fit(xa, ya)
    # div="div": the scaler as Sub/Div (default domain) rather than ai.onnx.ml Scaler, so quantization can
    # follow activation types through the graph.
    scaler, clf = pipe.steps[0][1], pipe.steps[1][1]
    onx = to_onnx(pipe, xa[:1], options={id(scaler): {"div": "div"}, id(clf): {"zipmap": False}},
                  target_opset={"": 17, "ai.onnx.ml": 3})
    model = folder / "model.onnx"
    model.write_bytes(onx.SerializeToString())
    np.savez(folder / "cal.npz", x=xc, y=yc)
    np.savez(folder / "hold.npz", x=xd, y=yd)
    return model, folder / "cal.npz", folder / "hold.npz"


@pytest.fixture(scope="session")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    from model_packager.build import BuildRequest, build_package
    from model_packager.keys import init_keys

    root = tmp_path_factory.mktemp("built")
    model, cal, hold = _tiny_clinical(root)
    init_keys(root / "keys")
    pkg = root / "clinical-1.0.0.efpkg"
    build_package(BuildRequest(model=model, name="clinical", version="1.0.0", target="x86_64-avx2",
                               calibration=cal, holdout=hold, keys=root / "keys", out=pkg, quantize="none",
                               owner="clinical-ml"))
    return Built(root, root / "keys", model, cal, hold, pkg)


@dataclass(frozen=True)
class VisionBuilt:
    keys: Path
    package: Path  # vision 1.0.0 for x86_64-avx2 (image folder data, OpenCV preprocessing), quantize none
    holdout: Path  # image folder


@pytest.fixture(scope="session")
def vision_built(built: Built, tmp_path_factory: pytest.TempPathFactory) -> VisionBuilt:
    from model_packager.build import BuildRequest, build_package
    from model_packager.examples import write_examples

    root = tmp_path_factory.mktemp("vision")
    ex = write_examples(root / "examples")
    pkg = root / "vision-1.0.0.efpkg"
    build_package(BuildRequest(model=ex["vision_model"], name="vision", version="1.0.0", target="x86_64-avx2",
                               calibration=ex["vision_calibration"], holdout=ex["vision_holdout"], keys=built.keys,
                               out=pkg, quantize="none", preprocess=ex["vision_preprocess"], latency_runs=50))
    return VisionBuilt(built.keys, pkg, ex["vision_holdout"])


def extract(package: Path, dest: Path, root_pub: Path) -> Path:
    """Verify and extract a package into ``dest`` with its manifest and keyset (as a model slot holds it)."""
    from edgefleet_contracts import open_package
    from edgefleet_contracts.signing import load_public_key
    from edgefleet_contracts.timeutil import utcnow

    dest.mkdir(parents=True)
    open_package(package, load_public_key(root_pub), now=utcnow(), staging=dest)
    with tarfile.open(package, "r:") as tar:
        for name in ("manifest.json", "keyset.json"):
            data = tar.extractfile(name)
            assert data is not None
            (dest / name).write_bytes(data.read())
    return dest


def slow_onnx(model_path: Path, layers: int = 120) -> bytes:
    from model_packager.examples import slowed_model

    return slowed_model(model_path, layers)
