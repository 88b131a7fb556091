"""`device-agent serve` as it runs: the real command with several uvicorn worker processes, an app calling its
HTTP API over fresh connections (so requests land on different workers), summaries reaching a real Mosquitto."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from device_agent.batch import KVStore
from device_agent.cli import main as agent_cli
from device_agent.config import DeviceDir
from device_agent.status import status_doc
from edgefleet_contracts.signing import generate_key, key_id, load_public_key, save_public_key, verify_envelope
from edgefleet_contracts.summary import Summary
from edgefleet_contracts.topics import topic
from tests.brokers import Subscriber, free_port
from tests.support import wait_until

DEVICE = "serve-1"



def _device(built: Any, tmp_path: Path, broker_url: str = "") -> DeviceDir:
    fleet = generate_key()
    save_public_key(fleet.public_key(), tmp_path / "fleet.pub")
    d = tmp_path / "dev"
    assert agent_cli(["provision", "--dir", str(d), "--device-id", DEVICE, "--target", "x86_64-avx2",
                      "--root-key", str(built.keys / "root.pub"), "--fleet-key", str(tmp_path / "fleet.pub"),
                      "--broker", broker_url, "--package", str(built.package)]) == 0
    dd = DeviceDir(d)
    # Windows close every 2 s and every one is summarised (k = 1, waived for the test), so the labels taken show
    # up in summaries while the service runs.
    dd.save_config(replace(dd.load_config(), window_count=100_000, window_seconds=2.0, min_window_samples=1,
                           allow_small_windows=True, heartbeat_seconds=1))
    return dd


@dataclass
class Served:
    base: str
    proc: subprocess.Popen[str]


@pytest.fixture
def start_serve() -> Iterator[Any]:
    """``start_serve(device, workers, store=None)``: the real `device-agent serve` on a free loopback port, up and
    answering; stopped with SIGTERM (by its pid) after the test if the test did not stop it."""
    started: list[subprocess.Popen[str]] = []

    def start(dd: DeviceDir, workers: int, store: Path | None = None) -> Served:
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if k != "EDGEFLEET_SERVE_URL"}  # the command sets it itself
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
        cmd = [sys.executable, "-m", "device_agent.cli", "serve", "--dir", str(dd.path), "--host", "127.0.0.1",
               "--port", str(port), "--workers", str(workers)]
        if store is not None:
            cmd += ["--store", str(store)]
        proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
        started.append(proc)
        assert wait_until(lambda: _up(base), 60), "serve did not come up"
        return Served(base, proc)

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/v1/status", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _stop(s: Served) -> int:
    s.proc.send_signal(signal.SIGTERM)
    return s.proc.wait(timeout=40)


def _rows(built: Any) -> np.ndarray:
    with np.load(built.holdout) as z:
        return np.asarray(z["x"])


def _boot(pid: str) -> str:
    return pid.rsplit("-", 1)[0]


def _confusion_total(messages: list[Any], summ_topic: str, device_pub: Any) -> int:
    total, seqs = 0, set()
    for m in messages:
        if m.topic != summ_topic:
            continue
        for env in json.loads(m.payload):
            signed, _ = verify_envelope(env, {key_id(device_pub): device_pub}, "summary")
            s = Summary.from_dict(signed)
            if s.seq in seqs:
                continue  # a re-send after a lost acknowledgement
            seqs.add(s.seq)
            total += int(np.sum(s.confusion)) if s.confusion is not None else 0
    return total


def test_labels_reach_any_worker_once_and_are_counted_once_in_the_summaries(built, tmp_path, mosquitto,
                                                                            start_serve):
    dd = _device(built, tmp_path, mosquitto.url)
    summ_topic = topic("default", DEVICE, "summary")
    sub = Subscriber(mosquitto, [summ_topic]).start()
    served = start_serve(dd, 4)
    x = _rows(built)
    try:
        # Every request on a fresh connection: predictions and their labels land on whichever worker accepts.
        ids = []
        for row in x[:60]:
            p = httpx.post(f"{served.base}/v1/predict", json={"inputs": [float(v) for v in row]}).json()
            ids.append(p["prediction_id"])
            r = httpx.post(f"{served.base}/v1/feedback", json={"prediction_id": p["prediction_id"], "label": 0})
            assert r.status_code == 200, r.text  # was 404 unknown_prediction when another worker predicted
        assert len({_boot(i) for i in ids}) >= 2, "the predictions all came from one worker: the test proves nothing"

        # Four conflicting labels at once for each of 20 more predictions: one is taken, three are 409.
        fresh = [httpx.post(f"{served.base}/v1/predict", json={"inputs": [float(v) for v in row]}).json()
                 ["prediction_id"] for row in x[60:80]]
        answers: dict[str, list[int]] = {pid: [] for pid in fresh}

        def label(pid: str, cls: int) -> None:
            r = httpx.post(f"{served.base}/v1/feedback", json={"prediction_id": pid, "label": cls}, timeout=30)
            answers[pid].append(r.status_code)
            if r.status_code == 409:
                assert r.json()["error"] == "already_labelled"

        threads = [threading.Thread(target=label, args=(pid, i % 2)) for pid in fresh for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(sorted(a) == [200, 409, 409, 409] for a in answers.values()), answers

        # Labels already taken stay taken, whichever worker is asked.
        for pid in ids[:10]:
            r = httpx.post(f"{served.base}/v1/feedback", json={"prediction_id": pid, "label": 1})
            assert r.status_code == 409 and r.json()["error"] == "already_labelled", r.text
        well_formed_unknown = f"{_boot(ids[0])}-999999"
        assert httpx.post(f"{served.base}/v1/feedback",
                          json={"prediction_id": well_formed_unknown, "label": 0}).status_code == 404

        lines = [json.loads(line) for line in (dd.path / "predictions" / "labels.jsonl").read_text().splitlines()]
        assert sorted(d["id"] for d in lines) == sorted(ids + fresh)  # one line per prediction

        # A window holding labels but no prediction is below k (1) and held until its worker predicts again: keep
        # traffic going (fresh connections reach every worker) until every label has left in a summary.
        device_pub = load_public_key(dd.device_pub)
        deadline = time.monotonic() + 40
        while _confusion_total(sub.messages(), summ_topic, device_pub) < 80 and time.monotonic() < deadline:
            httpx.post(f"{served.base}/v1/predict", json={"inputs": [float(v) for v in x[0]]})
            time.sleep(0.05)
        assert _confusion_total(sub.messages(), summ_topic, device_pub) == 80
        assert _stop(served) == 0
        time.sleep(2)  # anything the last windows carried that still left before the link stopped
        assert _confusion_total(sub.messages(), summ_topic, device_pub) == 80  # each label counted once
    finally:
        sub.stop()


def test_serve_reports_like_one_device_over_one_link_and_stops_on_sigterm(built, tmp_path, mosquitto, start_serve):
    dd = _device(built, tmp_path, mosquitto.url)
    summ_topic, report_topic = topic("default", DEVICE, "summary"), topic("default", DEVICE, "report")
    sub = Subscriber(mosquitto, [summ_topic, report_topic]).start()
    served = start_serve(dd, 3)
    x = _rows(built)
    try:
        for row in x[:40]:
            assert httpx.post(f"{served.base}/v1/predict", json={"inputs": [float(v) for v in row]}).status_code == 200
        assert sub.wait_for(lambda ms: any(m.topic == report_topic for m in ms), 20), mosquitto.log()[-2000:]
        device_pub = load_public_key(dd.device_pub)

        def counted(ms: list[Any]) -> int:
            seen: dict[int, int] = {}
            for m in ms:
                if m.topic == summ_topic:
                    for env in json.loads(m.payload):
                        s = Summary.from_dict(verify_envelope(env, {key_id(device_pub): device_pub}, "summary")[0])
                        assert s.device_id == DEVICE
                        seen[s.seq] = s.count
            return sum(seen.values())

        assert sub.wait_for(lambda ms: counted(ms) >= 40, 30), counted(sub.messages())
        assert json.loads(dd.link_file.read_text())["state"] == "connected"
        connects = [line for line in mosquitto.log().splitlines() if "New client connected" in line
                    and f" as {DEVICE} " in line]
        assert len(connects) == 1, connects  # one link for the service, not one per worker
        assert "already connected" not in mosquitto.log()

        doc = status_doc(dd)  # what `device-agent status` shows
        assert doc["agent"]["state"] == "running", doc["agent"]
        assert doc["agent"]["url"] == served.base and doc["predictions"] is not None
        holder = doc["agent"]["pid"]
        assert holder != served.proc.pid  # a worker holds the link, not the supervisor

        os.kill(holder, signal.SIGKILL)  # the worker holding the link dies: another worker takes it over
        assert wait_until(lambda: status_doc(dd)["agent"].get("pid") not in (None, holder)
                     and status_doc(dd)["agent"]["state"] == "running", 30), status_doc(dd)["agent"]
        for row in x[40:60]:
            assert httpx.post(f"{served.base}/v1/predict", json={"inputs": [float(v) for v in row]}).status_code == 200
        assert sub.wait_for(lambda ms: counted(ms) >= 60, 30), counted(sub.messages())

        assert _stop(served) == 0
        assert not dd.agent_file.exists()
        assert json.loads(dd.link_file.read_text())["state"] == "disconnected"
        assert status_doc(dd)["agent"]["state"] == "not_running"
    finally:
        sub.stop()


def test_precomputed_keys_with_slashes_and_bad_json_counted_as_answered(built, tmp_path, start_serve):
    dd = _device(built, tmp_path)
    store = tmp_path / "kv.sqlite"
    KVStore(store).put_many([("0/0010.png", "[0.1, 0.9]", "clinical", "1.0.0", 1.0),
                             ("plain", "[0.5, 0.5]", "clinical", "1.0.0", 1.0)])
    served = start_serve(dd, 2, store)
    for path in ("0/0010.png", "0%2F0010.png", "plain"):
        r = httpx.get(f"{served.base}/v1/precomputed/{path}")
        assert r.status_code == 200, (path, r.text)
        assert r.json()["key"] == path.replace("%2F", "/")
    r = httpx.get(f"{served.base}/v1/precomputed/0/9999.png")
    assert r.status_code == 404 and r.json()["error"] == "unknown_key", r.text

    with httpx.Client(base_url=served.base) as client:  # one connection: one worker, whose counters we read
        r = client.post("/v1/predict", content=b"{not json")
        assert r.status_code == 400 and r.json()["error"] == "invalid_json"
        rejected = client.get("/v1/status").json()["rejected"]
        assert rejected.get("invalid_json") == 1 and "invalid_input" not in rejected, rejected
    assert _stop(served) == 0


def test_two_logs_on_one_folder_label_once_and_a_rewrite_keeps_the_others_labels(tmp_path):
    """Two PredictionLogs on one folder, as two serve workers hold them (each its own boot, lock descriptor and
    memory): a label taken by one is refused by the other, including after the other rewrote labels.jsonl."""
    from device_agent.errors import AlreadyLabelledError
    from device_agent.predlog import PredictionLog

    folder = tmp_path / "log"
    a, b = PredictionLog(folder, max_rows=4, flush_seconds=3600), PredictionLog(folder, max_rows=4, flush_seconds=3600)
    try:
        a.set_boot("wa")
        b.set_boot("wb")
        ma, mb = a.model_index("clinical", "1.0.0"), b.model_index("clinical", "1.0.0")
        assert ma == mb
        for n in range(1, 4):
            a.record(n, 0.0, ma, 1, 0.9)
            b.record(n, 0.0, mb, 0, 0.8)
        a.flush()
        b.flush()
        assert b.lookup("wa-2") == ("clinical", "1.0.0", 1)  # the other's prediction, from disk
        a.set_label("wa-1", 0)
        with pytest.raises(AlreadyLabelledError):
            b.set_label("wa-1", 1)
        for n in (1, 2, 3):
            b.set_label(f"wb-{n}", 1)  # over max_rows labels: b rewrites the file from the file, not its memory
        a.set_label("wa-2", 1)
        with pytest.raises(AlreadyLabelledError):
            b.set_label("wa-2", 0)
        with pytest.raises(AlreadyLabelledError):
            a.set_label("wb-3", 0)
    finally:
        a.close()
        b.close()


def _metric(text: str, name: str) -> float:
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
               or line.startswith(name + " "))


def test_status_and_metrics_count_the_whole_service_whichever_worker_answers(built, tmp_path, start_serve):
    """Each worker used to answer with its own counters, so a scrape of /metrics jumped between workers' values.
    Now every answer is the sum over the service's workers (``worker_stats``), an exited worker's counts kept."""
    dd = _device(built, tmp_path)
    served = start_serve(dd, 3)
    x = _rows(built)
    for row in x[:45]:  # fresh connections: spread over the workers
        assert httpx.post(f"{served.base}/v1/predict", json={"inputs": [float(v) for v in row]}).status_code == 200
    for _ in range(6):
        assert httpx.post(f"{served.base}/v1/predict", json={"inputs": [1.0]}).status_code == 422

    def every_answer(check: Any) -> bool:
        return all(check() for _ in range(6))  # six fresh connections: several workers answer

    def status() -> dict[str, Any]:
        return httpx.get(f"{served.base}/v1/status", timeout=5).json()

    def counted(doc: dict[str, Any]) -> tuple[int, dict[str, int]]:
        return doc["predictions"], doc["rejected"]

    assert wait_until(lambda: every_answer(lambda: counted(status()) == (45, {"wrong_shape": 6})), 10), status()
    doc = status()
    assert doc["workers"]["live"] == 3 and doc["workers"]["exited"] == 0
    answering = {status()["workers"]["answering"] for _ in range(12)}
    assert len(answering) > 1, "one worker answered every request: the sum was not tested"
    text = httpx.get(f"{served.base}/metrics").text
    assert _metric(text, "edgefleet_agent_predictions_total") == 45
    assert _metric(text, "edgefleet_agent_rejected_total") == 6
    assert status_doc(dd)["predictions"] == 45  # `device-agent status` asks the service

    victim = next(iter(answering - {served.proc.pid}))
    os.kill(victim, signal.SIGKILL)  # an exited worker's counts stay in the service's sums
    for row in x[45:60]:
        assert httpx.post(f"{served.base}/v1/predict", json={"inputs": [float(v) for v in row]}).status_code == 200
    assert wait_until(lambda: every_answer(lambda: status()["predictions"] == 60), 15), status()
    assert status()["workers"]["exited"] == 1
    assert _stop(served) == 0


def test_the_services_counters_never_go_back_whichever_worker_answers(built, tmp_path, start_serve):
    """Load on one worker (one kept-alive connection) while fresh connections ask any worker: every answer's
    prediction count is at least the one before (a worker used to add its live count to the others' second-old
    files, and the sum went back 12 -> 0 when another worker answered; found by a diff review)."""
    dd = _device(built, tmp_path)
    served = start_serve(dd, 2)
    x = _rows(built)
    sent = [0]
    stop = threading.Event()

    def load() -> None:
        with httpx.Client(base_url=served.base) as client:
            for row in x[:400]:
                if stop.is_set():
                    return
                assert client.post("/v1/predict", json={"inputs": [float(v) for v in row]}).status_code == 200
                sent[0] += 1

    t = threading.Thread(target=load)
    t.start()
    seen: list[tuple[int, int]] = []
    deadline = time.monotonic() + 20
    while (t.is_alive() or len(seen) < 20) and time.monotonic() < deadline:
        doc = httpx.get(f"{served.base}/v1/status", timeout=5).json()
        seen.append((doc["workers"]["answering"], doc["predictions"]))
    stop.set()
    t.join(10)
    backwards = [(a, b) for a, b in zip(seen, seen[1:], strict=False) if b[1] < a[1]]
    assert not backwards, backwards[:5]
    assert len({pid for pid, _ in seen}) == 2, "one worker answered every request: nothing was tested"
    assert wait_until(lambda: httpx.get(f"{served.base}/v1/status").json()["predictions"] == sent[0], 10)
    assert _stop(served) == 0


def test_serve_listens_where_the_devices_config_says_unless_told_otherwise(built, tmp_path):
    """`serve` bound a hard-coded 8470 whatever config.toml's http_port said (found by an offline-clinic audit)."""
    dd = _device(built, tmp_path)
    port = free_port()
    dd.save_config(replace(dd.load_config(), http_port=port))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "device_agent.cli", "serve", "--dir", str(dd.path), "--workers",
                             "2"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: _up(f"http://127.0.0.1:{port}"), 60), "serve did not listen on config's http_port"
    finally:
        assert _stop(Served(f"http://127.0.0.1:{port}", proc)) == 0
