"""Issue 4 end to end: real agents stream through a real Mosquitto into the real server; one cohort's inputs
shift; the drift API flags exactly that cohort's shifted features and the owner's webhook gets one alert."""

from __future__ import annotations

import time

import numpy as np

from fleet_server.simulator import Fleet, Receiver, SimConfig, rows_sampler


def test_shifted_cohort_is_flagged_on_its_features_and_paged_once(built, tmp_path, make_server):
    receiver = Receiver()
    server = make_server([built.package], receiver.url)
    fleet = Fleet(SimConfig(root=tmp_path / "devices", server_url=server.url, broker_url=server.broker.url,
                            operator_token=server.token, root_pub=built.keys / "root.pub",
                            fleet_pub=server.data / "keys" / "fleet.pub", devices=6, first_package=built.package,
                            window_count=40, min_window_samples=10))
    # A short pending period: the page waits 3 s and carries the latest evaluation's evidence, so which
    # cohort it names does not depend on which devices' first windows reached the first evaluation.
    with server.api() as api:
        assert api.put("/api/v1/models/clinical/alert-rules", json={"settle_s": 3}).status_code == 200
    try:
        fleet.provision()
        fleet.start()
        with np.load(built.calibration) as z:  # the reference profile's own population, resampled with jitter
            x = z["x"]
        with np.load(built.holdout) as z:
            x = np.concatenate([x, z["x"]])
        std = x.std(axis=0)
        sample = rows_sampler(x, seed=1)
        rng = np.random.default_rng(1)

        def rows_for(d, n):  # type: ignore[no-untyped-def]
            rows = np.maximum(sample(d, n) + rng.normal(0, 0.02, (n, x.shape[1])) * std, 0).astype(np.float32)
            if d.tags["site"] == "north":
                rows[:, [0, 2]] += 2.0 * std[[0, 2]]
            return rows

        for _ in range(8):
            fleet.stream(rows_for, 100)
        fleet.flush_windows()
        api = server.api()

        def drift() -> dict:  # type: ignore[type-arg]
            return dict(api.get("/api/v1/drift", params={"model": "clinical", "version": "1.0.0", "by": "site"}).json())

        assert fleet.wait_until(lambda: drift()["fleet"]["devices"] == 6 if "fleet" in drift() else False, 60), drift()
        assert fleet.wait_until(lambda: len(receiver.received) >= 1, 60), api.get("/api/v1/alerts").json()
        time.sleep(4)  # several more drift evaluations: still exactly one page
        report = drift()
        cohorts = report["cohorts"]
        assert sorted(cohorts["north"]["input_drift"]["drifted_features"]) == ["f0", "f2"]
        assert cohorts["south"]["input_drift"]["drifted_features"] == []
        assert cohorts["east"]["input_drift"]["drifted_features"] == []
        pages = [p for p in receiver.received if p.get("kind") == "input_drift"]
        assert len(pages) == 1, [(p["evidence"]["scope"], p["summary"]) for p in pages]
        assert pages[0]["evidence"]["scope"] == "site=north", pages[0]["evidence"]["scopes"]
        assert pages[0]["owner"] == "clinical-ml"
        assert pages[0]["event"] == "opened"
    finally:
        fleet.stop()
        receiver.close()
