"""Inputs the packager audit found mishandled: each is refused in one line naming the file or flag (no traceback,
no package), or, for missing values, handled by a stated rule (evaluate on complete rows, say how many were left
out). Real files, real onnxruntime."""

from __future__ import annotations

import csv
import io
import json
import os
import resource
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from model_packager.build import BuildRequest, build_package
from model_packager.cli import main

N_FEATURES = 30  # the tiny clinical model of conftest (breast cancer)


def _args(built, out: Path, *extra: str, model: Path | None = None, calibration: Path | None = None,
          holdout: Path | None = None) -> list[str]:
    return ["build", str(model or built.model), "--name", "clinical", "--version", "2.0.0", "--target",
            "x86_64-avx2", "--calibration", str(calibration or built.calibration), "--holdout",
            str(holdout or built.holdout), "--keys", str(built.keys), "--out", str(out), "--quantize", "none",
            "--quiet", *extra]


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str], *needles: str) -> str:
    """main() exits 1 with one line on stderr holding every needle (an exception escaping main fails the test)."""
    assert main(argv) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for n in needles:
        assert n in err, err
    return err


def _hold(built) -> tuple[np.ndarray, np.ndarray]:
    with np.load(built.holdout) as z:
        return z["x"].copy(), z["y"].copy()


def _req(built, out: Path, **over) -> BuildRequest:
    kw = dict(model=built.model, name="clinical", version="2.0.0", target="x86_64-avx2", calibration=built.calibration,
              holdout=built.holdout, keys=built.keys, out=out, quantize="none", latency_runs=10)
    kw.update(over)
    return BuildRequest(**kw)


def _onnx_model(path: Path, body: str) -> Path:
    """A one-input model over the 30 clinical features: ``rank1`` outputs [N] (no class axis), ``nan`` outputs
    [N, 30] of NaN for the (positive) clinical inputs."""
    import onnx
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [None, N_FEATURES])
    if body == "rank1":
        axes = helper.make_tensor("axes", TensorProto.INT64, [1], [1])
        nodes = [helper.make_node("ReduceSum", ["input", "axes"], ["probabilities"], keepdims=0)]
        out = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None])
        inits = [axes]
    else:
        nodes = [helper.make_node("Neg", ["input"], ["n"]), helper.make_node("Sqrt", ["n"], ["probabilities"])]
        out = helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, N_FEATURES])
        inits = []
    graph = helper.make_graph(nodes, body, [x], [out], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


# ---- the output ------------------------------------------------------------------------------------------------
def test_a_read_only_out_folder_is_refused_before_any_measuring(built, tmp_path, capsys):
    corrupt = tmp_path / "corrupt.npz"
    corrupt.write_bytes(b"not a zip")  # would be refused if data were read first
    out = Path("/proc/edgefleet-audit.efpkg")  # read-only even for root
    _refused(_args(built, out, calibration=corrupt), capsys, f"cannot write --out {out}", "does not accept")


def test_a_write_failure_names_the_out_path_not_the_hidden_temporary_file(built, tmp_path):
    """The file-size limit makes the kernel refuse the archive as a full disk would (EFBIG instead of ENOSPC)."""
    out = tmp_path / "p.efpkg"
    limit = built.model.stat().st_size + (built.package.stat().st_size - built.model.stat().st_size) // 2

    def small_files() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    code = "import sys; from model_packager.cli import main; raise SystemExit(main(sys.argv[1:]))"
    r = subprocess.run([sys.executable, "-c", code, *_args(built, out)], capture_output=True, text=True,
                       preexec_fn=small_files, env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, timeout=300)
    err = r.stderr.strip()
    assert r.returncode == 1 and len(err.splitlines()) == 1, err
    assert f"cannot write --out {out}: File too large" in err and ".tmp" not in err
    assert list(tmp_path.iterdir()) == []  # no package and no temporary left behind


def test_an_out_path_ending_in_a_slash_is_refused(built, tmp_path, capsys):
    out = f"{tmp_path}/trailing/"
    _refused([*_args(built, tmp_path / "unused.efpkg"), "--out", out], capsys,  # the last --out counts
             f"--out {out!r} names a folder")
    assert not (tmp_path / "trailing").exists()


# ---- unreadable or empty data ----------------------------------------------------------------------------------
@pytest.mark.parametrize("which", ["calibration", "holdout"])
def test_a_corrupt_npz_is_one_line_naming_it(built, tmp_path, capsys, which):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04" + b"garbage" * 20)
    _refused(_args(built, tmp_path / "p.efpkg", **{which: bad}), capsys, f"cannot read {bad} as .npz")


@pytest.mark.parametrize("which", ["calibration", "holdout"])
def test_data_with_no_rows_is_refused_naming_the_file(built, tmp_path, capsys, which):
    empty = tmp_path / "empty.npz"
    np.savez(empty, x=np.zeros((0, N_FEATURES), np.float32), y=np.zeros(0, np.int64))
    _refused(_args(built, tmp_path / "p.efpkg", **{which: empty}), capsys, f"{empty}: x has no rows")


def test_holdout_with_the_wrong_number_of_columns_is_refused_up_front(built, tmp_path, capsys):
    x, y = _hold(built)
    bad = tmp_path / "narrow.npz"
    np.savez(bad, x=x[:, :5], y=y)
    _refused(_args(built, tmp_path / "p.efpkg", holdout=bad), capsys, str(bad), "[5]")


@pytest.mark.parametrize("values", [np.nan, np.inf])
def test_calibration_without_a_complete_row_is_refused_naming_it(built, tmp_path, capsys, values):
    x, y = _hold(built)
    bad = tmp_path / "nan.npz"
    np.savez(bad, x=np.full_like(x, values), y=y)
    _refused(_args(built, tmp_path / "p.efpkg", "--quantize", "int8-static", calibration=bad), capsys,
             str(bad), "none of its", "is complete")


def test_constant_calibration_data_is_named_instead_of_a_scale_error(built, tmp_path, capsys):
    x, _ = _hold(built)
    flat = tmp_path / "flat.npz"
    np.savez(flat, x=np.ones_like(x))
    _refused(_args(built, tmp_path / "p.efpkg", "--quantize", "int8-static", calibration=flat), capsys,
             str(flat), "identical")


# ---- models ----------------------------------------------------------------------------------------------------
def test_a_corrupt_tflite_model_is_one_line(built, tmp_path, capsys):
    bad = tmp_path / "model.tflite"
    bad.write_bytes(b"nonsense" * 40)
    _refused(_args(built, tmp_path / "p.efpkg", model=bad), capsys, str(bad), "not a loadable LiteRT model")


def test_a_model_whose_output_has_no_class_axis_is_refused(built, tmp_path, capsys):
    model = _onnx_model(tmp_path / "rank1.onnx", "rank1")
    _refused(_args(built, tmp_path / "p.efpkg", model=model), capsys, "'probabilities' has shape [8]",
             "[rows, classes]")


def test_a_model_giving_nan_probabilities_is_never_signed(built, tmp_path, capsys):
    model = _onnx_model(tmp_path / "nan.onnx", "nan")
    out = tmp_path / "p.efpkg"
    _refused(_args(built, out, model=model), capsys, "NaN or infinite probabilities", "smoke test")
    assert not out.exists()


# ---- the preprocessing spec ------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"width": 0}, "width must be >= 1"),
        ({"height": -8}, "height must be >= 1"),
        ({"resize": "cubic"}, "resize 'cubic' is not area, linear or nearest"),
        ({"color": "cmyk"}, "color 'cmyk' is not gray, rgb or bgr"),
        ({"layout": "hwc"}, "layout 'hwc' is not flat, nhwc or nchw"),
        ({"std": 0}, "std must be positive"),
    ],
)
def test_a_bad_preprocessing_spec_names_the_field(built, tmp_path, capsys, change, message):
    spec = {"width": 8, "height": 8, "color": "gray", "resize": "area", "scale": 1 / 255, "mean": 0.0, "std": 1.0,
            "layout": "flat"}
    path = tmp_path / "preprocess.json"
    path.write_text(json.dumps({**spec, **change}))
    _refused(_args(built, tmp_path / "p.efpkg", "--preprocess", str(path)), capsys,
             f"preprocessing spec {path}: {message}")


# ---- labels ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad_label", [7, -1])
def test_labels_outside_the_models_classes_are_refused_naming_the_row(built, tmp_path, capsys, bad_label):
    x, y = _hold(built)
    y[3] = bad_label
    hold = tmp_path / "hold.npz"
    np.savez(hold, x=x, y=y)
    out = tmp_path / "p.efpkg"
    _refused(_args(built, out, holdout=hold), capsys, f"{hold}: y[3]: label {bad_label}", "2-class model")
    assert not out.exists()


def test_a_csv_label_outside_the_classes_names_its_line(built, tmp_path, capsys):
    x, y = _hold(built)
    y[2] = 2
    hold = tmp_path / "hold.csv"
    with open(hold, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow([f"f{i}" for i in range(N_FEATURES)] + ["label"])
        w.writerows([*map(float, row), int(lab)] for row, lab in zip(x, y, strict=True))
    _refused(_args(built, tmp_path / "p.efpkg", holdout=hold), capsys, f"{hold}:4: label 2")


def test_fractional_labels_are_refused_not_truncated(built, tmp_path, capsys):
    x, y = _hold(built)
    yf = y.astype(np.float64)
    yf[5] = 0.5
    hold = tmp_path / "hold.npz"
    np.savez(hold, x=x, y=yf)
    _refused(_args(built, tmp_path / "p.efpkg", holdout=hold), capsys, f"{hold}: y[5] = 0.5 is not a whole number")


# ---- missing values: evaluated on complete rows, the count said -------------------------------------------------
def test_all_nan_holdout_rows_are_left_out_and_golden_outputs_are_finite(built, tmp_path, capsys):
    x, y = _hold(built)
    x[:5] = np.nan
    hold = tmp_path / "hold.npz"
    np.savez(hold, x=x, y=y)
    out = tmp_path / "p.efpkg"
    assert main(_args(built, out, holdout=hold)) == 0
    out_text = capsys.readouterr().out
    assert "5 holdout rows with an empty, NaN or infinite value were left out" in out_text
    assert "warning" not in out_text  # 109 complete rows are enough
    with tarfile.open(out) as tar:
        golden = tar.extractfile("golden.npz")
        assert golden is not None
        with np.load(golden) as g:
            assert np.isfinite(g["x"]).all() and np.isfinite(g["probabilities"]).all()
        report = json.load(tar.extractfile("report.json"))  # type: ignore[arg-type]
    assert report["rows"]["holdout_incomplete_left_out"] == 5 and report["rows"]["holdout"] == len(x) - 5
    assert main(["verify", str(out), "--root", str(built.keys / "root.pub")]) == 0


def test_a_small_holdout_builds_with_a_warning_that_names_its_resolution(built, tmp_path, capsys):
    x, y = _hold(built)
    hold = tmp_path / "hold.npz"
    np.savez(hold, x=x[:40], y=y[:40])
    assert main(_args(built, tmp_path / "p.efpkg", holdout=hold)) == 0
    assert ("  warning: accuracy was measured on only 40 complete holdout rows: one row is 2.5 points, against a "
            "quantization bound of 0.5 points") in capsys.readouterr().out


def test_five_percent_empty_cells_leave_evaluation_and_the_auto_choice_meaningful(built, tmp_path):
    x, y = _hold(built)
    clean = build_package(_req(built, tmp_path / "clean.efpkg", quantize="auto"))
    rng = np.random.default_rng(0)
    xm = x.copy()
    xm[rng.random(xm.shape) < 0.05] = np.nan
    hold = tmp_path / "hold.npz"
    np.savez(hold, x=xm, y=y)
    result = build_package(_req(built, tmp_path / "p.efpkg", holdout=hold, quantize="auto"))
    complete = int(np.isfinite(xm).all(axis=1).sum())
    assert result.report["rows"]["holdout"] == complete
    assert result.report["rows"]["holdout_incomplete_left_out"] == len(x) - complete
    float_cand = next(c for c in result.report["candidates"] if c["mode"] == "none")
    clean_float = next(c for c in clean.report["candidates"] if c["mode"] == "none")
    assert clean.report["warnings"] == []  # 114 complete rows
    assert complete < 100 and result.report["warnings"] == [  # thinned below the minimum: said, not refused
        f"accuracy was measured on only {complete} complete holdout rows ({len(x) - complete} of {len(x)} left out "
        f"for missing values): one row is {100 / complete:.1f} points, against a quantization bound of 0.5 points; "
        "give at least 100 complete rows for a meaningful evaluation"]
    assert float_cand["accuracy"] >= clean_float["accuracy"] - 0.1  # not the ~0.5 of a model fed NaN
    for c in result.report["candidates"]:
        assert c["agreement"] >= 0.9, c  # quantized variants agree with float on what a device would run


# ---- inspect -----------------------------------------------------------------------------------------------------
def test_inspect_shows_a_manifest_with_malformed_fields_instead_of_failing(built, tmp_path, capsys):
    with tarfile.open(built.package) as tar:
        env = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    env["signed"]["quantization"] = ["int8"]
    env["signed"]["evaluation"] = "good"
    env["signed"]["files"] = {"model.onnx": [1, 2]}
    pkg = tmp_path / "odd.efpkg"
    data = json.dumps(env).encode()
    with tarfile.open(pkg, "w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    assert main(["inspect", str(pkg)]) == 0
    out = capsys.readouterr().out
    assert "quantization: None (requested None)" in out and "not verified" in out


def test_inspect_refuses_an_oversized_extended_header_before_reading_it(built, tmp_path, capsys):
    pkg = tmp_path / "padded.efpkg"
    with tarfile.open(built.package) as src, tarfile.open(pkg, "w", format=tarfile.PAX_FORMAT) as tar:
        for i, m in enumerate(src.getmembers()):
            if i == 0:
                m.pax_headers = {"comment": "A" * (2 << 20)}
            tar.addfile(m, src.extractfile(m))
    assert main(["inspect", str(pkg)]) == 1
    assert "extended tar header" in capsys.readouterr().err
