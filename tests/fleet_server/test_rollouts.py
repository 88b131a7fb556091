"""Staged rollouts over a fleet at the data level: stage selection, gates, automatic rollback, approvals,
pause/resume/abort and resuming after a restart. (The end-to-end run with real agents is test_rollout_e2e.)"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest

from edgefleet_contracts.desired import accept_desired
from edgefleet_contracts.signing import generate_key, load_public_key, public_b64
from edgefleet_contracts.summary import LATENCY_EDGES_MS
from edgefleet_contracts.timeutil import utcnow
from fleet_server import devices as devmod
from fleet_server.cli import main as fleet_cli
from fleet_server.errors import ConflictError
from fleet_server.registry import publish
from fleet_server.rollouts import service
from fleet_server.rollouts.plan import position, stage_devices
from fleet_server.settings import ServerSettings
from fleet_server.store import Store
from tests.support import wait_until


@pytest.fixture(scope="module")
def v110(built, tmp_path_factory):
    from model_packager.build import BuildRequest, build_package

    out = tmp_path_factory.mktemp("v110") / "clinical-1.1.0.efpkg"
    build_package(BuildRequest(model=built.model, name="clinical", version="1.1.0", target="x86_64-avx2",
                               calibration=built.calibration, keys=built.keys, out=out, quantize="none",
                               latency_runs=20))
    return out


@pytest.fixture()
def fleet(built, v110, tmp_path):
    data = tmp_path / "server"
    assert fleet_cli(["init", "--data", str(data), "--root-key", str(built.keys / "root.pub")]) == 0
    settings = ServerSettings(data_dir=data, broker="none")
    store = Store(settings.db_path)
    for pkg in (built.package, v110):
        publish(store, settings.packages_dir, settings.root_pub, pkg, owner="ml", oncall="http://127.0.0.1:9/x")
    for i in range(20):
        site = "a" if i < 12 else "b"
        devmod.enroll(store, "default", f"dev-{i:02d}", public_b64(generate_key().public_key()), {"site": site})
        _report(store, f"dev-{i:02d}", "1.0.0")
    svc = service.RolloutService(settings, store)
    return settings, store, svc


def _report(store: Store, dev: str, version: str, status: str = "installed") -> None:
    rep = {"active": {"name": "clinical", "version": version}, "standby": None, "update_state": "idle",
           "last_result": {"status": status, "version": version}}
    with store.write() as c:
        c.execute("UPDATE devices SET reported = ?, last_seen = ? WHERE device_id = ?",
                  (json.dumps(rep), time.time(), dev))


_seq: dict[str, int] = {}


def _summary(store: Store, dev: str, version: str, *, count: int = 40, latency_ms: float = 0.05,
             errors: int = 0, acc: float = 0.95) -> None:
    lat = [0] * (len(LATENCY_EDGES_MS) + 1)
    lat[int(np.searchsorted(LATENCY_EDGES_MS, latency_ms, side="right"))] = count
    body = {"window": {"count": count}, "ops": {"latency_counts": lat, "errors": {"inference": errors}},
            "output": {"calibrated_sum": [acc * count / 2, acc * count / 2]}}
    _seq[dev] = _seq.get(dev, 0) + 1
    with store.write() as c:
        c.execute("INSERT INTO summaries VALUES (?, ?, 'clinical', ?, '', '', ?, ?, ?)",
                  (dev, _seq[dev], version, count, json.dumps(body), time.time()))


def _desired(store: Store) -> dict[str, str]:
    return {r["device_id"]: r["version"] for r in store.query("SELECT device_id, version FROM desired")}


def _devices_follow(store: Store, latency_ms: float = 0.05, errors: int = 0) -> None:
    """Simulated devices: those asked to move report the new version and send summaries; others stay."""
    want = _desired(store)
    for r in store.query("SELECT device_id FROM devices"):
        dev = r["device_id"]
        v = want.get(dev, "1.0.0")
        _report(store, dev, v)
        if v == "1.1.0":
            _summary(store, dev, v, latency_ms=latency_ms, errors=errors)
        else:
            _summary(store, dev, v)


def test_stage_selection_is_stable_grows_and_places_newcomers_by_the_same_rule():
    devs = [(f"d{i}", {"site": "a"}) for i in range(200)]
    s1 = stage_devices("m", devs, {"site": "a"}, 10)
    s2 = stage_devices("m", devs, {"site": "a"}, 50)
    assert set(s1) <= set(s2) and 5 <= len(s1) <= 40 and 70 <= len(s2) <= 130
    assert stage_devices("m", list(reversed(devs)), {"site": "a"}, 10) == s1
    newcomer = ("late", {"site": "a"})
    assert ("late" in stage_devices("m", [*devs, newcomer], {"site": "a"}, 10)) == (position("m", "late") < 10)
    assert stage_devices("m", devs[:3], {"site": "a"}, 1)  # never an empty first stage
    assert stage_devices("m", devs, {"site": "zz"}, 100) == []


def test_good_version_rolls_out_through_every_stage_to_the_cohort_only(fleet):
    settings, store, svc = fleet
    rid = service.start(store, model="clinical", version="1.1.0", cohort={"site": "a"}, stages=[10, 50, 100],
                        bake_seconds=0, thresholds={"min_predictions": 10})
    assert service.get(store, rid).previous == "1.0.0"
    for _ in range(12):
        svc.tick()
        _devices_follow(store)
    st = service.status(store, rid)
    assert st["state"] == "completed", st["decisions"]
    want = _desired(store)
    assert {d for d, v in want.items() if v == "1.1.0"} == {f"dev-{i:02d}" for i in range(12)}
    assert not any(d >= "dev-12" for d in want)  # site b never saw it
    kinds = [d["kind"] for d in st["decisions"]]
    assert kinds.count("advance") == 2 and kinds[-1] == "complete"
    gates = st["decisions"][-1]["evidence"]["gates"]
    assert {g["name"] for g in gates} >= {"error_rate", "p95_latency_ratio", "install_failure_rate"}
    # The desired states are signed by the fleet key, addressed per device, with growing sequence numbers.
    row = store.one("SELECT envelope FROM desired WHERE device_id = 'dev-00'")
    d = accept_desired(json.loads(row["envelope"]), load_public_key(settings.fleet_pub), device_id="dev-00",
                       last_seq=0, now=utcnow())
    assert d.version == "1.1.0" and d.url.endswith("/packages/clinical/1.1.0")


def test_slow_version_trips_the_first_stage_gate_and_is_rolled_back_on_exactly_those_devices(fleet):
    settings, store, svc = fleet
    rid = service.start(store, model="clinical", version="1.1.0", cohort={}, stages=[10, 50, 100], bake_seconds=0,
                        thresholds={"min_predictions": 10})
    first = None
    for _ in range(6):
        svc.tick()
        if first is None and _desired(store):
            first = set(_desired(store))
        _devices_follow(store, latency_ms=5.0)  # 100x slower than the control group
    st = service.status(store, rid)
    assert st["state"] == "rolled_back", st["decisions"]
    assert first and set(_desired(store)) == first and len(first) < 20  # only the first stage ever moved
    assert all(v == "1.0.0" for v in _desired(store).values())  # and they were sent back
    rb = next(d for d in st["decisions"] if d["kind"] == "rollback")
    assert "p95_latency_ratio" in rb["detail"]


def test_erroring_version_is_rolled_back(fleet):
    settings, store, svc = fleet
    rid = service.start(store, model="clinical", version="1.1.0", cohort={}, stages=[50, 100], bake_seconds=0,
                        thresholds={"min_predictions": 10})
    for _ in range(6):
        svc.tick()
        _devices_follow(store, errors=20)
    assert service.status(store, rid)["state"] == "rolled_back"


def test_approval_pause_resume_abort_and_restart(fleet):
    settings, store, svc = fleet
    rid = service.start(store, model="clinical", version="1.1.0", cohort={}, stages=[10, 100], bake_seconds=0,
                        thresholds={"min_predictions": 10}, approve_stages=[2])
    with pytest.raises(ConflictError, match="still active"):
        service.start(store, model="clinical", version="1.1.0", cohort={}, stages=[100], bake_seconds=0)
    for _ in range(4):
        svc.tick()
        _devices_follow(store)
    assert service.status(store, rid)["state"] == "awaiting_approval"
    moved = set(_desired(store))
    service.set_state(store, svc.signer, rid, "pause", "alice")
    with pytest.raises(ConflictError):
        service.set_state(store, svc.signer, rid, "approve", "alice")
    service.set_state(store, svc.signer, rid, "resume", "alice")
    svc2 = service.RolloutService(settings, store)  # a server restart: state comes from the store
    svc2.tick()
    assert set(_desired(store)) == moved  # still waiting for the human
    service.set_state(store, svc.signer, rid, "approve", "alice")
    svc2.tick()
    assert len(_desired(store)) == 20
    service.set_state(store, svc.signer, rid, "abort", "bob")
    st = service.status(store, rid)
    assert st["state"] == "aborted" and all(v == "1.0.0" for v in _desired(store).values())
    actors = {(d["kind"], d["actor"]) for d in st["decisions"]}
    assert {("approve", "alice"), ("abort", "bob"), ("pause", "alice")} <= actors


def test_operator_rollback_targets_the_cohort(fleet):
    settings, store, svc = fleet
    rid = service.rollback(store, svc.signer, "clinical", "1.0.0", {"site": "b"}, "carol")
    assert set(_desired(store)) == {f"dev-{i:02d}" for i in range(12, 20)}
    assert service.status(store, rid)["kind"] == "rollback"


def test_rollout_cli(fleet, capsys):
    settings, store, svc = fleet
    d = str(settings.data_dir)
    assert fleet_cli(["rollout", "start", "clinical", "1.1.0", "--data", d, "--cohort", "site=a", "--stages", "50,100",
                      "--bake", "0s", "--gate", "min_predictions=10"]) == 0
    rid = capsys.readouterr().out.strip()
    svc.tick()
    assert fleet_cli(["rollout", "status", rid, "--data", d]) == 0
    out = capsys.readouterr().out
    assert f"rollout {rid}" in out and "stage 1 of 2" in out and "asked to move to 1.1.0" in out
    assert fleet_cli(["rollout", "pause", rid, "--data", d]) == 0
    assert fleet_cli(["rollout", "approve", rid, "--data", d]) == 1  # nothing awaits approval
    assert "nothing awaits approval" in capsys.readouterr().err
    assert fleet_cli(["rollout", "start", "clinical", "1.1.0", "--data", d, "--stages", "50,10"]) == 1
    assert fleet_cli(["rollout", "abort", rid, "--data", d]) == 0
    assert fleet_cli(["rollback", "clinical", "--to", "1.0.0", "--data", d, "--cohort", "site=b"]) == 0
    assert fleet_cli(["rollout", "list", "--data", d]) == 0


def test_desired_states_are_published_retained_as_a_batch_and_kept_pending_while_the_broker_is_down(
        fleet, mosquitto):
    from edgefleet_contracts.topics import subscription
    from fleet_server.rollouts.publisher import MqttPublisher
    from tests.brokers import Subscriber

    settings, store, svc = fleet
    for i in range(20, 320):  # 320 devices in all
        devmod.enroll(store, "default", f"dev-{i:03d}", public_b64(generate_key().public_key()), {"site": "a"})
        _report(store, f"dev-{i:03d}", "1.0.0")
    svc.publisher = MqttPublisher(mosquitto.url, timeout=2.0)
    try:
        service.start(store, model="clinical", version="1.1.0", cohort={}, stages=[100], bake_seconds=0)
        svc.tick()  # every device is asked to move and its desired state published
        rows = store.query("SELECT device_id, envelope, published FROM desired")
        assert len(rows) == 320 and all(r["published"] == 1 for r in rows)
        with Subscriber(mosquitto, [subscription("default", "desired")]) as sub:  # retained: delivered now
            assert sub.wait_for(lambda m: len(m) >= 320, 10), len(sub.messages())
            got = {m.topic.split("/")[-2]: m.payload.decode() for m in sub.messages() if m.retain}
        assert got == {r["device_id"]: r["envelope"] for r in rows}

        mosquitto.stop()  # a new desired state cannot be published: it stays pending
        service.rollback(store, svc.signer, "clinical", "1.0.0", {"site": "b"}, "test")
        assert svc.publish_pending() == 0
        pending = store.query("SELECT device_id FROM desired WHERE published = 0")
        assert {r["device_id"] for r in pending} == {f"dev-{i:02d}" for i in range(12, 20)}
        mosquitto.start()
        assert wait_until(lambda: svc.publish_pending() == 8, 20)
        assert store.query("SELECT device_id FROM desired WHERE published = 0") == []
    finally:
        svc.publisher.close()


def test_publish_many_has_the_batch_in_flight_at_once_not_one_message_per_round_trip(mosquitto):
    import threading

    from fleet_server.rollouts.publisher import MqttPublisher

    pub = MqttPublisher(mosquitto.url, timeout=10.0)
    lock = threading.Lock()
    sent = acked = most = 0
    publish = pub.client.publish

    def counting_publish(*a, **kw):  # how many were unacknowledged when each message went out
        nonlocal sent, most
        with lock:
            most = max(most, sent - acked)
            sent += 1
        return publish(*a, **kw)

    def on_publish(*a):
        nonlocal acked
        with lock:
            acked += 1

    pub.client.publish = counting_publish  # type: ignore[method-assign]
    pub.client.on_publish = on_publish
    try:
        oks = pub.publish_many([(f"edgefleet/publish-many-test/dev-{i:03d}/desired", "{}") for i in range(300)])
        assert oks == [True] * 300
        # One message per round trip would never have one unacknowledged when the next goes out.
        assert most >= 2, most
        assert acked == 300
    finally:
        pub.close()


def test_two_racing_starts_of_one_model_make_one_rollout(fleet):
    import threading

    settings, store, svc = fleet
    for _ in range(30):
        made: list[str] = []
        refused: list[str] = []
        gate = threading.Barrier(2)

        def begin(made: list[str] = made, refused: list[str] = refused, gate: threading.Barrier = gate) -> None:
            gate.wait()
            try:
                made.append(service.start(store, model="clinical", version="1.1.0", cohort={}, stages=[50, 100],
                                          bake_seconds=0))
            except ConflictError as exc:
                refused.append(str(exc))

        threads = [threading.Thread(target=begin) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert len(made) == 1 and len(refused) == 1 and "still active" in refused[0], (made, refused)
        service.set_state(store, svc.signer, made[0], "abort", "test")


def test_an_operator_action_during_a_tick_is_not_overwritten_by_it(fleet, monkeypatch):
    settings, store, svc = fleet
    rid = service.start(store, model="clinical", version="1.1.0", cohort={"site": "a"}, stages=[10, 50, 100],
                        bake_seconds=0, thresholds={"min_predictions": 10})
    real_step = service.step

    def step_while_an_operator_pauses(r, members, snap, now):
        result = real_step(r, members, snap, now)
        service.set_state(store, svc.signer, rid, "pause", "olivia")  # lands between the tick's read and write
        return result

    monkeypatch.setattr(service, "step", step_while_an_operator_pauses)
    svc.tick()
    st = service.status(store, rid)
    assert st["state"] == "paused" and st["decisions"][-1]["kind"] == "pause"
    assert _desired(store) == {}  # the tick's step was dropped with its targets: judged again after resume


def test_an_abort_does_not_send_a_revoked_device_a_desired_state_and_status_counts_it_apart(fleet):
    """Found in review: an abort reverts every device the rollout moved, the revoked one included."""
    settings, store, svc = fleet
    rid = service.start(store, model="clinical", version="1.1.0", cohort={}, stages=[100], bake_seconds=3600,
                        thresholds={"min_predictions": 10})
    svc.tick()
    _devices_follow(store)
    moved = sorted(_desired(store))
    victim = moved[0]
    devmod.revoke(store, victim, "stolen", "test")
    assert service.status(store, rid)["devices"].get("revoked") == 1  # not "pending" for ever
    service.set_state(store, svc.signer, rid, "abort", "bob")
    after = _desired(store)
    envelope = store.one("SELECT envelope FROM desired WHERE device_id = ?", (victim,))
    assert envelope is not None and envelope[0] == "", "the abort sent the revoked device a desired state"
    assert all(after[d] == "1.0.0" for d in set(moved) - {victim})


def test_revoking_a_device_clears_its_retained_desired_state_on_the_broker(fleet, mosquitto):
    from edgefleet_contracts.topics import subscription
    from fleet_server.rollouts.publisher import MqttPublisher
    from tests.brokers import Subscriber

    settings, store, svc = fleet
    svc.publisher = MqttPublisher(mosquitto.url, timeout=5.0)
    try:
        service.start(store, model="clinical", version="1.1.0", cohort={}, stages=[100], bake_seconds=3600)
        svc.tick()
        victim = sorted(_desired(store))[0]
        with Subscriber(mosquitto, [subscription("default", "desired")]) as sub:  # retained: delivered now
            assert sub.wait_for(lambda m: any(x.topic.split("/")[-2] == victim for x in m), 10)
        devmod.revoke(store, victim, "stolen", "test")
        assert svc.publish_pending() == 1
        with Subscriber(mosquitto, [subscription("default", "desired")]) as sub:
            assert sub.wait_for(lambda m: len(m) >= 19, 10), len(sub.messages())
            time.sleep(0.3)
            held = {m.topic.split("/")[-2] for m in sub.messages() if m.retain and m.payload}
        assert victim not in held and len(held) == 19  # the others keep theirs
    finally:
        svc.publisher.close()
