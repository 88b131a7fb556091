"""Agent overhead on the hot path: bare onnxruntime vs Agent.predict, same model, inputs, process and thread.

    .venv/bin/python bench/agent_overhead.py [--n 20000] [--runs 5] [--out /tmp/edgefleet-bench-agent]

Single sample, one intra-op thread, validation + window summaries + prediction log on. Bare and agent calls
are measured in interleaved blocks so machine noise hits both alike; ``--runs`` repeats the whole measurement
and the table gives the median of the runs (the Δ p50 column also the range; Δ and ratio are agent against
bare). "bound" is the model call the agent itself makes (onnxruntime IOBinding on a preallocated row, the input
copied in) without any of the agent's work: agent minus bound is what the agent's own work costs, bare minus
bound what the binding saves over ``InferenceSession.run``. The vision baseline includes the
same OpenCV decode/resize/normalise the app would otherwise do itself, so both sides do that work; the agent
adds its own: the image statistics (1 image in 4, computed when the staged rows are binned), staging, the log.
p50 is the typical call; the mean includes the batch binning every 128 calls (it is also in the p99). After
each model the agent's summary is checked to hold every prediction. Also: summarisation throughput for a batch
of 200,000 x 30 (vectorised binning) and row by row.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import onnxruntime as ort  # noqa: E402

from device_agent import imaging  # noqa: E402
from device_agent.agent import Agent  # noqa: E402
from device_agent.config import DeviceConfig  # noqa: E402
from device_agent.model import load_model  # noqa: E402
from device_agent.predlog import PredictionLog  # noqa: E402
from device_agent.window import BATCH, Window  # noqa: E402
from edgefleet_contracts.targets import get_target  # noqa: E402
from model_packager.build import BuildRequest, build_package  # noqa: E402
from model_packager.examples import write_examples  # noqa: E402
from model_packager.keys import init_keys  # noqa: E402
from tests.conftest import extract  # noqa: E402

TARGET = get_target("x86_64-avx2")


def _session(path: Path) -> ort.InferenceSession:
    o = ort.SessionOptions()
    o.intra_op_num_threads = 1
    o.inter_op_num_threads = 1
    o.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), sess_options=o, providers=["CPUExecutionProvider"])


def _interleaved(fns, inputs, n: int, block: int = 500) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    """Per-call µs of each function, measured in interleaved blocks of ``block`` calls."""
    timings: list[list[int]] = [[] for _ in fns]
    for _ in range(200):  # warm-up all
        for fn in fns:
            fn(inputs[0])
    done = 0
    while done < n:
        for tl, fn in zip(timings, fns, strict=True):
            for i in range(done, done + block):
                x = inputs[i % len(inputs)]
                t0 = time.perf_counter_ns()
                fn(x)
                tl.append(time.perf_counter_ns() - t0)
        done += block
    return [np.asarray(t) / 1000.0 for t in timings]


def _stats(b: np.ndarray, bound: np.ndarray, a: np.ndarray) -> tuple[float, ...]:
    pb50, pb99 = np.percentile(b, [50, 99])
    pa50, pa99 = np.percentile(a, [50, 99])
    return (pb50, pb99, float(b.mean()), float(np.percentile(bound, 50)), pa50, pa99, float(a.mean()), pa50 - pb50,
            pa50 / pb50)


def _row(label: str, runs: list[tuple[float, ...]]) -> str:
    med = [statistics.median(r[i] for r in runs) for i in range(9)]
    deltas = [r[7] for r in runs]
    spread = f" ({min(deltas):+.1f} to {max(deltas):+.1f})" if len(runs) > 1 else ""
    return (f"| {label} | {med[0]:.1f} | {med[1]:.1f} | {med[2]:.1f} | {med[3]:.1f} | {med[4]:.1f} | {med[5]:.1f} | "
            f"{med[6]:.1f} | {med[7]:+.1f}{spread} | {med[8]:.3f} |")


def _bench_model(name: str, slot: Path, hold: Path, tmp: Path, n: int, runs: int, with_log: bool) -> str:
    lm = load_model(slot, TARGET, threads=1)
    cfg = DeviceConfig(device_id="bench", target=TARGET.name, window_count=10**9, window_seconds=10**9)
    plog = PredictionLog(tmp / f"{name}-log", 10**7) if with_log else None
    agent = Agent(cfg, TARGET, lm, prediction_log=plog, background=False)
    sess = _session(slot / "model.onnx")
    iname = sess.get_inputs()[0].name
    spec = lm.manifest.input.image
    # "bound": the same model call the agent makes (its IOBinding, input copied in), with none of its own work
    bound_in = np.zeros((1, *lm.manifest.input.shape[1:]), np.float32)
    bound_run = lm.runtime.bind([bound_in], [np.zeros((1, len(lm.classes)), np.float32)])[0]
    if spec is None:
        import csv

        with open(hold) as fh:
            r = list(csv.reader(fh))
        xs: list = [np.asarray([float(v) for v in row[:-1]], dtype=np.float32)[None, :] for row in r[1:]]

        def bare(x: np.ndarray) -> object:
            return sess.run(["probabilities"], {iname: x})

        def bound(x: np.ndarray) -> None:
            bound_in[...] = x
            bound_run()
    else:
        xs = [pth.read_bytes() for pth in sorted(hold.glob("*/*.png"))]

        def bare(x: bytes) -> object:  # type: ignore[misc]
            row = imaging.to_input(imaging.decode(x, spec), spec)[None, :]
            return sess.run(["probabilities"], {iname: row})

        def bound(x: bytes) -> None:  # type: ignore[misc]
            bound_in[0] = imaging.to_input(imaging.decode(x, spec), spec)
            bound_run()

    results = [_stats(*_interleaved([bare, bound, agent.predict], xs, n)) for _ in range(runs)]
    calls = agent.counters.predictions
    agent.close()
    s = agent.sink.summaries[-1]  # type: ignore[attr-defined]
    logged = plog.count() if plog is not None else calls
    if not (s.count == calls and sum(s.latency_counts) == calls and logged == calls):
        raise SystemExit(f"{name}: the agent lost predictions: {calls} made, summary {s.count}, log {logged}")
    binding = getattr(lm.runtime, "binding", "-")
    print(f"{name}: {calls} agent predictions, all in the summary and the log; runtime binding: {binding}",
          file=sys.stderr)
    return _row(name, results)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--out", default="/tmp/edgefleet-bench-agent")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    ex = write_examples(out / "examples")
    init_keys(out / "keys")
    rows = ["| model | bare p50 µs | bare p99 µs | bare mean µs | bound p50 µs | agent p50 µs | agent p99 µs | "
            "agent mean µs | Δ p50 µs (range) | p50 ratio |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    tmp = Path(tempfile.mkdtemp())
    for name, model, cal, hold, pre in (
        ("clinical", ex["clinical_model"], ex["clinical_calibration"], ex["clinical_holdout"], None),
        ("vision", ex["vision_model"], ex["vision_calibration"], ex["vision_holdout"], ex["vision_preprocess"]),
    ):
        pkg = out / f"{name}.efpkg"
        build_package(BuildRequest(model=model, name=name, version="1.0.0", target=TARGET.name, calibration=cal,
                                   holdout=hold, keys=out / "keys", out=pkg, quantize="none", preprocess=pre,
                                   latency_runs=50))
        slot = extract(pkg, tmp / name, out / "keys" / "root.pub")
        rows.append(_bench_model(name, slot, Path(hold), tmp, args.n, args.runs,
                                 with_log=not os.environ.get("NOLOG")))

    # Summarisation throughput: 200,000 x 30 through one window (vectorised binning of a batch).
    lm = load_model(tmp / "clinical", TARGET)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200_000, 30)) * 10 + 20
    probs = rng.dirichlet([1, 1], size=200_000)
    lat = rng.uniform(5e3, 5e4, size=200_000)
    w = Window(lm.profile, lm.calibration, lm.validator.lows, lm.validator.highs)
    t0 = time.perf_counter()
    w.observe_many(x, probs, lat)
    dt = time.perf_counter() - t0
    w2 = Window(lm.profile, lm.calibration, lm.validator.lows, lm.validator.highs)
    t1 = time.perf_counter()
    for i in range(50_000):
        w2.observe(x[i], probs[i], int(lat[i]))
    w2.flush()
    dt2 = time.perf_counter() - t1
    print("\n".join(rows))
    print()
    print("| summarisation | rows/s |")
    print("|---|---|")
    print(f"| one batch of 200,000 x 30 (observe_many) | {200_000 / dt:,.0f} |")
    print(f"| row by row, 50,000 x 30 (observe, binned every {BATCH} rows) | {50_000 / dt2:,.0f} |")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
