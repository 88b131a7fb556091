"""Issue 5 end to end, with 20 real agents (simulator) on a real Mosquitto and the real server process."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest

from fleet_server.simulator import Fleet, Receiver, SimConfig, rows_sampler
from model_packager.build import BuildRequest, build_package
from tests.conftest import slow_onnx


@pytest.fixture(scope="module")
def versions(built, tmp_path_factory):
    """1.1.0: a good new version. 2.0.0: the same outputs, but far more compute per prediction on a device."""
    out = tmp_path_factory.mktemp("versions")
    good = out / "clinical-1.1.0.efpkg"
    build_package(BuildRequest(model=built.model, name="clinical", version="1.1.0", target="x86_64-avx2",
                               calibration=built.calibration, keys=built.keys, out=good, quantize="none",
                               latency_runs=20))
    (out / "slow.onnx").write_bytes(slow_onnx(built.model, layers=300))
    slow = out / "clinical-2.0.0.efpkg"
    build_package(BuildRequest(model=out / "slow.onnx", name="clinical", version="2.0.0", target="x86_64-avx2",
                               calibration=built.calibration, keys=built.keys, out=slow, quantize="none",
                               latency_runs=20, max_accuracy_drop=100))
    return good, slow


class Traffic:
    """Every device keeps predicting (so gates and probation have evidence) until stopped."""

    def __init__(self, fleet: Fleet, x: np.ndarray) -> None:
        self.fleet, self.sample, self.stop = fleet, rows_sampler(x, 3), threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            self.fleet.stream(self.sample, 10)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(60)


def _fleet(built, tmp_path: Path, server, n: int = 20) -> Fleet:
    f = Fleet(SimConfig(root=tmp_path / "devices", server_url=server.url, broker_url=server.broker.url,
                        operator_token=server.token, root_pub=built.keys / "root.pub",
                        fleet_pub=server.data / "keys" / "fleet.pub", devices=n, first_package=built.package,
                        window_count=20, min_window_samples=5, allow_small_windows=True,
                        probation_seconds=3, probation_predictions=20,
                        # 20 agents in one interpreter: latency is noisy, and the versions are the same model (the
                        # server's gate is widened the same way below); the bad version fails on errors anyway.
                        probation_latency_ratio=4.0))
    f.provision()
    return f


def _x(built) -> np.ndarray:
    with np.load(built.holdout) as z:
        return np.asarray(z["x"])


def test_good_version_reaches_the_cohort_only_offline_device_converges_and_server_restart_resumes(
        built, versions, tmp_path, make_server):
    good, _ = versions
    receiver = Receiver()
    server = make_server([built.package, good], receiver.url)
    fleet = _fleet(built, tmp_path, server)
    offline = next(d for d in fleet.devices if d.tags["site"] == "north")
    fleet.devices.remove(offline)  # this device is switched off during the rollout
    fleet.start()
    traffic = Traffic(fleet, _x(built))
    api = server.api()
    try:
        r = api.post("/api/v1/rollouts", json={"model": "clinical", "version": "1.1.0", "cohort": {"site": "north"},
                                               "stages": "30,100", "bake_seconds": 2,
                                               # 20 agents share one interpreter here, so their latencies are
                                               # noisy: the latency gate is set wide for this identical model.
                                               "thresholds": {"min_predictions": 20, "max_p95_latency_ratio": 4.0}})
        rid = r.json()["id"]
        def stage1_done() -> bool:
            st = api.get(f"/api/v1/rollouts/{rid}").json()
            return st["targeted"] > 0 and st["devices"].get("on_new_version", 0) == st["targeted"]

        assert fleet.wait_until(stage1_done, 90)
        server.kill()  # SIGKILL between stages
        server.start()
        api = server.api()
        assert fleet.wait_until(lambda: api.get(f"/api/v1/rollouts/{rid}").json()["state"] == "completed", 120), \
            api.get(f"/api/v1/rollouts/{rid}").json()["decisions"]
        north = {d.device_id for d in fleet.devices if d.tags["site"] == "north"}
        assert fleet.wait_until(lambda: all((v == "1.1.0") == (d in north) for d, v in fleet.versions().items()), 60)
        # The offline device comes back: it converges from the retained desired state.
        fleet.devices.append(offline)
        from device_agent.runner import DeviceRunner

        offline.runner = DeviceRunner(offline.directory, http=False, backoff_initial=0.2, backoff_max=2.0)
        offline.runner.start()
        assert fleet.wait_until(lambda: fleet.versions()[offline.device_id] == "1.1.0", 60)
        kinds = [d["kind"] for d in api.get(f"/api/v1/rollouts/{rid}").json()["decisions"]]
        assert "advance" in kinds and kinds[-1] == "complete"
    finally:
        traffic.close()
        fleet.stop()
        receiver.close()


def test_slow_version_trips_the_first_stage_and_is_rolled_back_on_exactly_those_devices(
        built, versions, tmp_path, make_server):
    _, slow = versions
    receiver = Receiver()
    server = make_server([built.package, slow], receiver.url)
    fleet = _fleet(built, tmp_path, server)
    fleet.start()
    traffic = Traffic(fleet, _x(built))
    api = server.api()
    try:
        rid = api.post("/api/v1/rollouts", json={"model": "clinical", "version": "2.0.0", "stages": "10,50,100",
                                                 "bake_seconds": 3, "thresholds": {"min_predictions": 20}}).json()["id"]
        assert fleet.wait_until(lambda: api.get(f"/api/v1/rollouts/{rid}").json()["state"] == "rolled_back", 150), \
            api.get(f"/api/v1/rollouts/{rid}").json()["decisions"]
        st = api.get(f"/api/v1/rollouts/{rid}").json()
        moved = {d for dec in st["decisions"] if dec["kind"] == "target" for d in dec["evidence"]["devices"]}
        assert 1 <= len(moved) < 20 and st["stage"] == 1  # only the first stage ever saw 2.0.0
        assert fleet.wait_until(lambda: all(v == "1.0.0" for v in fleet.versions().values()), 60)
        rb = next(d for d in st["decisions"] if d["kind"] == "rollback")
        assert "p95_latency_ratio" in rb["detail"] or "install_failure_rate" in rb["detail"]
        devices = api.get("/api/v1/devices").json()
        for dev in devices:
            lr = (dev.get("reported") or {}).get("last_result") or {}
            if dev["device_id"] not in moved:
                assert lr.get("version") != "2.0.0"  # the rest never saw it
    finally:
        traffic.close()
        fleet.stop()
        receiver.close()
