"""Health aggregation from real summaries: fleet, cohort and device scopes; the four signals; API and CLI.

Summaries come from the agent's own window code on the clinical data and are stored as ingest stores them
(``summaries.body`` = the summary document); the ingest path itself is tested elsewhere.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from device_agent.model import LoadedModel, load_model
from device_agent.window import Window
from edgefleet_contracts.signing import generate_key, public_b64
from edgefleet_contracts.summary import LATENCY_EDGES_MS, Summary
from edgefleet_contracts.targets import get_target
from edgefleet_contracts.timeutil import fmt
from fleet_server import health
from fleet_server.app import create_app
from fleet_server.auth import create_token
from fleet_server.cli import main as fleet_cli
from fleet_server.devices import enroll
from fleet_server.errors import NotFoundError, RequestError
from fleet_server.health.aggregate import UNTAGGED
from fleet_server.registry import publish
from fleet_server.routes_drift import DriftService, attach_drift
from fleet_server.settings import ServerSettings
from fleet_server.store import Store
from tests.conftest import extract

TARGET = get_target("x86_64-avx2")
SHIFTED = 3  # the feature the "south" cohort shifts


@dataclass
class DriftFleet:
    """A server store with ``clinical 1.0.0`` published, and a way to add real device windows to it."""

    settings: ServerSettings
    store: Store
    model: LoadedModel
    x: np.ndarray  # holdout rows
    y: np.ndarray  # holdout labels
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    seqs: Any = field(default_factory=lambda: itertools.count(1))

    def enroll(self, device_id: str, **tags: str) -> None:
        enroll(self.store, self.settings.fleet, device_id, public_b64(generate_key().public_key()), tags)

    def sample(self, n: int) -> tuple[np.ndarray, np.ndarray]:
        i = self.rng.integers(0, len(self.x), n)
        return self.x[i].copy(), self.y[i].copy()

    def window(self, device_id: str, rows: np.ndarray, *, labels: np.ndarray | None = None,
               latency_ms: np.ndarray | float = 0.2, ago: timedelta = timedelta(hours=1),
               rejects: list[tuple[str, str | None]] | None = None) -> Summary:
        """One real window summary of ``rows`` (with fed-back ``labels`` and rejected inputs), stored."""
        m = self.model
        w = Window(m.profile, m.calibration, m.validator.lows, m.validator.highs)
        probs = m.runtime.run(rows)
        w.observe_many(rows, probs, np.broadcast_to(np.asarray(latency_ms, dtype=np.float64) * 1e6, len(rows)))
        if labels is not None:
            for t, p in zip(labels, probs.argmax(axis=1), strict=True):
                w.label(int(t), int(p))
        for kind, feature in rejects or []:
            w.reject(kind, feature)
        start = datetime.now(UTC).replace(microsecond=0) - ago
        s = w.to_summary(device_id, m.name, m.version, next(self.seqs), fmt(start), fmt(start + timedelta(minutes=1)))
        self.insert(s)
        return s

    def insert(self, s: Summary) -> None:
        with self.store.write() as c:
            c.execute("INSERT INTO summaries VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (s.device_id, s.seq, s.model, s.version, s.start, s.end, s.count,
                       json.dumps(s.to_dict(), sort_keys=True), time.time()))

    def shifted(self, rows: np.ndarray, feature: int = SHIFTED, sds: float = 1.5) -> np.ndarray:
        rows = rows.copy()
        rows[:, feature] += sds * self.model.profile.features[feature].std
        return rows

    def cohorts(self, per_cohort: int = 3, windows: int = 2, rows: int = 150) -> None:
        """``north`` devices see reference-like data; ``south`` devices see feature 3 shifted by 1.5 SD."""
        for site in ("north", "south"):
            for i in range(per_cohort):
                dev = f"{site}-{i}"
                self.enroll(dev, site=site)
                for _ in range(windows):
                    x, _ = self.sample(rows)
                    self.window(dev, self.shifted(x) if site == "south" else x)


@pytest.fixture(scope="module")
def clinical(built, tmp_path_factory) -> LoadedModel:
    return load_model(extract(built.package, tmp_path_factory.mktemp("health") / "slot", built.keys / "root.pub"),
                      TARGET)


@pytest.fixture
def drift_fleet(built, clinical, tmp_path) -> Iterator[DriftFleet]:
    settings = ServerSettings(data_dir=tmp_path / "server", broker="none")
    store = Store(settings.db_path)
    publish(store, settings.packages_dir, built.keys / "root.pub", built.package, owner="clinical-ml",
            oncall="http://127.0.0.1:9/unused")
    with np.load(built.holdout) as z:
        x, y = z["x"].astype(np.float32), z["y"]
    yield DriftFleet(settings, store, clinical, x, y)
    store.close()


def _names(model: LoadedModel) -> list[str]:
    return [f.name for f in model.profile.features]


def test_fleet_cohort_and_device_health_from_real_summaries(drift_fleet):
    f = drift_fleet
    f.cohorts()
    r = health.report(f.store, "clinical", by="site", since="2h")
    shifted = _names(f.model)[SHIFTED]
    assert (r["version"], r["reference_rows"]) == ("1.0.0", 114)
    fleet = r["fleet"]
    assert (fleet["devices"], fleet["summaries"], fleet["count"]) == (6, 12, 1800)
    assert all(x["n"] == 1800 for x in fleet["input_drift"]["features"])  # counts add across devices
    south, north = r["cohorts"]["south"], r["cohorts"]["north"]
    assert south["input_drift"]["drifted_features"] == [shifted]
    assert south["input_drift"]["features"][0]["feature"] == shifted  # worst first
    assert south["input_drift"]["features"][0]["p_adjusted"] < 1e-6
    assert north["input_drift"]["drifted_features"] == [] and north["count"] == 900
    assert [d["device_id"][:5] for d in r["devices"][:3]] == ["south"] * 3  # worst devices first
    assert all(d["input_drift"]["drifted_features"] == [shifted] for d in r["devices"][:3])
    assert r["devices"][0]["tags"] == {"site": "south"}
    for scope in (fleet, south, north):
        assert not scope["output_drift"]["insufficient"] and not scope["data_quality"]["flagged"]


def test_accuracy_is_measured_with_labels_and_estimated_without(drift_fleet):
    f = drift_fleet
    f.enroll("labelled")
    f.enroll("unlabelled")
    sums = []
    for dev, with_labels in (("labelled", True), ("unlabelled", False)):
        for _ in range(3):
            x, y = f.sample(200)
            sums.append(f.window(dev, x, labels=y if with_labels else None))
    r = health.report(f.store, "clinical", since="2h")
    acc = r["fleet"]["accuracy"]
    confusion = np.sum([s.confusion for s in sums if s.confusion is not None], axis=0)
    assert acc["measured"] == {"accuracy": pytest.approx(np.trace(confusion) / confusion.sum(), abs=1e-6),
                               "labels": 600}
    expected = sum(sum(s.calibrated_sum) for s in sums) / sum(s.count for s in sums)
    assert acc["estimated"] == pytest.approx(expected, abs=1e-6)
    assert abs(acc["estimated"] - acc["measured"]["accuracy"]) < 0.05 and acc["trustworthy"]
    assert acc["reference"] == pytest.approx(f.model.manifest.evaluation["accuracy"])
    unlabelled = next(d for d in r["devices"] if d["device_id"] == "unlabelled")["accuracy"]
    assert unlabelled["measured"] is None and unlabelled["estimated"] is not None


def test_estimates_are_untrustworthy_when_inputs_fall_in_bins_the_reference_never_saw(drift_fleet):
    f = drift_fleet
    f.enroll("normal")
    f.enroll("odd")
    f.window("normal", f.sample(400)[0])
    f.window("odd", f.sample(400)[0] * 1.8)  # most features beyond the reference maximum
    devs = {d["device_id"]: d for d in health.report(f.store, "clinical", since="2h", devices="full")["devices"]}
    normal, odd = devs["normal"]["accuracy"], devs["odd"]["accuracy"]
    assert normal["trustworthy"] and normal["empty_bin_share"] < 0.05
    assert not odd["trustworthy"] and odd["empty_bin_share"] > 0.3
    assert devs["odd"]["input_drift"]["drifted"]


def test_latency_percentiles_are_recovered_from_the_histogram(drift_fleet):
    values = np.random.default_rng(1).lognormal(np.log(2.0), 1.0, 5000)  # ms
    counts = np.bincount(np.searchsorted(np.asarray(LATENCY_EDGES_MS), values, side="right"),
                         minlength=len(LATENCY_EDGES_MS) + 1)
    got = health.latency_percentiles(counts)
    bin_ratio = 10 ** (1 / 8)
    for q in (50, 95, 99):
        assert 1 / bin_ratio < got[f"p{q}"] / np.percentile(values, q) < bin_ratio
    assert health.latency_percentiles(np.zeros(len(LATENCY_EDGES_MS) + 1))["p95"] is None
    f = drift_fleet
    f.enroll("d")
    lat = np.where(np.arange(1000) % 20 == 0, 300.0, 1.0)  # 5% slow requests
    f.window("d", f.sample(1000)[0], latency_ms=lat)
    ops = health.report(f.store, "clinical", since="2h")["fleet"]["operations"]["latency_ms"]
    assert ops["p50"] == pytest.approx(1.0, rel=0.34) and ops["p99"] == pytest.approx(300.0, rel=0.34)


def test_data_quality_rates_are_their_own_signal(drift_fleet):
    f = drift_fleet
    f.enroll("d")
    names = _names(f.model)
    rejects = [("nan", names[2])] * 30 + [("missing_field", names[5])] * 10
    f.window("d", f.sample(300)[0], rejects=rejects)
    fleet = health.report(f.store, "clinical", since="2h")["fleet"]
    dq = fleet["data_quality"]
    assert fleet["requests"] == 340 and dq["flagged"]
    issues = {(i["feature"], i["signal"]): i["rate"] for i in dq["issues"]}
    assert issues == {(names[2], "nan_rate"): pytest.approx(30 / 340, abs=1e-5),
                      (names[5], "missing_rate"): pytest.approx(10 / 340, abs=1e-5),
                      (None, "schema_error_rate"): pytest.approx(10 / 340, abs=1e-5)}
    assert fleet["operations"]["error_rate"] == pytest.approx(40 / 340, abs=1e-5)
    assert dq["features"][0]["feature"] == names[2]


def test_time_range_versions_and_bad_parameters(drift_fleet):
    f = drift_fleet
    f.enroll("d")
    f.window("d", f.sample(200)[0], ago=timedelta(days=3))
    f.window("d", f.sample(100)[0])
    assert health.report(f.store, "clinical")["fleet"]["count"] == 100  # default: the last 24 h
    assert health.report(f.store, "clinical", since="7d")["fleet"]["count"] == 300
    two_days_ago = fmt(datetime.now(UTC) - timedelta(days=2))
    assert health.report(f.store, "clinical", since="7d", until=two_days_ago)["fleet"]["count"] == 200
    with pytest.raises(NotFoundError, match="known: clinical"):
        health.report(f.store, "nope")
    with pytest.raises(NotFoundError, match="version 9.9.9 is not published"):
        health.report(f.store, "clinical", "9.9.9")
    with pytest.raises(RequestError, match="since='yesterday' must be"):
        health.report(f.store, "clinical", since="yesterday")
    empty = health.report(f.store, "clinical", since="1m")["fleet"]
    assert empty["count"] == 0 and empty["window"] is None and not empty["input_drift"]["drifted"]


def test_drift_api_needs_a_viewer_and_the_cli_reads_the_data_folder(drift_fleet, capsys):
    f = drift_fleet
    f.cohorts(windows=1)
    app = create_app(f.settings, f.store)
    svc = attach_drift(app, app.state.ctx)
    assert isinstance(svc, DriftService) and app.state.ctx.extensions["drift"] is svc
    client = TestClient(app)  # no lifespan: the service is not started, the routes work on the store
    viewer = {"Authorization": f"Bearer {create_token(f.store, 'viewer')}"}
    assert client.get("/api/v1/drift", params={"model": "clinical"}).status_code == 401
    r = client.get("/api/v1/drift", params={"model": "clinical", "by": "site", "since": "2h"}, headers=viewer)
    assert r.status_code == 200
    body = r.json()
    assert body["cohorts"]["south"]["input_drift"]["drifted_features"] == [_names(f.model)[SHIFTED]]
    assert body["fleet"]["count"] == 900
    # Every tag key at once (the dashboard's one request): the same cohorts as asked one key at a time.
    both = client.get("/api/v1/drift", params=[("model", "clinical"), ("by", "site"), ("by", "hw"),
                                              ("since", "2h"), ("devices", "none")], headers=viewer).json()
    assert both["by"] == ["site", "hw"] and "cohorts" not in both
    assert both["cohorts_by"]["site"] == body["cohorts"]
    hw = client.get("/api/v1/drift", params={"model": "clinical", "by": "hw", "since": "2h", "devices": "none"},
                    headers=viewer).json()
    assert both["cohorts_by"]["hw"] == hw["cohorts"] and list(hw["cohorts"]) == [UNTAGGED]  # no device has hw
    r = client.get("/api/v1/drift", params={"model": "nope"}, headers=viewer)
    assert r.status_code == 404 and "known: clinical" in r.json()["detail"]
    r = client.get("/api/v1/drift", params={"model": "clinical", "devices": "all"}, headers=viewer)
    assert r.status_code == 422
    capsys.readouterr()
    code = fleet_cli(["drift", "clinical", "--by", "site", "--since", "2h", "--data", str(f.settings.data_dir)])
    out = capsys.readouterr().out
    assert code == 3 and "site=south" in out and f"DRIFT on {_names(f.model)[SHIFTED]}" in out
    assert fleet_cli(["drift", "clinical", "--since", "2h", "--json", "--devices", "none",
                      "--data", str(f.settings.data_dir)]) in (0, 3)
    assert json.loads(capsys.readouterr().out)["fleet"]["count"] == 900
    assert fleet_cli(["drift", "clinical", "--data", str(Path(f.settings.data_dir) / "missing")]) == 1
    assert "holds no fleet database" in capsys.readouterr().err


def test_noised_windows_never_draw_a_negative_bar(drift_fleet):
    """A noised release may carry negative counts (unbiased only in sum); the dashboard's histogram clips them."""
    from device_agent.summarizer import add_laplace_noise
    from fleet_server.dashboard.data import histogram

    f = drift_fleet
    f.enroll("d")
    rows, _ = f.sample(30)
    s = f.window("d", rows)  # stored plain; now a noised release of another window, with a negative count
    noised = add_laplace_noise(dataclasses.replace(s, seq=s.seq + 1000), 1.0, np.random.default_rng(0))
    name = noised.features[0].name
    noised.features[0].counts[0] = -40
    f.insert(noised)
    h = histogram(f.store, "clinical", f.model.version, name, since="1d")
    assert min(h["current"]) >= 0 and h["current"][0] == 0
