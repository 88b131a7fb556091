"""Building packages for real: onnxruntime quantization, candidate choice, profile, calibration, golden inputs."""

from __future__ import annotations

import hashlib
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest

from device_agent.runtime import LiteRtRuntime, open_runtime
from edgefleet_contracts.profile import CalibrationMap, Profile
from edgefleet_contracts.targets import UnknownTargetError, UnsupportedTargetError
from model_packager.build import BuildRequest, build_package
from model_packager.cli import main
from model_packager.errors import DataError, ModelError, QuantizationError
from model_packager.quantize import op_types

FIXTURE = Path(__file__).resolve().parents[2] / "model_packager" / "fixtures" / "digits_int8.tflite"


def _req(built, tmp_path: Path, **over) -> BuildRequest:
    kw = dict(model=built.model, name="clinical", version="2.0.0", target="x86_64-avx2", calibration=built.calibration,
              holdout=built.holdout, keys=built.keys, out=tmp_path / "p.efpkg")
    kw.update(over)
    return BuildRequest(**kw)


def _payload(pkg: Path, name: str) -> bytes:
    with tarfile.open(pkg, "r:") as tar:
        return tar.extractfile(name).read()  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("mode", "must_have", "must_not_have"),
    [
        ("int8-dynamic", {"MatMulInteger", "DynamicQuantizeLinear"}, set()),
        ("int8-static", {"DequantizeLinear", "QuantizeLinear"}, {"MatMulInteger"}),
    ],
)
def test_quantized_variant_has_integer_ops_is_smaller_and_agrees(built, tmp_path, mode, must_have, must_not_have):
    r = build_package(_req(built, tmp_path, quantize=mode))
    chosen = r.report["chosen"]
    with tarfile.open(r.path, "r:") as tar:
        tar.extract("model.onnx", tmp_path, filter="data")
    ops = set(op_types(tmp_path / "model.onnx"))
    assert must_have <= ops and not (must_not_have & ops)
    assert chosen["mode"] == mode and chosen["size_ratio"] < 0.9
    assert chosen["agreement"] >= 0.97 and abs(chosen["accuracy_delta_points"]) <= 0.5
    assert r.manifest.quantization["mode"] == mode and r.manifest.quantization["activation_type"] == "uint8"


def test_auto_measures_every_candidate_and_picks_the_targets_preference(built, tmp_path):
    r = build_package(_req(built, tmp_path, target="rpi4-aarch64"))
    modes = [c["mode"] for c in r.report["candidates"]]
    assert modes == ["none", "int8-static", "int8-dynamic"]
    assert all(c["p50_ms"] > 0 and c["accuracy"] is not None for c in r.report["candidates"])
    assert r.report["chosen"]["mode"] == "int8-static"  # rpi4 prefers QDQ int8; within the accuracy bound
    assert r.report["measured_on"]["matches_target"] is False


def _lossy(tmp_path: Path) -> dict[str, Path]:
    """A model int8 cannot keep: the class is the sign of a feature of about 0.01 next to a feature of 1000, so
    8-bit activations over that range round the small one to zero and both logits tie (half the rows wrong)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["logits"]),
         helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1)],
        "lossy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, 2])],
        [numpy_helper.from_array(np.array([[0.0, 0.0], [-1.0, 1.0]], np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, tmp_path / "lossy.onnx")
    rng = np.random.default_rng(0)
    paths = {"model": tmp_path / "lossy.onnx"}
    for name in ("calibration", "holdout"):
        small = rng.uniform(0.005, 0.05, 200) * rng.choice([-1.0, 1.0], 200)
        np.savez(tmp_path / f"lossy-{name}.npz", x=np.stack([np.full(200, 1000.0), small], 1).astype(np.float32),
                 y=(small > 0).astype(np.int64))
        paths[name] = tmp_path / f"lossy-{name}.npz"
    return paths


def test_explicit_mode_beyond_the_accuracy_bound_is_refused(built, tmp_path):
    with pytest.raises(QuantizationError, match="int8-dynamic variant rejected: loses .* points"):
        build_package(_req(built, tmp_path, quantize="int8-dynamic", name="lossy", **_lossy(tmp_path)))
    assert not (tmp_path / "p.efpkg").exists()


def test_auto_falls_back_to_float_when_every_int8_variant_loses_accuracy(built, tmp_path):
    r = build_package(_req(built, tmp_path, name="lossy", **_lossy(tmp_path)))
    assert r.report["chosen"]["mode"] == "none"
    rejected = [c["rejected"] for c in r.report["candidates"] if c["mode"] != "none"]
    assert rejected and all("points of accuracy" in why for why in rejected)


def test_package_carries_profile_calibration_and_golden_inputs(built, tmp_path):
    r = build_package(_req(built, tmp_path, quantize="none"))
    prof = Profile.from_dict(json.loads(_payload(r.path, "profile.json")))
    assert len(prof.features) == 30 and prof.features[0].name == "f0"
    assert all(sum(f.counts) == prof.n and f.counts[0] == 0 and f.counts[-1] == 0 for f in prof.features)
    assert max(len(f.edges) for f in prof.features) == 21  # 20 bins between quantile edges
    assert sum(prof.class_counts) == prof.n == sum(prof.confidence_counts)
    cmap = CalibrationMap.from_dict(json.loads(_payload(r.path, "calibration.json")))
    assert all(a <= b for a, b in zip(cmap.accuracy, cmap.accuracy[1:], strict=False))  # monotone
    assert r.report["calibration_map_fitted"] is True
    (tmp_path / "g.npz").write_bytes(_payload(r.path, "golden.npz"))
    (tmp_path / "m.onnx").write_bytes(_payload(r.path, "model.onnx"))
    g = np.load(tmp_path / "g.npz")
    out = open_runtime("onnxruntime", tmp_path / "m.onnx", "probabilities").run(g["x"])
    np.testing.assert_allclose(out, g["probabilities"], atol=float(g["tolerance"]))
    lin = r.manifest.lineage
    assert lin["calibration_sha256"] == hashlib.sha256(built.calibration.read_bytes()).hexdigest()
    assert lin["model_sha256"] == hashlib.sha256(built.model.read_bytes()).hexdigest()
    lo, hi = r.manifest.input.features[0].min, r.manifest.input.features[0].max
    assert lo >= 0 and hi > lo


def test_unknown_and_unsupported_targets_are_clear_errors(built, tmp_path, capsys):
    with pytest.raises(UnknownTargetError, match="known targets: "):
        build_package(_req(built, tmp_path, target="vax"))
    with pytest.raises(UnsupportedTargetError, match="no armv7"):
        build_package(_req(built, tmp_path, target="armv7-32bit"))
    args = ["build", str(built.model), "--name", "c", "--version", "1", "--target", "armv7-32bit", "--calibration",
            str(built.calibration), "--keys", str(built.keys), "--out", str(tmp_path / "x.efpkg"), "--quiet"]
    assert main(args) == 1
    assert "armv7-32bit' is not supported" in capsys.readouterr().err


def test_bad_inputs_name_the_problem(built, tmp_path):
    (tmp_path / "bad.csv").write_text("a,b,label\n1,zz,0\n")
    with pytest.raises(DataError, match=r"bad.csv:2: column 'b' has non-numeric value 'zz'"):
        build_package(_req(built, tmp_path, calibration=tmp_path / "bad.csv"))
    (tmp_path / "narrow.npz").write_bytes(b"")
    np.savez(tmp_path / "narrow.npz", x=np.zeros((5, 3), np.float32))
    with pytest.raises(DataError, match="rows have shape \\[3\\]"):
        build_package(_req(built, tmp_path, calibration=tmp_path / "narrow.npz"))
    (tmp_path / "m.onnx").write_bytes(b"not a model")
    with pytest.raises(ModelError, match="not a readable ONNX model"):
        build_package(_req(built, tmp_path, model=tmp_path / "m.onnx"))


def test_litert_fixture_is_the_committed_one_and_runs_through_ai_edge_litert():
    expected = (FIXTURE.parent / "digits_int8.tflite.sha256").read_text().strip()
    assert hashlib.sha256(FIXTURE.read_bytes()).hexdigest() == expected
    from sklearn.datasets import load_digits

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    rt = LiteRtRuntime(FIXTURE)
    assert type(rt.interp).__module__.startswith("ai_edge_litert")
    probs = rt.run(x[:300])
    assert probs.shape == (300, 10) and (probs.argmax(1) == d.target[:300]).mean() > 0.9


def test_litert_package_builds_and_verifies(built, tmp_path, capsys):
    from sklearn.datasets import load_digits

    d = load_digits()
    np.savez(tmp_path / "digits.npz", x=(d.data[:400] / 16.0).astype(np.float32), y=d.target[:400])
    out = tmp_path / "digits.efpkg"
    assert main(["build", str(FIXTURE), "--name", "digits-lite", "--version", "1.0", "--target", "rpi5-aarch64",
                 "--calibration", str(tmp_path / "digits.npz"), "--keys", str(built.keys), "--out", str(out),
                 "--quiet"]) == 0
    assert main(["verify", str(out), "--root", str(built.keys / "root.pub"), "--target", "rpi5-aarch64"]) == 0
    capsys.readouterr()
    assert main(["inspect", str(out), "--json"]) == 0
    signed = json.loads(capsys.readouterr().out)
    assert signed["runtime"] == "litert" and signed["quantization"]["mode"] == "none"
    with pytest.raises(QuantizationError, match="LiteRT models are packaged as provided"):
        build_package(_req(built, tmp_path, model=FIXTURE, calibration=tmp_path / "digits.npz", holdout=None,
                           quantize="int8-static"))


def test_evaluation_scores_one_row_a_run_as_a_device_serves(built, tmp_path):
    """The int8-dynamic variant computes its activation scales per run: scored in batches its accuracy was not the
    device's. The package's evaluation must be what a device gets predicting the holdout one row at a time."""
    from device_agent.model import load_model
    from edgefleet_contracts.targets import get_target
    from model_packager.evaluate import predict_all
    from tests.conftest import extract

    r = build_package(_req(built, tmp_path, quantize="int8-dynamic", name="q"))
    evaluation = r.manifest.evaluation
    model = load_model(extract(r.path, tmp_path / "slot", built.keys / "root.pub"), get_target("x86_64-avx2"))
    with np.load(built.holdout) as h:
        x, y = h["x"].astype(np.float32), h["y"]
    rt = model.runtime
    single = np.concatenate([rt.run(x[i:i + 1]) for i in range(len(x))])
    assert not np.array_equal(rt.run(x), single), "batching changes nothing for this model: the test proves nothing"
    assert np.array_equal(predict_all(rt, x), single)
    assert evaluation["accuracy"] == pytest.approx(float((single.argmax(axis=1) == y).mean()), abs=1e-12)
