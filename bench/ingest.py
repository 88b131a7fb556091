"""Ingest throughput: raw Mosquitto QoS 1 (paho -> paho) vs summaries durably stored through the MQTT ingest.

    .venv/bin/python bench/ingest.py [--scenarios 50x300,1x3000] [--processes 2] [--features 30] [--bins 20]

One loopback Mosquitto (started here, configured as the tests configure it). Per scenario, the same
pre-signed messages for both runs: each a JSON array of PER signed summary envelopes (50 is what the agent's
link sends; 1 is the worst case); the summary shape is the clinical example's (30 features on 20 reference
bins, ~5 KB signed):

(a) raw: a paho publisher process (QoS 1, at most 100 in flight) -> a paho subscriber (QoS 1, automatic
    PUBACK) in this process, from the publisher's go to the last message received;
(b) ingest: the same publisher process -> ``MqttIngest`` in this process -> validation (JSON, schema,
    Ed25519 signature, device, model version, timestamps, rate) -> batched ``INSERT OR IGNORE`` commit ->
    PUBACK, from the publisher's go to the last summary committed.

The ratio is (b) / (a) over the same messages. Both runs are bounded by ``--timeout`` seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as mqtt  # noqa: E402
from paho.mqtt.enums import CallbackAPIVersion, MQTTErrorCode  # noqa: E402

from edgefleet_contracts.signing import Ed25519PrivateKey, generate_key, public_b64, sign_envelope  # noqa: E402
from edgefleet_contracts.topics import topic  # noqa: E402
from fleet_server.devices import enroll  # noqa: E402
from fleet_server.ingest import IngestService  # noqa: E402
from fleet_server.mqtt_ingest import mqtt_source  # noqa: E402
from fleet_server.settings import ServerSettings  # noqa: E402
from fleet_server.store import Store  # noqa: E402
from tests.brokers import Mosquitto  # noqa: E402
from tests.fleet_server.conftest import make_summary  # noqa: E402

FLEET = "bench"


def _messages(n: int, per: int, devices: list[tuple[str, Ed25519PrivateKey]], features: int,
              bins: int) -> list[tuple[str, bytes]]:
    out = []
    seqs = {d: 0 for d, _ in devices}
    for i in range(n):
        dev, key = devices[i % len(devices)]
        envs = []
        for _ in range(per):
            s = make_summary(seqs[dev], dev, n_features=features, n_bins=bins + 2)
            envs.append(sign_envelope(s.to_dict(), key))
            seqs[dev] += 1
        out.append((topic(FLEET, dev, "summary"), json.dumps(envs, separators=(",", ":")).encode()))
    return out


def _save(messages: list[tuple[str, bytes]], path: Path) -> None:
    with path.open("wb") as fh:
        for t, payload in messages:
            tb = t.encode()
            fh.write(struct.pack("!HI", len(tb), len(payload)) + tb + payload)


def _load(path: Path) -> list[tuple[str, bytes]]:
    data, out, i = path.read_bytes(), [], 0
    while i < len(data):
        nt, npay = struct.unpack_from("!HI", data, i)
        i += 6
        out.append((data[i:i + nt].decode(), data[i + nt:i + nt + npay]))
        i += nt + npay
    return out


def publish_main(host: str, port: int, path: Path, name: str) -> int:
    """The publisher process: QoS 1, at most 100 messages in flight, waits for every PUBACK."""
    messages = _load(path)
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=name, protocol=mqtt.MQTTv311)
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    c.connect(host, port)
    c.loop_start()
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    infos = []
    for t, payload in messages:
        info = c.publish(t, payload, qos=1)
        if info.rc != MQTTErrorCode.MQTT_ERR_SUCCESS:
            print(f"publish failed: {mqtt.error_string(info.rc)}", file=sys.stderr)
            return 1
        infos.append(info)
    for info in infos:
        info.wait_for_publish(120)
    c.disconnect()
    c.loop_stop()
    return 0


def _publisher(broker: Mosquitto, path: Path, name: str) -> subprocess.Popen[bytes]:
    """Publishing runs in its own process (devices are elsewhere; it must not share our GIL). Returns once
    it has loaded the messages and connected; ``_go`` starts it."""
    proc = subprocess.Popen([sys.executable, __file__, "--publish", str(path), "--host", broker.host, "--port",
                             str(broker.port), "--name", name], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    if proc.stdout.readline().strip() != b"ready":
        proc.kill()
        proc.wait(10)
        raise RuntimeError("publisher did not start")
    return proc


def _go(proc: subprocess.Popen[bytes]) -> float:
    assert proc.stdin is not None
    t0 = time.perf_counter()
    proc.stdin.write(b"go\n")
    proc.stdin.flush()
    return t0


def _reap(proc: subprocess.Popen[bytes]) -> None:
    try:
        if proc.wait(timeout=60) != 0:
            raise RuntimeError(f"publisher exited with {proc.returncode}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def raw(broker: Mosquitto, messages: list[tuple[str, bytes]], path: Path, timeout: float) -> float:
    """Seconds from the first publish until the subscriber received every message."""
    got = threading.Event()
    count = [0]
    subscribed = threading.Event()
    sub = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="bench-raw-sub", protocol=mqtt.MQTTv311)

    def on_message(c: mqtt.Client, u: object, m: mqtt.MQTTMessage) -> None:
        count[0] += 1
        if count[0] == len(messages):
            got.set()

    sub.on_message = on_message
    sub.on_subscribe = lambda *a: subscribed.set()
    sub.on_connect = lambda c, *a: c.subscribe(f"edgefleet/{FLEET}/+/summary", qos=1)
    sub.connect(broker.host, broker.port)
    sub.loop_start()
    if not subscribed.wait(10):
        raise RuntimeError("raw subscriber did not subscribe")
    pub = _publisher(broker, path, "bench-raw-pub")
    t0 = _go(pub)
    try:
        if not got.wait(timeout):
            raise RuntimeError(f"raw: {count[0]} of {len(messages)} messages within {timeout} s")
        elapsed = time.perf_counter() - t0
    finally:
        _reap(pub)
    sub.disconnect()
    sub.loop_stop()
    return elapsed


def _end_session(broker: Mosquitto, client_id: str) -> None:
    """Discard the ingest's persistent session, or the next scenario's raw run would be queued for it."""
    c = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True, protocol=mqtt.MQTTv311)
    c.connect(broker.host, broker.port)
    c.loop_start()
    time.sleep(0.2)
    c.disconnect()
    c.loop_stop()


def ingest(broker: Mosquitto, data: Path, devices: list[tuple[str, Ed25519PrivateKey]],
           messages: list[tuple[str, bytes]], path: Path, per: int, timeout: float, validators: int,
           processes: int) -> tuple[float, dict[str, Any]]:
    """Seconds from the first publish until every summary is committed, and the ingest counters."""
    settings = ServerSettings(data_dir=data, broker=broker.url, fleet=FLEET, device_rate_per_minute=10**9)
    store = Store(settings.db_path)
    for dev, key in devices:
        enroll(store, FLEET, dev, public_b64(key.public_key()))
    with store.write() as c:  # the published version (a row, as registry.publish leaves it; no package here)
        c.execute("INSERT INTO model_versions VALUES ('clinical', '1.0.0', 'x86_64-avx2', '', 0, '', '{}', '{}',"
                  " '{}', 0)")
    service = IngestService(settings, store, validator_threads=validators, validator_processes=processes)
    source = mqtt_source(settings, service)
    if not service.start(10):
        raise RuntimeError(f"ingest did not subscribe: {source.last_error}")
    total = len(messages) * per
    pub = _publisher(broker, path, "bench-ingest-pub")
    t0 = _go(pub)
    try:
        deadline = time.monotonic() + timeout
        while service.counters.snapshot()["stored"] < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"ingest: {service.counters.snapshot()} within {timeout} s")
            time.sleep(0.002)
        elapsed = time.perf_counter() - t0
    finally:
        _reap(pub)
        service.stop(10)
        _end_session(broker, source.client_id)
    counters = {**service.counters.snapshot(), "mqtt": source.counters()}
    row = store.one("SELECT COUNT(*) FROM summaries")
    if row is None or row[0] != total:
        raise RuntimeError(f"stored {row[0] if row else 0} of {total}")
    store.close()
    return elapsed, counters


_STD_JSON_MARK = "EDGEFLEET_BENCH_ORJSON_HIDDEN"


def _without_orjson() -> int:
    """Run this benchmark again with an ``orjson`` that cannot be imported first on PYTHONPATH (inherited by
    the spawned validator processes)."""
    stub = Path(tempfile.mkdtemp(prefix="edgefleet-no-orjson-"))
    try:
        (stub / "orjson.py").write_text("raise ImportError('hidden by bench/ingest.py --std-json')\n")
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(stub), os.environ.get("PYTHONPATH", "")]),
                   **{_STD_JSON_MARK: "1"})  # the run below must not start another one
        return subprocess.run([sys.executable, *sys.argv], env=env, timeout=3600).returncode
    finally:
        shutil.rmtree(stub, ignore_errors=True)


def _scenario(text: str) -> tuple[int, int]:
    per, _, n = text.partition("x")
    return int(per), int(n)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenarios", default="50x300,1x3000",
                   help="comma-separated SUMMARIES_PER_MESSAGE x MESSAGES (default: 50x300,1x3000)")
    p.add_argument("--features", type=int, default=30)
    p.add_argument("--bins", type=int, default=20)
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--processes", type=int, default=2, help="validator processes (0: validate in threads)")
    p.add_argument("--validators", type=int, default=1, help="validator threads when --processes 0")
    p.add_argument("--timeout", type=float, default=120.0, help="bound on each measured run, seconds")
    p.add_argument("--publish", type=Path, help=argparse.SUPPRESS)  # internal: run as the publisher process
    p.add_argument("--host", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--name", help=argparse.SUPPRESS)
    p.add_argument("--std-json", action="store_true",
                   help="hide orjson (also from the validator processes) to measure the std-lib json path")
    a = p.parse_args(argv)
    if a.publish:
        return publish_main(a.host, a.port, a.publish, a.name)
    if a.std_json and not os.environ.get(_STD_JSON_MARK):
        return _without_orjson()
    command = " ".join([".venv/bin/python bench/ingest.py", *(sys.argv[1:] if argv is None else argv)])
    scenarios = [_scenario(x) for x in a.scenarios.split(",")]
    folder = Path(tempfile.mkdtemp(prefix="edgefleet-bench-ingest-"))
    rows: list[str] = []
    notes: list[str] = []
    try:
        devices = [(f"dev-{i:03d}", generate_key()) for i in range(a.devices)]
        with Mosquitto(folder / "broker") as broker:
            for k, (per, n) in enumerate(scenarios):
                t = time.perf_counter()
                messages = _messages(n, per, devices, a.features, a.bins)
                size = sum(len(m) for _, m in messages) / len(messages)
                print(f"{per} x {n}: signed {n * per} summaries in {time.perf_counter() - t:.1f} s; "
                      f"{size / 1024:.1f} KB per message", flush=True)
                path = folder / f"messages-{k}.bin"
                _save(messages, path)
                raw_s = raw(broker, messages, path, a.timeout)
                ing_s, counters = ingest(broker, folder / f"server-{k}", devices, messages, path, per, a.timeout,
                                         a.validators, a.processes)
                raw_msgs, ing_msgs = n / raw_s, n / ing_s
                label = f"{per} per message, {size / 1024:.1f} KB"
                rows.append(f"| {label} | (a) raw Mosquitto QoS 1, paho -> paho | {raw_msgs:,.0f} | "
                            f"{raw_msgs * per:,.0f} | {raw_msgs * size / 1e6:,.1f} | |")
                rows.append(f"| {label} | (b) MQTT ingest: validated, signature checked, committed | "
                            f"{ing_msgs:,.0f} | {ing_msgs * per:,.0f} | {ing_msgs * size / 1e6:,.1f} | "
                            f"**{ing_msgs / raw_msgs:.2f}** |")
                notes.append(f"{per} x {n}: {n * per} summaries stored, {counters['batches']} transactions, "
                             f"duplicates {counters['duplicates']}, rejected "
                             f"{sum(counters['rejected'].values())}")
                path.unlink()
        try:
            import orjson  # noqa: F401
            json_lib = "orjson"
        except ImportError:
            json_lib = "std-lib json"
        mode = f"{a.processes} validator processes" if a.processes else f"{a.validators} validator thread(s)"
        print()
        print(f"Command: `{command}`")
        print(f"({os.cpu_count()} CPUs, Python {platform.python_version()}, {json_lib}, {mode}; summaries of "
              f"{a.features} features x {a.bins} bins from {a.devices} devices)")
        print()
        print("| messages | path | messages/s | summaries/s | MB/s | ratio (b)/(a) |")
        print("|---|---|---:|---:|---:|---:|")
        print("\n".join(rows))
        print()
        print("; ".join(notes))
        return 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
