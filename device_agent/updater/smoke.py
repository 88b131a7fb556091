"""The smoke test: does the staged model reproduce its golden outputs on this device? (Runs the model; no state.)

The staged model is loaded with the target's threads, the golden inputs are run and compared with the golden
probabilities (tolerance from the package, same argmax per row: :func:`compare_golden`); image packages first
check that each golden image preprocesses to its golden row (within ``IMAGE_ATOL``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgefleet_contracts.manifest import Manifest
from edgefleet_contracts.targets import Target

from ..errors import AgentError
from .errors import SmokeTestError

IMAGE_ATOL = 1e-5


@dataclass(frozen=True)
class GoldenVerdict:
    ok: bool
    rows: int
    max_abs_diff: float
    tolerance: float
    argmax_mismatches: int

    def describe(self) -> str:
        return (f"max |Δ| {self.max_abs_diff:.3g} vs tolerance {self.tolerance:.3g}, argmax differs on "
                f"{self.argmax_mismatches} of {self.rows} rows")


def compare_golden(expected: np.ndarray, actual: np.ndarray, tolerance: float) -> GoldenVerdict:
    """Golden probabilities reproduced within ``tolerance`` (absolute) and with the same argmax per row?"""
    e, a = np.asarray(expected, dtype=np.float64), np.asarray(actual, dtype=np.float64)
    if e.shape != a.shape or e.ndim != 2:
        return GoldenVerdict(False, int(e.shape[0]) if e.ndim else 0, float("inf"), tolerance, -1)
    diff = float(np.max(np.abs(e - a))) if e.size else 0.0
    if not np.isfinite(a).all():
        diff = float("inf")
    mism = int(np.sum(np.argmax(e, axis=1) != np.argmax(a, axis=1)))
    return GoldenVerdict(diff <= tolerance and mism == 0, int(e.shape[0]), diff, tolerance, mism)


# ---- the smoke test (runs the model; no state) --------------------------------------------------------
def smoke_test(folder: Path, manifest: Manifest, target: Target) -> dict[str, Any]:
    """Run the golden inputs of the unpacked package in ``folder``; return the numbers. Raises SmokeTestError."""
    from ..imaging import preprocess
    from ..runtime import open_runtime

    try:
        with np.load(folder / "golden.npz", allow_pickle=False) as z:
            x = np.asarray(z["x"], dtype=np.float32)
            expected = np.asarray(z["probabilities"], dtype=np.float32)
            tolerance = float(z["tolerance"])
    except Exception as exc:  # noqa: BLE001 - OSError, KeyError, ValueError, zipfile.BadZipFile...: all a bad file
        raise SmokeTestError(f"golden.npz cannot be read: {exc!r}") from None
    details: dict[str, Any] = {"rows": int(x.shape[0]), "tolerance": tolerance}
    spec = manifest.input.image
    if spec is not None:
        worst = 0.0
        for i in range(x.shape[0]):
            path = folder / "golden" / f"{i}.img"
            try:
                row, _ = preprocess(path.read_bytes(), spec)
            except (OSError, AgentError) as exc:
                raise SmokeTestError(f"golden image {i} cannot be preprocessed: {exc}", details) from None
            d = float(np.max(np.abs(row - x[i]))) if row.shape == x[i].shape else float("inf")
            worst = max(worst, d)
            if d > IMAGE_ATOL:
                details.update(image=i, image_max_abs_diff=d, image_atol=IMAGE_ATOL)
                raise SmokeTestError(
                    f"golden image {i} preprocesses to a row that differs from golden x[{i}] by max |Δ| {d:.3g} "
                    f"(allowed {IMAGE_ATOL}): this device decodes or resizes images differently", details)
        details["images_max_abs_diff"] = worst
    try:
        rt = open_runtime(manifest.runtime, folder / manifest.model_file, manifest.output.probabilities,
                          threads=target.threads, graph_optimization=target.graph_optimization)
        got = rt.run(x)
    except AgentError as exc:
        raise SmokeTestError(f"the model does not run here: {exc}", details) from None
    verdict = compare_golden(expected, got, tolerance)
    details.update(max_abs_diff=verdict.max_abs_diff, argmax_mismatches=verdict.argmax_mismatches)
    if not verdict.ok:
        raise SmokeTestError(f"golden outputs not reproduced: {verdict.describe()}", details)
    return details

