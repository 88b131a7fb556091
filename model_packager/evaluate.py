"""Measuring a model variant on this machine: size, agreement with float, accuracy, single-sample latency."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.runtime import Runtime

from .errors import DataError, ModelError


@dataclass
class Candidate:
    mode: str
    path: Path
    size_bytes: int
    size_ratio: float = 1.0
    accuracy: float | None = None
    accuracy_delta_points: float | None = None  # packaged minus float, in percentage points
    agreement: float = 1.0
    p50_ms: float = 0.0
    p99_ms: float = 0.0
    latency_ratio: float = 1.0
    op_types: list[str] = field(default_factory=list)
    chosen: bool = False
    rejected: str = ""
    probabilities: np.ndarray | None = None

    def to_report(self) -> dict[str, Any]:
        d = asdict(self)
        d.pop("probabilities")
        d["path"] = self.path.name
        return d


def predict_all(rt: Runtime, x: np.ndarray, batch: int = 1) -> np.ndarray:
    """Class probabilities ``[rows, classes]`` for every row of ``x``, one row a run by default: as a device runs
    the model in real time. A dynamically quantized model computes its activations' scale per run, so scored in
    batches of 256 it gave other answers than on a device: the clinical example's int8 variant showed 0.9649
    accuracy (0.88 points above the float model) in its package and 0.9561 on the device, one row at a time
    (found by an audit). Accuracy, agreement, the accuracy bound, the calibration map and the drift reference all
    come from these probabilities. Raises DataError (no rows) or ModelError (an output of another shape)."""
    if len(x) == 0:
        raise DataError("no data rows to evaluate the model on")
    probs = np.concatenate([rt.run(x[i : i + batch]) for i in range(0, len(x), batch)])
    if probs.ndim != 2 or len(probs) != len(x):
        raise ModelError(f"the model's probabilities output has shape {list(probs.shape)} for {len(x)} rows; "
                         "expected [rows, classes]")
    return probs


def latency_ms(rt: Runtime, x: np.ndarray, runs: int = 300, warmup: int = 30) -> tuple[float, float]:
    """p50 and p99 of single-sample latency in milliseconds, cycling through the rows of ``x``."""
    rows = [x[i : i + 1] for i in range(min(len(x), 64))]
    for i in range(warmup):
        rt.run(rows[i % len(rows)])
    times = np.empty(runs)
    for i in range(runs):
        t0 = time.perf_counter_ns()
        rt.run(rows[i % len(rows)])
        times[i] = time.perf_counter_ns() - t0
    return float(np.percentile(times, 50) / 1e6), float(np.percentile(times, 99) / 1e6)


def measure(
    c: Candidate, rt: Runtime, x: np.ndarray, y: np.ndarray | None, reference: Candidate | None, runs: int = 300
) -> None:
    probs = predict_all(rt, x)
    c.probabilities = probs
    pred = probs.argmax(axis=1)
    if y is not None:
        c.accuracy = float((pred == y).mean())
    c.p50_ms, c.p99_ms = latency_ms(rt, x, runs=runs, warmup=max(30, runs // 10))
    if reference is not None and reference.probabilities is not None:
        c.agreement = float((pred == reference.probabilities.argmax(axis=1)).mean())
        c.size_ratio = c.size_bytes / reference.size_bytes
        c.latency_ratio = c.p50_ms / reference.p50_ms if reference.p50_ms else 1.0
        if c.accuracy is not None and reference.accuracy is not None:
            c.accuracy_delta_points = round(100.0 * (c.accuracy - reference.accuracy), 4)
