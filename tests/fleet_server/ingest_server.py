"""Run only the server's ingest (MQTT subscriber, validators, writer) as its own process, for crash tests.

    python -m tests.fleet_server.ingest_server --data DIR --broker mqtt://127.0.0.1:PORT --fleet FLEET

Prints ``{"ready": true, "workers": [validator process PIDs]}`` once subscribed. SIGTERM stops it
gracefully (flush, acknowledge, disconnect) and prints the ingest counters as one JSON line; SIGKILL is what
the crash test sends instead.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from pathlib import Path

from fleet_server.ingest import IngestService
from fleet_server.mqtt_ingest import mqtt_source
from fleet_server.settings import ServerSettings
from fleet_server.store import Store


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--broker", required=True)
    p.add_argument("--fleet", required=True)
    p.add_argument("--rate", type=int, default=1_000_000)
    p.add_argument("--processes", type=int, default=2, help="validator processes (0: a validator thread)")
    a = p.parse_args(argv)
    settings = ServerSettings(data_dir=a.data, broker=a.broker, fleet=a.fleet, device_rate_per_minute=a.rate)
    store = Store(settings.db_path)
    service = IngestService(settings, store, validator_processes=a.processes)
    source = mqtt_source(settings, service, backoff_initial=0.05, backoff_max=0.5)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    if not service.start(timeout=10):
        print(f"not subscribed: {source.last_error}", flush=True)
        return 1
    print(json.dumps({"ready": True, "workers": service.worker_pids()}), flush=True)
    stop.wait()
    clean = service.stop(timeout=10)
    print(json.dumps({"clean": clean, **service.counters.snapshot(), "mqtt": source.counters()}), flush=True)
    return 0 if clean else 1


if __name__ == "__main__":
    sys.exit(main())
