"""Desired state on the device: bad messages change nothing; a good one is downloaded (resuming after a drop),
installed, watched on probation and committed; the standby is switched to without a download; SIGKILL during the
download, the activation and the probation of `device-agent run` ends on the desired version, never a broken one.

Real signed packages, a real HTTP server (``PackageServer``), real runtimes, a real agent serving traffic, and
for the kill cases the real `device-agent run` process with a real Mosquitto delivering the retained message.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.config import DeviceDir
from device_agent.desired_handler import (
    DESIRED_FILE,
    DesiredHandler,
    DesiredRecord,
    HandlerOptions,
    MaintenanceWindow,
    Step,
)
from device_agent.download import DownloadOptions
from device_agent.errors import AgentError
from device_agent.probation import ProbationPolicy
from device_agent.provision import ProvisionRequest, provision
from device_agent.runner import build_report
from device_agent.slots import Slots
from device_agent.updater import FAILPOINT_ENV, Updater, UpdateRecord
from edgefleet_contracts.desired import Desired, sign_desired
from edgefleet_contracts.signing import Ed25519PrivateKey, generate_key, save_public_key
from edgefleet_contracts.timeutil import utcnow
from edgefleet_contracts.topics import topic
from tests.brokers import Subscriber

from . import TARGET, only_slots_left, packages, serve
from .test_download import PackageServer

ROOT = Path(__file__).resolve().parents[2]
FLEET = generate_key()


# ---- helpers (also used by test_probation) --------------------------------------------------------------
def provisioned(built: Any, path: Path, *, package: Path | None, broker: str = "", **cfg: Any) -> DeviceDir:
    """A device pinned to this module's fleet key, with ``cfg`` written into config.toml."""
    pub = path.parent / f"{path.name}-fleet.pub"
    save_public_key(FLEET.public_key(), pub)
    dev = provision(ProvisionRequest(directory=path, device_id="dev-1", target=TARGET, root_key=built.keys / "root.pub",
                                     fleet_key=pub, broker=broker, package=package)).device
    if cfg:
        dev.save_config(replace(dev.load_config(), **cfg))
    return dev


def desired(seq: int, version: str, url: str, data: bytes, *, key: Ed25519PrivateKey = FLEET, device_id: str = "dev-1",
            expires_in: timedelta = timedelta(hours=1), issued_ago: timedelta = timedelta(0), **over: Any) -> bytes:
    now = utcnow() - issued_ago
    d = Desired(device_id=device_id, seq=seq, name="clinical", version=version, url=url,
                sha256=over.pop("sha256", hashlib.sha256(data).hexdigest()), length=over.pop("length", len(data)),
                issued=now, expires=now + expires_in, **over)
    return json.dumps(sign_desired(d, key)).encode()


def options(**kw: Any) -> HandlerOptions:
    base: dict[str, Any] = dict(policy=ProbationPolicy(seconds=5, predictions=200, min_samples=30),
                                download=DownloadOptions(read_timeout=3, connect_timeout=2), retry_initial=0.05,
                                retry_max=0.5, poll=0.02, busy_timeout=5)
    base.update(kw)
    return HandlerOptions(**base)


def settle(handler: DesiredHandler, timeout: float = 40) -> Step:
    """Run converge() passes until nothing is left to do (bounded)."""
    deadline = time.monotonic() + timeout
    step = handler.converge()
    while step.retry_in is not None:
        assert time.monotonic() < deadline, f"did not settle within {timeout} s: {step}"
        if step.retry_in:
            time.sleep(min(step.retry_in, 0.2))
        step = handler.converge()
    return step


class Traffic:
    """An app calling ``agent.predict`` on real rows in a loop on its own thread (about 2 kHz)."""

    def __init__(self, agent: Agent, rows: np.ndarray) -> None:
        self.agent, self.rows = agent, rows
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self.served: list[str] = []

    def _loop(self) -> None:
        i = 0
        while not self._stop.is_set():
            with contextlib.suppress(AgentError):  # an app keeps calling; the agent's counters say what happened
                self.served.append(self.agent.predict(self.rows[i % len(self.rows)]).version)
            i += 1
            time.sleep(0.0005)

    def __enter__(self) -> Traffic:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def rows(built: Any) -> np.ndarray:
    with np.load(built.holdout) as z:
        return np.asarray(z["x"], dtype=np.float32)


def versions(dev: DeviceDir) -> tuple[str | None, str | None]:
    s = Slots(dev)
    a, b = s.active(), s.standby()
    return (a[1].version if a else None, b[1].version if b else None)


def last_result(dev: DeviceDir) -> dict[str, Any]:
    return json.loads(dev.update_file.read_text())["last_result"]


@pytest.fixture
def server() -> Iterator[PackageServer]:
    with PackageServer() as srv:
        yield srv


@pytest.fixture
def agent_for() -> Iterator[Callable[[DeviceDir], Agent]]:
    opened: list[Agent] = []

    def make(dev: DeviceDir) -> Agent:
        a = Agent.open(dev.path, background=False)
        opened.append(a)
        return a

    yield make
    for a in opened:
        a.close()


# ---- rejections -------------------------------------------------------------------------------------------
def _untouched(dev: DeviceDir) -> dict[str, Any]:
    rec = DesiredRecord.load(dev.path / DESIRED_FILE)
    return {"active": dev.active_file.read_bytes(), "trust": dev.trust_file.read_bytes(),
            "update": dev.update_file.read_bytes(), "seq": rec.last_seq, "accepted": rec.accepted,
            "slots": sorted((str(p.relative_to(dev.slots)), p.stat().st_size) for p in dev.slots.rglob("*")),
            "downloads": sorted(p.name for p in (dev.path / "downloads").glob("*"))}


def _tampered(url: str, data: bytes) -> bytes:
    env = json.loads(desired(6, "1.1.0", url, data))
    env["signed"]["model"]["version"] = "9.0.0"
    return json.dumps(env).encode()


BAD = {
    "forged (another key)": (lambda u, d: desired(6, "1.1.0", u, d, key=generate_key()), "untrusted_key"),
    "tampered after signing": (_tampered, "bad_signature"),
    "replayed (same seq, other content)": (lambda u, d: desired(5, "1.1.0", u, d), "rollback"),
    "replayed (older seq)": (lambda u, d: desired(4, "1.1.0", u, d), "rollback"),
    "expired": (lambda u, d: desired(6, "1.1.0", u, d, issued_ago=timedelta(hours=2)), "expired"),
    "other device": (lambda u, d: desired(6, "1.1.0", u, d, device_id="dev-2"), "wrong_device"),
    "a version it may not move to": (lambda u, d: desired(6, "0.9.0", u, d), "version_not_allowed"),
    "not JSON": (lambda u, d: b"{not json", "schema"),
    "unsigned": (lambda u, d: json.dumps({"signed": json.loads(desired(6, "1.1.0", u, d))["signed"],
                                          "signatures": []}).encode(), "unsigned"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_bad_desired_state_is_rejected_with_its_reason_and_changes_nothing(built, tmp_path, server, agent_for, case):
    pk = packages(built)
    dev = provisioned(built, tmp_path / "dev", package=pk.v100)
    data = pk.v110.read_bytes()
    url = server.add("clinical-1.1.0", data)
    agent = agent_for(dev)
    h = DesiredHandler(dev, agent=agent, options=options())
    assert h.receive(desired(5, "1.0.0", url, pk.v100.read_bytes())).kind == "accepted"  # what it already runs
    assert settle(h).what == "current"
    before = _untouched(dev)

    make, reason = BAD[case]
    d = h.receive(make(url, data))
    assert (d.kind, d.reason) == ("rejected", reason), d.message
    assert settle(h).what.startswith("seq 5 done")  # nothing new to work on
    assert _untouched(dev) == before  # active model, slots, trust store, update state, last accepted seq
    rej = h.record().last_rejection
    assert rej is not None and rej["reason"] == reason and rej["message"] == d.message
    assert server.requests == []  # nothing was downloaded
    assert agent.predict(rows(built)[0]).version == "1.0.0"  # the agent still answers


def test_expiry_is_judged_by_the_trust_store_high_water_not_a_clock_set_back(built, tmp_path, server):
    pk = packages(built)
    dev = provisioned(built, tmp_path / "dev", package=pk.v100)
    url = server.add("p", pk.v110.read_bytes())
    back = utcnow() - timedelta(days=10)  # a device whose RTC lost ten days
    h = DesiredHandler(dev, options=options(), clock=lambda: back)
    msg = desired(1, "1.1.0", url, pk.v110.read_bytes(), issued_ago=timedelta(days=10), expires_in=timedelta(days=1))
    d = h.receive(msg)  # valid by the device's wall clock, expired by the high-water mark (provisioning time)
    assert (d.kind, d.reason) == ("rejected", "expired")
    assert h.record().last_seq == 0


def test_the_same_retained_message_delivered_again_is_a_duplicate_not_a_replay(built, tmp_path, server):
    pk = packages(built)
    dev = provisioned(built, tmp_path / "dev", package=pk.v100)
    msg = desired(3, "1.0.0", server.add("p", pk.v100.read_bytes()), pk.v100.read_bytes())
    h = DesiredHandler(dev, options=options())
    assert h.receive(msg).kind == "accepted"
    again = h.receive(msg)
    assert again.kind == "duplicate" and h.record().last_rejection is None and h.record().last_seq == 3


# ---- the good path ----------------------------------------------------------------------------------------
def test_a_good_desired_state_downloads_with_a_resume_installs_and_commits_after_probation(built, tmp_path, server,
                                                                                           agent_for):
    pk = packages(built)
    dev = provisioned(built, tmp_path / "dev", package=pk.v100)
    data = pk.v110.read_bytes()
    url = server.add("clinical-1.1.0", data)
    server.drop_after = len(data) // 2  # the link drops half-way, once
    agent = agent_for(dev)
    states: list[str] = []
    h = DesiredHandler(dev, agent=agent, options=options(),
                       on_change=lambda: states.append(build_report(dev).update_state))

    with Traffic(agent, rows(built)) as app:
        time.sleep(0.3)  # the previous version's latency is measured from this traffic
        assert h.receive(desired(1, "1.1.0", url, data, rollout="r-1", reason="stage 1")).kind == "accepted"
        settle(h)
    assert server.ranges()[0] is None and server.ranges()[1].startswith("bytes=")  # type: ignore[union-attr]
    assert len(server.requests) == 2  # resumed, not restarted
    last = last_result(dev)
    assert (last["status"], last["reason"], last["version"]) == ("committed", "probation_passed", "1.1.0")
    assert last["details"]["predictions"] >= 200 and last["details"]["errors"] == 0
    assert last["details"]["baseline"]["version"] == "1.0.0"  # p95 compared with the previous version's
    assert versions(dev) == ("1.1.0", "1.0.0") and serve(dev) == "1.1.0"
    assert agent.model is not None and agent.model.version == "1.1.0" and app.served[-1] == "1.1.0"
    assert only_slots_left(dev) and list((dev.path / "downloads").iterdir()) == []

    rep = build_report(dev)  # what the runner publishes
    assert (rep.desired_seq, rep.update_state, rep.active) == (1, "idle", {"name": "clinical", "version": "1.1.0"})
    assert rep.target == Updater(dev).config.target and rep.to_dict()["target"]  # the server checks rollouts by it
    assert rep.last_result is not None and rep.last_result["status"] == "committed"
    for s in ("downloading", "verifying", "staging", "smoke_test", "activating", "probation", "idle"):
        assert s in states  # a report was queued at every state change
    assert h.record().outcome["status"] == "committed"  # type: ignore[index]


def test_the_report_names_a_refused_package_by_its_file_name_not_its_path_on_the_device(built, tmp_path):
    pk = packages(built)
    dev = provisioned(built, tmp_path / "dev", package=pk.v100)
    private = tmp_path / "home" / "dr-alice-smith"
    private.mkdir(parents=True)
    bad = private / "clinical-1.1.0.efpkg"
    raw = bytearray(pk.v110.read_bytes())
    raw[len(raw) // 2] ^= 1  # damaged in transit
    bad.write_bytes(bytes(raw))
    assert not Updater(dev).install(bad).ok
    assert Updater(dev).record().last_result["package"] == str(bad)  # type: ignore[index]  # kept locally
    shared = build_report(dev).to_dict()
    assert shared["last_result"]["package"] == "clinical-1.1.0.efpkg"
    assert "dr-alice-smith" not in json.dumps(shared), shared["last_result"]


def test_the_standby_version_is_switched_to_without_any_download(built, tmp_path, server, agent_for):
    pk = packages(built)
    dev = provisioned(built, tmp_path / "dev", package=pk.v100)
    assert Updater(dev).install(pk.v110).ok  # 1.1.0 active, 1.0.0 in standby
    agent = agent_for(dev)
    url = server.add("clinical-1.0.0", pk.v100.read_bytes())
    h = DesiredHandler(dev, agent=agent, options=options())
    assert h.receive(desired(7, "1.0.0", url, pk.v100.read_bytes(), reason="rollback: p95 gate")).kind == "accepted"
    settle(h)
    assert server.requests == []
    last = last_result(dev)
    assert (last["status"], last["reason"], last["version"]) == ("rolled_back", "desired_rollback", "1.0.0")
    assert "desired state seq 7 asks for clinical 1.0.0 (rollback: p95 gate)" in last["message"]
    assert versions(dev) == ("1.0.0", "1.1.0") and serve(dev) == "1.0.0"
    assert agent.model is not None and agent.model.version == "1.0.0"


def test_a_version_rolled_out_again_from_the_standby_is_a_switch_on_probation_not_a_rollback(built, tmp_path, server,
                                                                                             agent_for):
    """After a fleet rollback (1.1.0 -> 1.0.0) the standby holds 1.1.0; a rollout of 1.1.0 switches to it without a
    download, watches it on probation and commits. The old agent reported this as `rolled_back (desired_rollback)
    ... rolled back from clinical 1.0.0 to clinical 1.1.0`, which the fleet's gates count as 1.1.0 failing."""
    pk = packages(built)
    dev = provisioned(built, tmp_path / "dev", package=pk.v100)
    assert Updater(dev).install(pk.v110).ok
    agent = agent_for(dev)
    h = DesiredHandler(dev, agent=agent, options=options())
    old_url = server.add("clinical-1.0.0", pk.v100.read_bytes())
    assert h.receive(desired(7, "1.0.0", old_url, pk.v100.read_bytes(), reason="rollback: p95 gate")).kind == "accepted"
    settle(h)
    assert versions(dev) == ("1.0.0", "1.1.0") and last_result(dev)["status"] == "rolled_back"

    url = server.add("clinical-1.1.0", pk.v110.read_bytes())
    with Traffic(agent, rows(built)):
        time.sleep(0.2)  # the serving version's latency: the probation's baseline
        assert h.receive(desired(8, "1.1.0", url, pk.v110.read_bytes(), reason="stage 1")).kind == "accepted"
        settle(h)
    assert server.requests == []  # nothing downloaded
    last = last_result(dev)
    assert (last["status"], last["reason"], last["version"]) == ("committed", "probation_passed", "1.1.0")
    assert last["details"]["baseline"]["version"] == "1.0.0"  # watched against the version it replaced
    history = UpdateRecord.load(dev.update_file).history
    switched = next(h for h in history if (h["from"], h["to"]) == ("idle", "activating"))
    assert "is in the standby slot b" in switched["reason"] and "no download" in switched["reason"]
    assert ("activating", "probation") in [(h["from"], h["to"]) for h in history]
    assert not any("rolled back" in h["reason"] or h["to"] == "rolling_back" for h in history[-4:])
    assert versions(dev) == ("1.1.0", "1.0.0") and serve(dev) == "1.1.0"
    assert agent.model is not None and agent.model.version == "1.1.0"
    assert h.record().outcome["status"] == "committed"  # type: ignore[index]


@pytest.mark.parametrize("fault", ["more bytes than declared", "hash mismatch"])
def test_a_package_that_is_not_the_one_declared_is_refused_and_nothing_is_installed(built, tmp_path, server, fault):
    pk = packages(built)
    dev = provisioned(built, tmp_path / "dev", package=pk.v100)
    data = pk.v110.read_bytes()
    url = server.add("clinical-1.1.0", data)
    if fault == "more bytes than declared":
        server.extra = b"\0" * 4096
        msg, reason = desired(1, "1.1.0", url, data), "length_exceeded"
    else:
        msg, reason = desired(1, "1.1.0", url, data, sha256=hashlib.sha256(b"other").hexdigest()), "hash_mismatch"
    before = dev.active_file.read_bytes()
    h = DesiredHandler(dev, options=options())
    assert h.receive(msg).kind == "accepted"
    settle(h)
    last = last_result(dev)
    assert (last["status"], last["reason"]) == ("failed", reason)
    assert h.record().outcome["final"] is True and len(server.requests) == 1  # type: ignore[index]  # not retried
    assert dev.active_file.read_bytes() == before and versions(dev) == ("1.0.0", None)
    assert only_slots_left(dev) and list((dev.path / "downloads").iterdir()) == []


def test_a_stalled_download_is_retried_and_resumes_from_the_partial_file(built, tmp_path, server):
    pk = packages(built)
    dev = provisioned(built, tmp_path / "dev", package=pk.v100)
    data = pk.v110.read_bytes()
    url = server.add("clinical-1.1.0", data)
    server.stall_after = len(data) // 3
    h = DesiredHandler(dev, options=options(download=DownloadOptions(read_timeout=0.5, resumes=0),
                                            policy=ProbationPolicy(seconds=0.5)))
    h.receive(desired(1, "1.1.0", url, data))
    step = h.converge()
    assert step.retry_in and step.result is not None and step.result.reason == "download_interrupted"
    assert h.record().outcome["final"] is False  # type: ignore[index]
    server.release.set()
    settle(h)
    assert server.ranges()[-1] not in (None, "bytes=0-") and last_result(dev)["status"] == "committed"


# ---- deferral: maintenance window and a running batch -------------------------------------------------------
def test_a_closed_maintenance_window_defers_everything(built, tmp_path, server):
    pk = packages(built)
    dev = provisioned(built, tmp_path / "dev", package=pk.v100)
    url = server.add("p", pk.v110.read_bytes())
    now = utcnow()
    closed = MaintenanceWindow.parse(f"{(now + timedelta(hours=6)):%H:%M}-{(now + timedelta(hours=7)):%H:%M}")
    assert not closed.is_open(now) and 5.9 * 3600 < closed.seconds_until_open(now) <= 6 * 3600
    h = DesiredHandler(dev, options=options(window=closed))
    h.receive(desired(1, "1.1.0", url, pk.v110.read_bytes()))
    step = h.converge()
    assert step.what == "deferred: maintenance window" and step.retry_in
    assert server.requests == [] and versions(dev) == ("1.0.0", None)
    assert h.record().outcome["reason"] == "maintenance_window"  # type: ignore[index]
    # the report says so, for the operator's `rollout status` (and survives the contract's round trip)
    from device_agent.runner import build_report
    from edgefleet_contracts.report import Report

    outcome = Report.from_dict(build_report(dev).to_dict()).desired_outcome
    assert outcome is not None and (outcome["seq"], outcome["status"], outcome["reason"]) == (
        1, "deferred", "maintenance_window") and "maintenance window" in outcome["message"]


def test_a_running_batch_defers_the_swap_until_it_ends(built, tmp_path, server, agent_for):
    pk = packages(built)
    dev = provisioned(built, tmp_path / "dev", package=pk.v100)
    data = pk.v110.read_bytes()
    url = server.add("p", data)
    agent = agent_for(dev)
    h = DesiredHandler(dev, agent=agent, options=options(busy_timeout=0.3, policy=ProbationPolicy(seconds=0.5)))
    h.receive(desired(1, "1.1.0", url, data))
    with agent.batch():  # a batch is running
        step = h.converge()
        assert step.result is not None and (step.result.status, step.result.reason) == ("deferred", "busy")
        assert versions(dev) == ("1.0.0", None) and only_slots_left(dev)
        assert not agent.reload() and agent.model is not None and agent.model.version == "1.0.0"
    settle(h)
    assert last_result(dev)["status"] == "committed" and agent.model.version == "1.1.0"
    assert len(server.requests) == 1  # the downloaded package was kept for the retry


# ---- SIGKILL of `device-agent run` ----------------------------------------------------------------------
def _run(dev: DeviceDir, log: Path, failpoint: str | None = None) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != FAILPOINT_ENV}
    env["PYTHONPATH"] = str(ROOT)
    if failpoint:
        env[FAILPOINT_ENV] = failpoint
    with log.open("ab") as fh:
        return subprocess.Popen([sys.executable, "-m", "device_agent.cli", "run", "--no-http", "--dir", str(dev.path)],
                                env=env, stdout=fh, stderr=fh, cwd=ROOT)


def _wait(pred: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}" + (f"; agent log:\n{log.read_text()}"
                                                                               if log else ""))


def _committed(dev: DeviceDir, version: str) -> bool:
    try:
        last = last_result(dev) or {}
    except (OSError, ValueError):
        return False
    return (last.get("status"), last.get("version")) == ("committed", version)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _publish_retained(broker: Any, dev: DeviceDir, payload: bytes) -> None:
    pub = Subscriber(broker, []).start()
    try:
        info = pub.client.publish(topic("default", "dev-1", "desired"), payload, qos=1, retain=True)
        info.wait_for_publish(5)
    finally:
        pub.stop()


def test_sigkill_during_the_download_resumes_from_the_partial_file_and_converges(built, tmp_path, server, mosquitto):
    pk = packages(built)
    dev = provisioned(built, tmp_path / "dev", package=pk.v100, broker=mosquitto.url, probation_seconds=1.0,
                      probation_predictions=5)
    data = pk.v110.read_bytes()
    url = server.add("clinical-1.1.0", data)
    server.stall_after = len(data) // 2
    part = dev.path / "downloads" / f"{hashlib.sha256(data).hexdigest()}.part"
    log = tmp_path / "agent.log"
    _publish_retained(mosquitto, dev, desired(1, "1.1.0", url, data))
    with Subscriber(mosquitto, [topic("default", "dev-1", "report")]) as reports:
        proc = _run(dev, log)
        try:
            assert server.stalled.wait(40), log.read_text()
            _wait(lambda: part.exists() and part.stat().st_size > 0, 10, "the partial file", log)
            assert UpdateRecord.load(dev.update_file).state == "downloading"
            proc.kill()  # SIGKILL mid-file
            proc.wait(10)
        finally:
            _stop(proc)
        server.release.set()
        have = part.stat().st_size
        assert 0 < have < len(data) and versions(dev) == ("1.0.0", None)

        proc = _run(dev, log)  # the retained message arrives again (a duplicate) and desired.json says what to do
        try:
            _wait(lambda: _committed(dev, "1.1.0"), 40, "1.1.0 committed", log)
            assert reports.wait_for(lambda ms: any(_report_says(m.payload, 1, "committed") for m in ms), 15)
        finally:
            _stop(proc)
    assert server.ranges()[-1] == f"bytes={have}-"  # resumed from the partial file
    assert serve(dev) == "1.1.0" and versions(dev) == ("1.1.0", "1.0.0") and only_slots_left(dev)
    assert "interrupted during downloading" in json.dumps(UpdateRecord.load(dev.update_file).history)


def _report_says(payload: bytes, seq: int, status: str) -> bool:
    signed = json.loads(payload)["signed"]
    return signed["desired_seq"] == seq and (signed.get("last_result") or {}).get("status") == status


@pytest.mark.parametrize("state", ["activating", "probation"])
def test_sigkill_during_activation_or_probation_converges_to_the_desired_version(built, tmp_path, server, mosquitto,
                                                                                 state):
    pk = packages(built)
    dev = provisioned(built, tmp_path / "dev", package=pk.v100, broker=mosquitto.url, probation_seconds=1.0,
                      probation_predictions=5)
    data = pk.v110.read_bytes()
    url = server.add("clinical-1.1.0", data)
    log = tmp_path / "agent.log"
    _publish_retained(mosquitto, dev, desired(1, "1.1.0", url, data))
    proc = _run(dev, log, failpoint=state)
    try:
        assert proc.wait(60) == -signal.SIGKILL, log.read_text()
    finally:
        _stop(proc)
    assert UpdateRecord.load(dev.update_file).state == state  # persisted on entry, then killed
    assert serve(dev) == ("1.0.0" if state == "activating" else "1.1.0")  # never a broken model

    proc = _run(dev, log)
    try:
        _wait(lambda: _committed(dev, "1.1.0"), 40, "1.1.0 committed", log)
    finally:
        _stop(proc)
    assert serve(dev) == "1.1.0" and versions(dev) == ("1.1.0", "1.0.0") and only_slots_left(dev)
    assert len(server.requests) == 1  # the complete download was kept: installed again without fetching it
    history = json.dumps(UpdateRecord.load(dev.update_file).history)
    if state == "activating":
        assert "interrupted during activating" in history
    else:
        assert "interrupted" not in history  # the watch was resumed, not abandoned
        assert last_result(dev)["details"]["resumes"] == 1
