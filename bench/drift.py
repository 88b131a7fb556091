"""Drift evaluation cost, and the power of the default input-drift rule against the reference size.

    .venv/bin/python bench/drift.py [--devices 500] [--windows 20] [--rows 50] [--repeat 3]
    .venv/bin/python bench/drift.py --power [--reps 4]

Timing: a real clinical package (30 features, 20 quantile bins each) is published into a fresh SQLite store;
``devices x windows`` real window summaries (the agent's ``Window`` on resampled clinical rows, 10 sites x 2
hardware tags) are stored as ingest stores them. Measured, best of ``--repeat``: the bare baseline (SELECT the
bodies + ``json.loads`` each — the floor any aggregation pays), the aggregation alone, the fleet + cohort +
per-device health report (``health.report``, what ``GET /api/v1/drift?by=site`` serves), and one alert
evaluation pass (``alerts.evaluate``: fleet + every cohort tag value, plus the alert upserts).

Power (``--power``): a population like the clinical data (every real row + 0.2 SD Gaussian noise, a smoothed
bootstrap) gives independent references and windows of any size. For each reference size n and window size m:
the false-alarm rate of the default rule on unshifted windows (any feature flagged), and its power against a
0.3 SD mean shift of one feature (each of the 30 in turn), flagged on that feature.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from device_agent.model import LoadedModel, load_model  # noqa: E402
from device_agent.window import Window  # noqa: E402
from edgefleet_contracts.targets import get_target  # noqa: E402
from edgefleet_contracts.timeutil import fmt  # noqa: E402
from fleet_server import alerts, health  # noqa: E402
from fleet_server.registry import publish  # noqa: E402
from fleet_server.store import Store  # noqa: E402
from model_packager.build import BuildRequest, build_package  # noqa: E402
from model_packager.keys import init_keys  # noqa: E402
from tests.conftest import _tiny_clinical, extract  # noqa: E402

TARGET = get_target("x86_64-avx2")


def _package(root: Path) -> tuple[Path, Path, LoadedModel, np.ndarray]:
    model, cal, hold = _tiny_clinical(root)
    init_keys(root / "keys")
    pkg = root / "clinical-1.0.0.efpkg"
    build_package(BuildRequest(model=model, name="clinical", version="1.0.0", target=TARGET.name, calibration=cal,
                               holdout=hold, keys=root / "keys", out=pkg, quantize="none", owner="bench"))
    loaded = load_model(extract(pkg, root / "slot", root / "keys" / "root.pub"), TARGET)
    with np.load(hold) as z:
        rows = z["x"].astype(np.float32)
    return pkg, root / "keys" / "root.pub", loaded, rows


def _fill(store: Store, m: LoadedModel, rows: np.ndarray, devices: int, windows: int, per: int) -> int:
    rng = np.random.default_rng(0)
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=2)
    with store.write() as c:
        for d in range(devices):
            tags = {"site": f"site-{d % 10}", "hw": "rpi5" if d % 2 else "jetson"}
            c.execute("INSERT INTO devices (device_id, public_key, fleet, tags, enrolled) VALUES (?, 'x', 'f', ?, ?)",
                      (f"dev-{d:04d}", json.dumps(tags), time.time()))
    batch = []
    seq = 0
    for d in range(devices):
        for w in range(windows):
            x = rows[rng.integers(0, len(rows), per)]
            win = Window(m.profile, m.calibration, m.validator.lows, m.validator.highs)
            win.observe_many(x, m.runtime.run(x), rng.uniform(5e4, 5e5, per))
            seq += 1
            start = t0 + timedelta(minutes=w)
            s = win.to_summary(f"dev-{d:04d}", "clinical", "1.0.0", seq, fmt(start), fmt(start + timedelta(minutes=1)))
            batch.append((s.device_id, s.seq, s.model, s.version, s.start, s.end, s.count,
                          json.dumps(s.to_dict(), sort_keys=True), time.time()))
    with store.write() as c:
        c.executemany("INSERT INTO summaries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)", batch)
    return len(batch)


def _best(fn, repeat: int) -> float:  # type: ignore[no-untyped-def]
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def timing(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        pkg, root_pub, m, rows = _package(root)
        store = Store(root / "server" / "fleet.sqlite")
        publish(store, root / "server" / "packages", root_pub, pkg, owner="bench", oncall="http://127.0.0.1:9/x")
        n = _fill(store, m, rows, args.devices, args.windows, args.rows)
        ref = health.Reference.load(store, "clinical", "1.0.0")
        since, until = health.time_range("24h", None)

        def bare() -> None:
            for (body,) in store.conn().execute("SELECT body FROM summaries WHERE model = ? AND version = ?",
                                                ("clinical", "1.0.0")):
                json.loads(body)

        t_bare = _best(bare, args.repeat)
        t_agg = _best(lambda: health.load_aggregate(store, ref, since, until), args.repeat)
        t_report = _best(lambda: health.report(store, "clinical", by="site"), args.repeat)
        t_fleet = _best(lambda: health.report(store, "clinical", devices="none"), args.repeat)
        t_eval = _best(lambda: alerts.evaluate(store), args.repeat)
        scopes = alerts.evaluate(store).scopes
        store.close()
    cmd = "python bench/drift.py " + " ".join(sys.argv[1:])
    print(f"`{cmd.strip()}` — {n:,} device-windows ({args.devices} devices x {args.windows} windows x "
          f"{args.rows} rows), 30 features x 22 bins, best of {args.repeat}, {os.cpu_count()} CPUs\n")
    print("| step | seconds | x bare | windows/s |")
    print("|---|---:|---:|---:|")
    for name, t in (("bare baseline: SELECT bodies + json.loads", t_bare),
                    ("aggregate (parse, sum per device)", t_agg),
                    ("fleet report (aggregate + fleet statistics)", t_fleet),
                    (f"report by site + {args.devices} devices (GET /api/v1/drift?by=site)", t_report),
                    (f"alert evaluation ({scopes} scopes: fleet + site + hw cohorts)", t_eval)):
        print(f"| {name} | {t:.3f} | {t / t_bare:.2f} | {n / t:,.0f} |")


def power(args: argparse.Namespace) -> None:
    from sklearn.datasets import load_breast_cancer

    from model_packager.profiling import reference_profile

    x = load_breast_cancer(return_X_y=True)[0].astype(np.float64)
    sd = x.std(axis=0)
    rng = np.random.default_rng(args.seed)
    names = [f"f{j}" for j in range(x.shape[1])]
    with tempfile.TemporaryDirectory() as tmp:
        _, _, m, _ = _package(Path(tmp))

    def population(k: int) -> np.ndarray:
        return (x[rng.integers(0, len(x), k)] + rng.normal(size=(k, x.shape[1])) * sd * 0.2).astype(np.float32)

    def judge(profile: object, rows: np.ndarray) -> list[str]:
        layout = health.Layout(profile)  # type: ignore[arg-type]
        w = Window(profile, m.calibration, m.validator.lows, m.validator.highs)  # type: ignore[arg-type]
        w.observe_many(rows, np.full((len(rows), 2), 0.5), np.full(len(rows), 1e5))
        vec = layout.row(w.to_summary("d", "c", "1", 1, "2026-01-01T00:00:00Z", "2026-01-01T00:01:00Z").to_dict())
        ref = health.Reference("c", "1", profile, m.calibration, None, "bench")  # type: ignore[arg-type]
        assert vec is not None
        return list(health.assess(ref, layout, vec, health.HealthPolicy())["input_drift"]["drifted_features"])

    print(f"`python bench/drift.py {' '.join(sys.argv[1:])}` — default rule (KS, Holm, family-wise alpha 0.01, "
          f"KS >= 0.075 or PSI >= 0.25), 30 features, 0.3 SD shift of one feature; {args.reps} references per cell\n")
    print("| reference rows n | window values m | effective n_e | false alarms | power (mean) | power (worst feature) |"
          " wrong feature |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in args.refs:
        for mm in args.windows_m:
            fa = trials = wrong = 0
            hits = np.zeros(30)
            for _ in range(args.reps):
                ref_rows = population(n)
                profile = reference_profile(ref_rows.astype(np.float64), names, np.full((n, 2), 0.5), ["0", "1"])
                for _ in range(10):
                    fa += bool(judge(profile, population(mm)))
                    trials += 1
                for j in range(30):
                    rows = population(mm)
                    rows[:, j] += 0.3 * profile.features[j].std
                    got = judge(profile, rows)
                    hits[j] += names[j] in got
                    wrong += any(g != names[j] for g in got)
            per = hits / args.reps
            print(f"| {n:,} | {mm:,} | {n * mm / (n + mm):,.0f} | {fa}/{trials} | {per.mean():.2f} | {per.min():.2f} |"
                  f" {wrong}/{30 * args.reps} |", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=500)
    p.add_argument("--windows", type=int, default=20)
    p.add_argument("--rows", type=int, default=50, help="predictions per window")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--power", action="store_true", help="the power / false-alarm table instead of timing")
    p.add_argument("--reps", type=int, default=4, help="--power: references per cell")
    p.add_argument("--refs", type=lambda s: [int(v) for v in s.split(",")], default=[114, 360, 1000, 3000])
    p.add_argument("--windows-m", type=lambda s: [int(v) for v in s.split(",")], default=[500, 1000, 2000, 5000, 20000])
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    power(args) if args.power else timing(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
