"""The agent as it runs on a device: `device-agent run` as a process, an app calling its HTTP API, summaries
reaching a real Mosquitto — including while the broker is down for a while — signed and free of raw values."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np

from device_agent.cli import main as agent_cli
from device_agent.config import DeviceDir
from edgefleet_contracts.signing import generate_key, key_id, load_public_key, save_public_key, verify_envelope
from edgefleet_contracts.summary import Summary
from edgefleet_contracts.topics import topic
from tests.brokers import Mosquitto, Subscriber, free_port
from tests.support import wait_until


def _device(built, tmp_path: Path, broker_url: str) -> DeviceDir:
    fleet = generate_key()
    save_public_key(fleet.public_key(), tmp_path / "fleet.pub")
    d = tmp_path / "dev"
    assert agent_cli(["provision", "--dir", str(d), "--device-id", "clinic-7", "--target", "x86_64-avx2",
                      "--root-key", str(built.keys / "root.pub"), "--fleet-key", str(tmp_path / "fleet.pub"),
                      "--broker", broker_url, "--tag", "site=north", "--package", str(built.package)]) == 0
    dd = DeviceDir(d)
    cfg = dd.load_config()
    from dataclasses import replace

    dd.save_config(replace(cfg, window_count=25, window_seconds=3600, min_window_samples=10, heartbeat_seconds=1))
    return dd


def test_running_agent_serves_http_and_delivers_signed_summaries_through_a_broker_outage(built, tmp_path):
    # A persistent broker and a persistent-session subscriber (like the fleet server's), so messages the agent
    # sends right after the broker restarts are kept for the subscriber even if it reconnects second.
    mosquitto = Mosquitto(tmp_path / "mosquitto", persistence=True).start()
    dd = _device(built, tmp_path, mosquitto.url)
    port = free_port()
    sub = Subscriber(mosquitto, [topic("default", "clinic-7", "summary"), topic("default", "clinic-7", "report")],
                     client_id="fleet-server-test", clean_session=False)
    sub.start()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "device_agent.cli", "run", "--dir", str(dd.path),
                             "--http-port", str(port)], env=env, stderr=subprocess.PIPE, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        assert wait_until(lambda: _up(base), 30), "agent HTTP API did not come up"
        with np.load(built.holdout) as z:
            x = z["x"]
        for row in x[:50]:  # two windows of 25
            r = httpx.post(f"{base}/v1/predict", json={"inputs": [float(v) for v in row]})
            assert r.status_code == 200 and r.json()["version"] == "1.0.0"
        summ_topic = topic("default", "clinic-7", "summary")
        assert sub.wait_for(lambda ms: _seqs(ms, summ_topic) >= {1, 2}, 20), dd.link_file.read_text()
        assert sub.wait_for(lambda ms: any(m.topic.endswith("/report") for m in ms), 10)

        mosquitto.stop()  # the link goes down; the agent keeps serving and summarising
        assert wait_until(lambda: json.loads(dd.link_file.read_text())["state"] != "connected", 10)
        for row in x[50:100]:
            assert httpx.post(f"{base}/v1/predict", json={"inputs": [float(v) for v in row]}).status_code == 200
        status = httpx.get(f"{base}/v1/status").json()
        assert status["summaries_emitted"] >= 3
        mosquitto.restart()
        assert sub.wait_for(lambda ms: _seqs(ms, summ_topic) >= {1, 2, 3, 4}, 30), mosquitto.log()[-2000:]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
        sub.stop()
        mosquitto.close()
    device_pub = load_public_key(dd.device_pub)
    envelopes = [e for m in sub.messages(summ_topic) for e in json.loads(m.payload)]
    seqs = [e["signed"]["seq"] for e in envelopes]
    assert sorted(set(seqs)) == [1, 2, 3, 4]
    for env_ in envelopes:
        signed, kid = verify_envelope(env_, {key_id(device_pub): device_pub}, "summary")
        s = Summary.from_dict(signed)
        assert s.count == 25 and s.device_id == "clinic-7" and (s.model, s.version) == ("clinical", "1.0.0")
    text = json.dumps(envelopes)
    raw = {repr(float(v)) for v in x[:100].ravel() if len(repr(float(v))) > 7}
    assert raw and not [r for r in raw if r in text]  # no raw input value left the device
    assert proc.returncode == 0


def _up(base: str) -> bool:
    try:
        return httpx.get(f"{base}/v1/status", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _seqs(messages, summ_topic: str) -> set[int]:  # type: ignore[no-untyped-def]
    out = set()
    for m in messages:
        if m.topic == summ_topic:
            out |= {e["signed"]["seq"] for e in json.loads(m.payload)}
    return out


def test_predict_and_batch_commands_work_offline(built, tmp_path):
    fleet = generate_key()
    save_public_key(fleet.public_key(), tmp_path / "fleet.pub")
    d = tmp_path / "offline"
    assert agent_cli(["provision", "--dir", str(d), "--device-id", "ward-3", "--target", "x86_64-avx2",
                      "--root-key", str(built.keys / "root.pub"), "--fleet-key", str(tmp_path / "fleet.pub"),
                      "--package", str(built.package)]) == 0
    with np.load(built.holdout) as z:
        x = z["x"]
    np.save(tmp_path / "one.npy", x[0])
    assert agent_cli(["predict", str(tmp_path / "one.npy"), "--dir", str(d), "--json"]) == 0
    np.savez(tmp_path / "many.npz", x=x[:30], keys=np.array([f"k{i}" for i in range(30)]))
    assert agent_cli(["batch", "--dir", str(d), "--input", str(tmp_path / "many.npz"),
                      "--store", str(tmp_path / "kv.sqlite")]) == 0
    from device_agent.batch import KVStore

    assert KVStore(tmp_path / "kv.sqlite").get("k7")["version"] == "1.0.0"  # type: ignore[index]
    (tmp_path / "bad.json").write_text('{"not": "features"}')
    assert agent_cli(["predict", str(tmp_path / "bad.json"), "--dir", str(d)]) == 1


def test_a_second_run_or_serve_on_a_device_folder_is_refused_naming_the_first(built, tmp_path, capsys):
    """Two agents on one folder share its MQTT client id (each taking the broker connection from the other), its
    outbox and its status file (found by a README walkthrough audit: 21 take-overs in 20 s)."""
    dd = _device(built, tmp_path, "mqtt://127.0.0.1:1")  # no broker: the link retries, the agent runs
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "device_agent.cli", "run", "--dir", str(dd.path), "--no-http"],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: (dd.path / "agent.lock").is_file()
                          and (dd.path / "agent.lock").read_text().strip() == str(proc.pid), 30)
        for command in (["run", "--no-http"], ["serve", "--port", str(free_port())]):
            assert agent_cli([command[0], "--dir", str(dd.path), *command[1:]]) == 1
            err = capsys.readouterr().err.strip()
            assert err == (f"device-agent: error (already_running): another device-agent run or serve (pid "
                           f"{proc.pid}) is using {dd.path}; stop it first (one agent per device folder), then "
                           f"start `device-agent {command[0]}`"), err
        assert proc.poll() is None  # the first one is untouched
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=20)
    # once it stopped, the folder is free again
    from device_agent.cli import _hold_instance

    with _hold_instance(dd, "run"):
        assert (dd.path / "agent.lock").read_text().strip() == str(os.getpid())
