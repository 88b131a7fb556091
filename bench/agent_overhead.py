"""Agent overhead on the hot path: bare onnxruntime vs Agent.predict, same model, inputs, process and thread.

    .venv/bin/python bench/agent_overhead.py [--n 20000] [--out /tmp/edgefleet-bench-agent]

Single sample, one intra-op thread, validation + window summaries + prediction log on. Bare and agent calls
are measured in interleaved blocks so machine noise hits both alike. The vision baseline includes the same
OpenCV decode/resize/normalise the app would otherwise do itself; the agent adds validation and image
statistics. Also: summarisation throughput for a 200,000 x 30 batch (vectorised binning).
"""

from __future__ import annotations

import argparse
import os
import shutil
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
from device_agent.window import Window  # noqa: E402
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


def _interleaved(bare, agent, inputs, n: int, block: int = 500) -> tuple[np.ndarray, np.ndarray]:  # type: ignore[no-untyped-def]
    tb, ta = [], []
    for _ in range(200):  # warm-up both
        bare(inputs[0]); agent(inputs[0])  # noqa: E702
    done = 0
    while done < n:
        for timings, fn in ((tb, bare), (ta, agent)):
            for i in range(done, done + block):
                x = inputs[i % len(inputs)]
                t0 = time.perf_counter_ns()
                fn(x)
                timings.append(time.perf_counter_ns() - t0)
        done += block
    return np.asarray(tb) / 1000.0, np.asarray(ta) / 1000.0


def _row(label: str, b: np.ndarray, a: np.ndarray) -> str:
    pb50, pb99 = np.percentile(b, [50, 99])
    pa50, pa99 = np.percentile(a, [50, 99])
    return (f"| {label} | {pb50:.1f} | {pb99:.1f} | {pa50:.1f} | {pa99:.1f} | {pa50 - pb50:+.1f} | "
            f"{pa50 / pb50:.3f} |")


def _bench_model(name: str, slot: Path, hold: Path, tmp: Path, n: int, with_log: bool) -> str:
    lm = load_model(slot, TARGET, threads=1)
    cfg = DeviceConfig(device_id="bench", target=TARGET.name, window_count=10**9, window_seconds=10**9)
    plog = PredictionLog(tmp / f"{name}-log", 10**6) if with_log else None
    agent = Agent(cfg, TARGET, lm, prediction_log=plog, background=False)
    sess = _session(slot / "model.onnx")
    iname = sess.get_inputs()[0].name
    spec = lm.manifest.input.image
    if spec is None:
        import csv

        with open(hold) as fh:
            r = list(csv.reader(fh))
        xs: list = [np.asarray([float(v) for v in row[:-1]], dtype=np.float32)[None, :] for row in r[1:]]

        def bare(x: np.ndarray) -> object:
            return sess.run(["probabilities"], {iname: x})
    else:
        xs = [pth.read_bytes() for pth in sorted(hold.glob("*/*.png"))]

        def bare(x: bytes) -> object:  # type: ignore[misc]
            row = imaging.to_input(imaging.decode(x, spec), spec)[None, :]
            return sess.run(["probabilities"], {iname: row})

    b, a = _interleaved(bare, agent.predict, xs, n)
    agent.close()
    return _row(name, b, a)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=20000)
    p.add_argument("--out", default="/tmp/edgefleet-bench-agent")
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    ex = write_examples(out / "examples")
    init_keys(out / "keys")
    rows = ["| model | bare p50 µs | bare p99 µs | agent p50 µs | agent p99 µs | Δ p50 µs | p50 ratio |",
            "|---|---|---|---|---|---|---|"]
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
        rows.append(_bench_model(name, slot, Path(hold), tmp, args.n, with_log=not os.environ.get("NOLOG")))

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
    print(f"| row by row, 50,000 x 30 (observe, binned every 64 rows) | {50_000 / dt2:,.0f} |")
    shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
