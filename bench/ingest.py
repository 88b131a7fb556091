"""Ingest throughput: raw broker throughput vs summaries durably stored per second through the server.

    .venv/bin/python bench/ingest.py [--scenarios 1x10000,50x400] [--repeat 3] [--processes 2]

One loopback Mosquitto (started here, configured as the tests configure it: QoS 1 queues unbounded, at most
100 messages in flight per client). Per scenario ``PERxN``, N messages are signed once (each a JSON array of
PER signed summary envelopes of the clinical example's shape: 30 features on 20 reference bins, ~5 KB per
summary; 1 per message is the main figure, 50 is what the agent's link sends after an outage) and the very
same bytes are published in both runs of each repetition, back to back:

(a) raw: a paho publisher process (QoS 1, at most 100 in flight) -> Mosquitto -> a paho subscriber (QoS 1,
    paho's automatic PUBACK, counts messages and does nothing else) in this process; from the publisher's go
    to the last message received. This is what the broker and a Python MQTT client cost with no ingest.
(b) ingest: the same publisher process -> Mosquitto -> ``MqttIngest`` (manual acks) in this process -> the
    validator processes (size, JSON, shape, schema, device, topic, Ed25519 signature, model version,
    timestamps, duplicates) -> rate tokens -> batched ``INSERT OR IGNORE`` commit -> PUBACK after the
    commit; from the publisher's go to the last summary committed (and every row is counted afterwards).

The per-device rate limit is lifted for (b) (10 devices send thousands of summaries a second each). The
ratio is (b)/(a) in summaries (= messages) per second; each repetition gives one ratio, the table shows the
medians. Runs are bounded by ``--timeout`` seconds. The machine's load average is printed: the figures are
only comparable when nothing else runs (on a shared machine both rates drop, (b) the more, as it needs both
cores while (a) is bound by one publisher thread).
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import platform
import shutil
import socket
import statistics
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

from edgefleet_contracts.signing import Ed25519PrivateKey, envelope_json, generate_key, public_b64, sign_envelope  # noqa: E402
from edgefleet_contracts.summary import Summary  # noqa: E402
from edgefleet_contracts.topics import topic  # noqa: E402
from fleet_server.devices import enroll  # noqa: E402
from fleet_server.ingest import IngestService, IngestWriter, Validator, fastpath, parsing, signatures  # noqa: E402
from fleet_server.mqtt_ingest import _IngestClient, mqtt_source  # noqa: E402
from fleet_server.settings import ServerSettings  # noqa: E402
from fleet_server.store import Store  # noqa: E402
from tests.brokers import Mosquitto  # noqa: E402
from tests.fleet_server.conftest import make_summary  # noqa: E402
from tests.fleet_server.test_mqtt_fast_read import publish  # noqa: E402

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
            envs.append(envelope_json(sign_envelope(s.to_dict(), key)))  # as the agent's link writes them
            seqs[dev] += 1
        out.append((topic(FLEET, dev, "summary"), b"[" + b",".join(envs) + b"]"))
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


def _server(data: Path, broker_url: str,
            devices: list[tuple[str, Ed25519PrivateKey]]) -> tuple[ServerSettings, Store]:
    """A server store with the devices enrolled and ``clinical 1.0.0`` published; no per-device rate limit."""
    settings = ServerSettings(data_dir=data, broker=broker_url, fleet=FLEET, device_rate_per_minute=10**9)
    store = Store(settings.db_path)
    for dev, key in devices:
        enroll(store, FLEET, dev, public_b64(key.public_key()))
    with store.write() as c:  # the published version (a row, as registry.publish leaves it; no package here)
        c.execute("INSERT INTO model_versions VALUES ('clinical', '1.0.0', 'x86_64-avx2', '', 0, '', '{}', '{}',"
                  " '{}', 0)")
    return settings, store


def breakdown(folder: Path, devices: list[tuple[str, Ed25519PrivateKey]], n: int, features: int,
              bins: int) -> list[tuple[str, float]]:
    """Where a 1-summary message's server CPU goes: each validation step alone, in this process, µs per
    message (best of 5 rounds over the same ``n`` messages), then the whole validator and the writer."""
    settings, store = _server(folder / "breakdown", "none", devices)
    messages = _messages(n, 1, devices, features, bins)
    docs = [json.loads(m)[0] for _, m in messages]
    keys = {d: signatures.DeviceKey(k.public_key()) for d, k in devices}
    signed = [(keys[d["signed"]["device_id"]], base64.b64decode(d["signatures"][0]["sig"]),
               parsing.canonical_fast(d["signed"])) for d in docs]
    validator = Validator(settings, store)
    work = [("summary", m, t.split("/")[2], "mqtt") for t, m in messages]

    def best(fn: Any, items: list[Any] | None = None) -> float:
        """Best of 5 rounds; a step's results are dropped as they come (keeping 2,000 decoded documents alive
        would charge the garbage collector's growing passes to the step: ~4x here)."""
        rounds = []
        for _ in range(5):
            t0 = time.perf_counter()
            if items is None:
                fn()
            else:
                for x in items:
                    fn(x)
            rounds.append(time.perf_counter() - t0)
        return min(rounds) / n * 1e6

    payloads = [m for _, m in messages]
    decoded = [(m, fastpath.decode(m) or []) for m in payloads]
    steps: list[tuple[str, Any, list[Any]]] = [
        ("fast path: msgspec decode and schema in one pass", fastpath.decode, payloads),
        ("fast path: find the signed bytes in the message", lambda md: fastpath.signed_spans(*md), decoded),
        ("full path: parse (size, nesting pre-scan, orjson.loads)", lambda m: parsing.parse_json(m, 1 << 22),
         payloads),
        ("full path: canonical bytes of the signed part (orjson, sorted keys)",
         lambda d: parsing.canonical_fast(d["signed"]), docs),
        ("full path: schema, Summary.from_dict", lambda d: Summary.from_dict(d["signed"]), docs),
    ]
    out = [(name, best(fn, items)) for name, fn, items in steps]
    zebra, sodium = signatures._zebra_verify, signatures._sodium_open
    for name, z, s in (("ed25519-zebra (used)", zebra, sodium), ("libsodium (without zebra)", None, sodium),
                       ("OpenSSL (without either)", None, None)):
        signatures._zebra_verify, signatures._sodium_open = z, s
        try:
            out.append((f"Ed25519 verify, {name}", best(lambda ksb: ksb[0].verify(ksb[1], ksb[2]), signed)))
        finally:
            signatures._zebra_verify, signatures._sodium_open = zebra, sodium
    out.append(("whole validator: check_batch, 16 messages a batch (all of the above + look-ups, results)",
                best(lambda i: validator.check_batch(work[i:i + 16]), list(range(0, n, 16)))))
    subs = [validator.check_batch(work[i:i + 16]) for i in range(0, n, 16)]
    flat = [x.resolve(w[1]) for batch, i in zip(subs, range(0, n, 16), strict=True)
            for x, w in zip(batch, work[i:i + 16], strict=True)]
    writer = IngestWriter(settings, store)
    t0 = time.perf_counter()
    for i in range(0, n, 25):
        writer._write(flat[i:i + 25])
    out.append(("writer: INSERT OR IGNORE + commit, 25 a transaction (once)", (time.perf_counter() - t0) / n * 1e6))
    store.close()
    for fast in (False, True):
        name = "the fast read (used)" if fast else "paho's read, decode and on_message"
        out.append((f"MQTT: take a QoS 1 PUBLISH from the socket, {name}",
                    min(_mqtt_read_cost(messages, fast) for _ in range(5))))
    return out


def _mqtt_read_cost(messages: list[tuple[str, bytes]], fast: bool) -> float:
    """CPU µs (this thread's) per message for ``_IngestClient`` to read ``messages`` as QoS 1 PUBLISH packets
    from a socket and hand each on as (topic bytes, packet id, payload bytes), as ``MqttIngest`` does."""
    wire = b"".join(publish(t.encode(), payload, mid=i % 65535 + 1) for i, (t, payload) in enumerate(messages))
    got: list[int] = []
    client = _IngestClient(CallbackAPIVersion.VERSION2, client_id="bench-read", protocol=mqtt.MQTTv311,
                           manual_ack=True)
    def on_message(c: Any, userdata: Any, m: mqtt.MQTTMessage) -> None:  # what paho hands on, as MqttIngest takes it
        topic = m._topic if isinstance(m._topic, bytes) else m.topic.encode()
        got.append(len(topic) + len(bytes(m.payload)) + m.mid)

    client.on_message = on_message  # with the fast read too: for the packets it leaves to paho
    if fast:
        client.publish_fast = lambda t, mid, payload: got.append(mid)
    rsock, wsock = socket.socketpair()
    client._sock = rsock
    sender = threading.Thread(target=wsock.sendall, args=(wire,), daemon=True)
    sender.start()
    t0 = time.thread_time()
    while len(got) < len(messages):
        if client.loop_read() != MQTTErrorCode.MQTT_ERR_SUCCESS:
            raise RuntimeError("bench: the MQTT read failed")
    cost = (time.thread_time() - t0) / len(messages) * 1e6
    sender.join(10)
    rsock.close()
    wsock.close()
    if fast and client.fast_publishes < len(messages) // 2:
        raise RuntimeError(f"bench: the fast read took only {client.fast_publishes} of {len(messages)} packets")
    return cost


def ingest(broker: Mosquitto, data: Path, devices: list[tuple[str, Ed25519PrivateKey]],
           messages: list[tuple[str, bytes]], path: Path, per: int, timeout: float, validators: int,
           processes: int) -> tuple[float, dict[str, Any]]:
    """Seconds from the first publish until every summary is committed, and the ingest counters."""
    settings, store = _server(data, broker.url, devices)
    service = IngestService(settings, store, validator_threads=validators, validator_processes=processes)
    source = mqtt_source(settings, service)
    if not service.start(10):
        raise RuntimeError(f"ingest did not subscribe: {source.last_error}")
    total = len(messages) * per
    pub = _publisher(broker, path, "bench-ingest-pub")
    workers = service.worker_pids()
    cpu0 = time.process_time(), sum(_proc_cpu(w) for w in workers)
    t0 = _go(pub)
    try:
        deadline = time.monotonic() + timeout
        while service.counters.snapshot()["stored"] < total:
            if time.monotonic() > deadline:
                raise RuntimeError(f"ingest: {service.counters.snapshot()} within {timeout} s")
            time.sleep(0.002)
        elapsed = time.perf_counter() - t0
        cpu1 = time.process_time(), sum(_proc_cpu(w) for w in workers)
    finally:
        _reap(pub)
        service.stop(10)
        _end_session(broker, source.client_id)
    counters = {**service.counters.snapshot(), "mqtt": source.counters(),
                "cpu_main_us": (cpu1[0] - cpu0[0]) / total * 1e6,
                "cpu_validators_us": (cpu1[1] - cpu0[1]) / total * 1e6}
    row = store.one("SELECT COUNT(*) FROM summaries")
    if row is None or row[0] != total:
        raise RuntimeError(f"stored {row[0] if row else 0} of {total}")
    store.close()
    return elapsed, counters


def _proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process, from /proc (0.0 where that cannot be read)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


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
    p.add_argument("--scenarios", default="1x10000,50x400",
                   help="comma-separated SUMMARIES_PER_MESSAGE x MESSAGES (default: 1x10000,50x400)")
    p.add_argument("--repeat", type=int, default=3, help="repetitions of (a) then (b) per scenario; medians")
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
    p.add_argument("--breakdown", action="store_true",
                   help="also time each validation step alone, in-process (µs per 1-summary message)")
    p.add_argument("--std-json", action="store_true",
                   help="hide orjson (also from the validator processes) to measure the std-lib json path")
    a = p.parse_args(argv)
    if a.publish:
        return publish_main(a.host, a.port, a.publish, a.name)
    if a.std_json and not os.environ.get(_STD_JSON_MARK):
        return _without_orjson()
    command = " ".join([".venv/bin/python bench/ingest.py", *(sys.argv[1:] if argv is None else argv)])
    scenarios = [_scenario(x) for x in a.scenarios.split(",") if x]
    folder = Path(tempfile.mkdtemp(prefix="edgefleet-bench-ingest-"))
    rows: list[str] = []
    notes: list[str] = []
    load_before = os.getloadavg()
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
                raws, ings, ratios, cpus = [], [], [], []
                for r in range(max(1, a.repeat)):
                    raw_msgs = n / raw(broker, messages, path, a.timeout)
                    ing_s, counters = ingest(broker, folder / f"server-{k}-{r}", devices, messages, path, per,
                                             a.timeout, a.validators, a.processes)
                    ing_msgs = n / ing_s
                    raws.append(raw_msgs)
                    ings.append(ing_msgs)
                    ratios.append(ing_msgs / raw_msgs)
                    cpus.append((counters["cpu_main_us"], counters["cpu_validators_us"]))
                    print(f"  run {r + 1}: (a) {raw_msgs * per:,.0f} summaries/s, (b) {ing_msgs * per:,.0f} "
                          f"summaries/s, ratio {ing_msgs / raw_msgs:.2f}; server CPU per summary: "
                          f"{counters['cpu_main_us']:.0f} µs ingest process + {counters['cpu_validators_us']:.0f}"
                          f" µs validators; {counters['batches']} transactions; load {os.getloadavg()[0]:.1f}",
                          flush=True)
                raw_m, ing_m = statistics.median(raws), statistics.median(ings)
                label = f"{per} ({size / 1024:.1f} KB)"
                rows.append(f"| {label} | (a) raw: paho -> Mosquitto QoS 1 -> paho | {raw_m:,.0f} | "
                            f"{raw_m * per:,.0f} | |")
                rows.append(f"| {label} | (b) ingest: validated, signature checked, committed, acked | "
                            f"{ing_m:,.0f} | **{ing_m * per:,.0f}** | **{statistics.median(ratios):.2f}** "
                            f"({min(ratios):.2f}-{max(ratios):.2f}) |")
                notes.append(f"{per} per message: server CPU per summary (median) "
                             f"{statistics.median(c[0] for c in cpus):.0f} µs in the ingest process (MQTT, "
                             f"writer) + {statistics.median(c[1] for c in cpus):.0f} µs in the validator processes")
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
              f"{a.features} features x {a.bins} bins from {a.devices} devices; median of {a.repeat} runs; "
              f"load average {load_before[0]:.1f} before, {os.getloadavg()[0]:.1f} after)")
        print()
        print("| summaries per message | path | messages/s | summaries/s | ratio (b)/(a), median (range) |")
        print("|---|---|---:|---:|---:|")
        print("\n".join(rows))
        print()
        print("\n".join(notes))
        if a.breakdown:
            print()
            print("| step (1 summary per message, in-process, best of 5) | µs per message |")
            print("|---|---:|")
            for name, us in breakdown(folder, devices, 2000, a.features, a.bins):
                print(f"| {name} | {us:.0f} |")
        return 0
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
