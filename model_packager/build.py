"""``model-packager build``: measure quantization candidates, profile, calibrate, sign, write one archive."""

from __future__ import annotations

import json
import math
import subprocess
import tempfile
from dataclasses import dataclass, field, replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console
from rich.progress import Progress

from device_agent.errors import AgentError
from device_agent.runtime import open_runtime
from edgefleet_contracts.errors import SchemaError
from edgefleet_contracts.manifest import FeatureSpec, FileEntry, ImageSpec, InputSpec, Manifest, OutputSpec
from edgefleet_contracts.signing import sign_envelope
from edgefleet_contracts.targets import Target, get_target
from edgefleet_contracts.timeutil import utcnow

from .data import Dataset, check_labels, check_varies, complete, load_dataset
from .errors import DataError, FlagError, ModelError, QuantizationError
from .evaluate import Candidate, measure
from .keys import KeyFolder
from .profiling import calibration_map, feature_ranges, golden_tolerance, reference_profile
from .quantize import op_types, quantize
from .writer import check_writable, file_entry, refuse_existing, write_archive

MODES = ("auto", "none", "int8-dynamic", "int8-static")


@dataclass
class BuildRequest:
    model: Path
    name: str
    version: str
    target: str
    calibration: Path
    keys: Path
    out: Path
    holdout: Path | None = None
    quantize: str = "auto"
    owner: str = ""
    expires_in: timedelta = timedelta(days=365)
    label_column: str | None = None  # None: the column named "label", when the CSV has one; a name: it must exist
    preprocess: Path | None = None
    probabilities: str | None = None
    classes: list[str] | None = None
    max_accuracy_drop: float = 0.5  # percentage points
    golden_count: int = 8
    bins: int = 20
    mlflow_run: str | None = None
    progress: bool = False
    latency_runs: int = 300
    force: bool = False  # replace an existing ``out``


@dataclass
class BuildResult:
    path: Path
    manifest: Manifest
    report: dict[str, Any] = field(default_factory=dict)


def _image_spec(path: Path | None) -> ImageSpec | None:
    """The preprocessing spec, checked by the manifest schema's own rules (so build refuses what a device would).
    Raises DataError naming the file and the field."""
    if path is None:
        return None
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise DataError(f"cannot read preprocessing spec {path}: {exc}") from exc
    if not isinstance(d, dict):
        raise DataError(f"preprocessing spec {path} must be a JSON object (width, height, color, resize, scale, "
                        "mean, std, layout)")
    now = utcnow()
    probe = Manifest(
        name="probe", version="1", target="probe", runtime="onnxruntime", kind="image", model_file="model.onnx",
        input=InputSpec("x", "float32", (-1, 1), (FeatureSpec("f0", 0.0, 1.0),)),
        output=OutputSpec("probabilities", ("a", "b")), files={"model.onnx": FileEntry("0" * 64, 0)},
        created=now, expires=now + timedelta(days=1))
    signed = probe.to_signed()
    signed["input"]["image"] = d
    try:
        spec = Manifest.from_signed(signed).input.image
    except SchemaError as exc:
        reason = str(exc).replace("manifest.input.image.", "").replace("manifest.input.image", "the spec")
        raise DataError(f"preprocessing spec {path}: {reason}") from None
    assert spec is not None
    return spec


def _onnx_interface(model: Path, probabilities: str | None) -> tuple[str, list[int], str]:
    import onnx

    try:
        m = onnx.load(str(model))
    except Exception as exc:  # onnx raises DecodeError and others: translate
        raise ModelError(f"{model} is not a readable ONNX model: {exc}") from exc
    inits = {i.name for i in m.graph.initializer}
    inputs = [i for i in m.graph.input if i.name not in inits]
    if len(inputs) != 1:
        raise ModelError(f"{model} has {len(inputs)} inputs; edgefleet packages models with exactly one input")
    dims = [d.dim_value if d.dim_value > 0 else -1 for d in inputs[0].type.tensor_type.shape.dim]
    outs = [o.name for o in m.graph.output]
    if probabilities:
        if probabilities not in outs:
            raise ModelError(f"{model} has no output {probabilities!r}; outputs: {outs}")
        return inputs[0].name, dims, probabilities
    for cand in ("probabilities", "output_probability", "probs", "softmax"):
        if cand in outs:
            return inputs[0].name, dims, cand
    if len(outs) == 1:
        return inputs[0].name, dims, outs[0]
    raise ModelError(f"cannot tell which output of {model} holds probabilities ({outs}); pass --probabilities NAME")


def _litert_interface(model: Path) -> tuple[str, list[int], str]:
    from device_agent.runtime import LiteRtRuntime

    try:
        rt = LiteRtRuntime(model)
    except AgentError as exc:
        raise ModelError(f"{model} is not a loadable LiteRT model: {exc}") from exc
    shape = [int(s) for s in rt._in["shape_signature"]] if "shape_signature" in rt._in else list(rt._in["shape"])
    shape[0] = -1
    return rt.input_name, shape, str(rt._out["name"])


def _git_commit(where: Path) -> str | None:
    try:
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return r.stdout.strip() if r.returncode == 0 else None


def _choose(cands: list[Candidate], target: Target, mode: str, bound: float, labelled: bool) -> Candidate:
    by_mode = {c.mode: c for c in cands}
    order = list(target.prefer) if mode == "auto" else [mode]
    if mode == "auto" and "none" not in order:
        order.append("none")
    for c in cands:
        loss = -(c.accuracy_delta_points or 0.0) if labelled else 100.0 * (1.0 - c.agreement)
        if c.mode != "none" and loss > bound:
            what = "accuracy" if labelled else "agreement with the float model"
            c.rejected = f"loses {loss:.2f} points of {what} (bound {bound})"
        elif mode == "auto" and c.mode != "none" and c.size_ratio >= 1.0:
            c.rejected = f"no size benefit ({c.size_ratio:.2f}x the float model: quantization overhead dominates)"
        elif (mode == "auto" and c.mode != "none" and target.max_latency_ratio is not None and target.host_matches()
              and c.latency_ratio > target.max_latency_ratio):
            c.rejected = (f"{c.latency_ratio:.2f}x the float latency on this {target.arch} host "
                          f"(target allows {target.max_latency_ratio}x)")
    for m in order:
        pick = by_mode.get(m)
        if pick is not None and not pick.rejected:
            pick.chosen = True
            return pick
    raise QuantizationError(
        f"{mode} variant rejected: {by_mode[mode].rejected}; raise --max-accuracy-drop or use --quantize auto"
    )


MIN_EVALUATION_ROWS = 100


def few_rows_warnings(rows: int, given: int, labelled: bool, max_drop: float) -> list[str]:
    """Warnings for an evaluation too small to trust: fewer than ``MIN_EVALUATION_ROWS`` complete holdout rows
    (``given`` before rows with missing values were left out). Below that one row moves accuracy (or agreement)
    by more than a point, so the accuracy recorded for the package and the quantization gate (``max_drop``
    points) are coarse; the build goes on, and the report and the CLI say so."""
    if rows >= MIN_EVALUATION_ROWS:
        return []
    what = "accuracy" if labelled else "agreement with the float model"
    thinned = f" ({given - rows} of {given} left out for missing values)" if given > rows else ""
    return [f"{what} was measured on only {rows} complete holdout rows{thinned}: one row is "
            f"{100 / max(rows, 1):.1f} points, against a quantization bound of {max_drop:g} points; give at "
            f"least {MIN_EVALUATION_ROWS} complete rows for a meaningful evaluation"]


def check_request(req: BuildRequest) -> None:
    """Check the values a build is asked for before any work. Every manifest field a flag sets (name, version,
    owner, classes, expiry, MLflow run) goes through the manifest schema's own rule (``Manifest.from_signed``), so
    build refuses what ``verify`` would refuse. Raises FlagError naming the flag."""
    if req.quantize not in MODES:
        raise FlagError(f"--quantize {req.quantize!r} is not one of {', '.join(MODES)}")
    drop = req.max_accuracy_drop
    if isinstance(drop, bool) or not isinstance(drop, int | float) or not math.isfinite(drop) or drop < 0:
        raise FlagError(f"--max-accuracy-drop {drop!r} must be 0 or more: the percentage points of accuracy a "
                        "quantized variant may lose")
    if req.expires_in <= timedelta(0):
        raise FlagError("--expires-in must be longer than 0: every device refuses a package that has expired")
    if req.classes is not None:
        names = list(req.classes)
        if any(not c.strip() for c in names) or len(set(names)) != len(names):
            raise FlagError(f"--classes {','.join(names)!r} must be distinct, non-empty class names")
    now = utcnow()
    probe = Manifest(  # a manifest that passes the schema; each flag's value is put into it alone
        name="probe", version="1", target=req.target or "probe", runtime="onnxruntime", kind="tabular",
        model_file="model.onnx", input=InputSpec("x", "float32", (-1, 1), (FeatureSpec("f0", 0.0, 1.0),)),
        output=OutputSpec("probabilities", ("a", "b")), files={"model.onnx": FileEntry("0" * 64, 0)},
        created=now, expires=now + timedelta(days=1))
    flags: list[tuple[str, object, dict[str, Any]]] = [
        ("--name", req.name, {"name": req.name}),
        ("--version", req.version, {"version": req.version}),
        ("--owner", req.owner, {"owner": req.owner}),
        ("--expires-in", req.expires_in, {"expires": now + req.expires_in}),
        ("--mlflow-run", req.mlflow_run, {"lineage": {"mlflow_run_id": req.mlflow_run}}),
    ]
    if req.classes is not None:
        flags.append(("--classes", ",".join(req.classes), {"output": OutputSpec("probabilities", tuple(req.classes))}))
    for flag, value, change in flags:
        try:
            Manifest.from_signed(replace(probe, **change).to_signed())
        except SchemaError as exc:
            raise FlagError(f"{flag} {value!r} is not allowed in a package manifest: {exc}") from None


def build_package(req: BuildRequest, console: Console | None = None) -> BuildResult:
    """Build, sign and write a package. Raises PackagerError subclasses (FlagError, OutputExistsError and
    OutputError before any work) or ContractError with the reason.

    Rows with an empty, NaN or infinite cell (the README allows missing values) are left out of quantization
    calibration, evaluation, the calibration map, the golden inputs and the profile's prediction histograms: a
    device refuses such an input, so the model never sees it there. The profile's feature bins still count them
    (as missing). The report says how many were left out (``rows``); a data file without one complete row, labels
    that are not class indices of the model, and a model whose probabilities are not finite are refused."""
    console = console or Console(stderr=True, quiet=not req.progress)
    check_request(req)
    refuse_existing(Path(req.out), overwrite=req.force)
    check_writable(Path(req.out))  # a read-only folder is found before minutes of measuring, not after
    target = get_target(req.target)
    folder = KeyFolder(Path(req.keys))
    signing_key, keyset = folder.signing_key()  # fail early, before minutes of measuring
    suffix = Path(req.model).suffix.lower()
    runtime = {".onnx": "onnxruntime", ".tflite": "litert"}.get(suffix)
    if runtime is None:
        raise ModelError(f"{req.model}: model must be .onnx or .tflite, got {suffix!r}")
    if runtime not in target.runtimes:
        raise ModelError(f"target {target.name} has no {runtime} runtime (it has: {', '.join(target.runtimes)})")
    if not Path(req.model).is_file():
        raise ModelError(f"model file {req.model} does not exist")
    spec = _image_spec(req.preprocess)
    label = req.label_column or "label"
    cal_all = load_dataset(req.calibration, label_column=label, image_spec=spec)
    hold_all = load_dataset(req.holdout, label_column=label, image_spec=spec) if req.holdout else cal_all
    for data in (cal_all, hold_all):  # a label column named explicitly must exist: a typo would be read as a feature
        if req.label_column and data.y is None and data.source.endswith(".csv"):
            cols = data.feature_names  # no label column was found, so these are all the CSV's columns
            shown = ", ".join(cols[:40]) + (f", … ({len(cols)} in all)" if len(cols) > 40 else "")
            raise DataError(f"{data.source}: --label-column {req.label_column!r} is not a column of this CSV; its "
                            f"{len(cols)} columns are: {shown}")
    if runtime == "onnxruntime":
        input_name, shape, prob_name = _onnx_interface(req.model, req.probabilities)
    else:
        input_name, shape, prob_name = _litert_interface(req.model)
    for data in (cal_all, hold_all):
        if list(data.x.shape[1:]) != [s for s in shape[1:]] and -1 not in shape[1:]:
            raise DataError(f"{data.source}: model input {input_name} has shape {shape} but the data rows have shape "
                            f"{list(data.x.shape[1:])}")
    if cal_all.x.shape[1:] != hold_all.x.shape[1:]:
        raise DataError(f"holdout {hold_all.source} rows have shape {list(hold_all.x.shape[1:])} but calibration "
                        f"{cal_all.source} rows have shape {list(cal_all.x.shape[1:])}")
    cal, hold = complete(cal_all), complete(hold_all)
    if runtime == "onnxruntime" and req.quantize in ("auto", "int8-static"):
        check_varies(cal)
    n_classes = _probe_model(runtime, Path(req.model), prob_name, hold, target)
    if hold.class_names and len(hold.class_names) != n_classes:
        raise DataError(f"{hold.source} has {len(hold.class_names)} class folders ({', '.join(hold.class_names)}) "
                        f"but the model outputs {n_classes} probabilities")
    check_labels(hold, n_classes)
    if req.classes is not None and len(req.classes) != n_classes:
        raise FlagError(f"--classes names {len(req.classes)} classes but the model outputs {n_classes} probabilities")

    modes = ["none"]
    if runtime == "onnxruntime":
        wanted = list(target.prefer) if req.quantize == "auto" else [req.quantize]
        modes += [m for m in wanted if m != "none"]
    elif req.quantize not in ("auto", "none"):
        raise QuantizationError("LiteRT models are packaged as provided (quantize them when converting); "
                                "use --quantize auto or none")

    with tempfile.TemporaryDirectory(prefix="edgefleet-build-") as tmpdir:
        tmp = Path(tmpdir)
        cands: list[Candidate] = []
        with Progress(console=console, transient=True) as progress:
            task = progress.add_task("calibrating and evaluating", total=len(modes))
            for mode in modes:
                progress.update(task, description=f"{mode}: quantizing and evaluating on {len(hold)} rows")
                path = tmp / f"model-{mode}{suffix}"
                if mode == "none":
                    path.write_bytes(Path(req.model).read_bytes())
                else:
                    try:
                        quantize(mode, Path(req.model), path, target, cal.x, input_name)
                    except QuantizationError as exc:
                        raise QuantizationError(f"{exc} (calibration data {cal.source}: {len(cal)} complete "
                                                "rows)") from exc
                try:
                    rt = open_runtime(runtime, path, prob_name, threads=1, graph_optimization=target.graph_optimization)
                    c = Candidate(mode, path, path.stat().st_size)
                    measure(c, rt, hold.x, hold.y, cands[0] if cands else None, req.latency_runs)
                except AgentError as exc:
                    raise ModelError(f"{mode} variant does not run: {exc}") from exc
                if runtime == "onnxruntime":
                    c.op_types = op_types(path)
                cands.append(c)
                progress.advance(task)
        chosen = _choose(cands, target, req.quantize, req.max_accuracy_drop, hold.y is not None)
        assert chosen.probabilities is not None
        n_classes = chosen.probabilities.shape[1]
        classes = req.classes or hold.class_names or cal.class_names or [str(i) for i in range(n_classes)]
        if len(classes) != n_classes:
            raise DataError(f"{len(classes)} class names given but the model outputs {n_classes} probabilities")

        try:
            rt = open_runtime(runtime, chosen.path, prob_name, threads=1)
            cal_probs = np.concatenate([rt.run(cal.x[i : i + 256]) for i in range(0, len(cal), 256)])
        except AgentError as exc:
            raise ModelError(f"{chosen.mode} variant does not run on {cal.source}: {exc}") from exc
        _check_finite(cal_probs, chosen.mode, cal.source)
        profile = reference_profile(cal_all.features, cal_all.feature_names, cal_probs, classes, req.bins)
        cmap, fitted = calibration_map(chosen.probabilities, hold.y)
        payload = _payload(tmp, req, chosen, hold, profile.to_dict(), cmap.to_dict())
        report = _report(req, target, cands, chosen, cal, hold, fitted)
        report["rows"].update({"calibration_incomplete_left_out": len(cal_all) - len(cal),
                               "holdout_incomplete_left_out": len(hold_all) - len(hold)})
        report["warnings"] = few_rows_warnings(len(hold), len(hold_all), hold.y is not None, req.max_accuracy_drop)
        (tmp / "report.json").write_text(json.dumps(report, indent=1, sort_keys=True))
        payload["report.json"] = tmp / "report.json"

        model_file = "model" + suffix
        now = utcnow()
        ranges = feature_ranges(cal_all.features, cal_all.feature_names)
        manifest = Manifest(
            name=req.name, version=req.version, target=target.name, runtime=runtime,
            kind="image" if spec else "tabular", model_file=model_file,
            input=InputSpec(input_name, "float32", tuple(shape), tuple(ranges), spec),
            output=OutputSpec(prob_name, tuple(classes)),
            files={n: file_entry(p) for n, p in payload.items()},
            created=now, expires=now + req.expires_in, owner=req.owner,
            quantization={"mode": chosen.mode, "requested": req.quantize, "format": target.quant_format,
                          "activation_type": target.activation_type, "weight_type": target.weight_type,
                          "per_channel": target.per_channel},
            evaluation={k: report["chosen"][k] for k in ("accuracy", "accuracy_delta_points", "agreement",
                                                         "size_ratio", "latency_ratio", "p50_ms")},
            lineage=report["lineage"],
        )
        manifest_env = sign_envelope(manifest.to_signed(), signing_key)
        write_archive(req.out, folder.keyset_envelope(), manifest_env, payload, overwrite=req.force)
        del keyset
    return BuildResult(Path(req.out), manifest, report)


def _probe_model(runtime: str, model: Path, prob_name: str, hold: Dataset, target: Target) -> int:
    """Run the float model on a few holdout rows before the long measuring: its probabilities output must be
    ``[rows, classes]`` and finite. Returns the number of classes. Raises ModelError."""
    try:
        rt = open_runtime(runtime, model, prob_name, threads=1, graph_optimization=target.graph_optimization)
        out = np.asarray(rt.run(hold.x[:8]))
    except AgentError as exc:
        raise ModelError(f"{model} does not run on {hold.source}: {exc}") from exc
    if out.ndim != 2 or out.shape[0] != min(8, len(hold)) or out.shape[1] < 1:
        raise ModelError(f"{model}: output {prob_name!r} has shape {list(out.shape)} for {min(8, len(hold))} rows; "
                         "edgefleet needs class probabilities [rows, classes] (pass --probabilities NAME to pick "
                         "another output)")
    _check_finite(out, "none", hold.source)
    return int(out.shape[1])


def _check_finite(probs: np.ndarray, mode: str, source: str) -> None:
    bad = np.flatnonzero(~np.isfinite(probs).all(axis=1))
    if len(bad):
        raise ModelError(f"the {mode} model gives NaN or infinite probabilities for {len(bad)} complete rows of "
                         f"{source} (first: row index {bad[0]}); such a package would fail every device's smoke test")


def _payload(tmp: Path, req: BuildRequest, chosen: Candidate, hold: Dataset, profile: dict[str, Any],
             cmap: dict[str, Any]) -> dict[str, Path]:
    suffix = chosen.path.suffix
    payload = {"model" + suffix: chosen.path}
    (tmp / "profile.json").write_text(json.dumps(profile, sort_keys=True))
    (tmp / "calibration.json").write_text(json.dumps(cmap, sort_keys=True))
    payload["profile.json"] = tmp / "profile.json"
    payload["calibration.json"] = tmp / "calibration.json"
    assert chosen.probabilities is not None
    k = min(req.golden_count, len(hold))
    _check_finite(chosen.probabilities[:k], chosen.mode, hold.source)  # the device's smoke test compares these
    gold = {"x": hold.x[:k], "probabilities": chosen.probabilities[:k],
            "tolerance": np.float32(golden_tolerance(chosen.mode))}
    np.savez(tmp / "golden.npz", **gold)  # type: ignore[arg-type]
    payload["golden.npz"] = tmp / "golden.npz"
    for i, blob in enumerate(hold.images[:k]):
        p = tmp / f"golden-{i}.img"
        p.write_bytes(blob)
        payload[f"golden/{i}.img"] = p
    return payload


def _report(req: BuildRequest, target: Target, cands: list[Candidate], chosen: Candidate, cal: Dataset,
            hold: Dataset, fitted: bool) -> dict[str, Any]:
    import platform

    return {
        "target": target.name,
        "measured_on": {"machine": platform.machine(), "matches_target": target.host_matches(),
                        "note": "latency measured on the build host, single sample, one thread"},
        "rows": {"calibration": len(cal), "holdout": len(hold), "holdout_is_calibration": req.holdout is None},
        "max_accuracy_drop_points": req.max_accuracy_drop,
        "candidates": [c.to_report() for c in cands],
        "chosen": chosen.to_report(),
        "calibration_map_fitted": fitted,
        "lineage": {
            "model_sha256": file_entry(Path(req.model)).sha256,
            "calibration_sha256": cal.sha256,
            "holdout_sha256": hold.sha256 if req.holdout else None,
            "git_commit": _git_commit(Path(req.model).resolve().parent),
            "mlflow_run_id": req.mlflow_run,
        },
    }
