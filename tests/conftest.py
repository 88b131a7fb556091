"""Shared fixtures: a real tiny clinical model, a real key folder and a real signed package."""

from __future__ import annotations

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
