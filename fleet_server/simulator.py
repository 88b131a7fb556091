"""A fleet simulator built from the real agent code: N devices, each with its own folder, keys, slots, outbox and
MQTT link, running in one process (threads), driven with data the caller supplies.

Used by `make demo`, by end-to-end tests and by ``fleet-server simulate`` for load tests. Nothing is mocked:
each simulated device is a provisioned device folder opened by ``device_agent.runner.DeviceRunner`` (without its
HTTP API), so packages are verified and smoke-tested, summaries are windowed, signed, queued and published, and
desired states are accepted or refused exactly as on hardware.

Errors the operator can fix are ConfigError, one line naming the problem and the fix, never a traceback from
httpx or NumPy: :meth:`Fleet.provision` first asks the server who the token is (``GET /api/v1/whoami``), so an
unreachable server, a token it refuses (401) or a token that may not enroll devices (a viewer's: 403) stops it
before any device folder is written; :func:`load_rows` refuses a rows file that is not ``.npz``/``.npy``.

**Delivery.** A run whose devices never reached the server is a failure, not a result: :meth:`Fleet.delivery`
says how many devices' MQTT links ever connected to the broker and whether the server heard from any of them
(``last_seen`` moved during the run: summaries, reports and heartbeats all move it), and :meth:`Delivery.verdict`
turns that into an error (no device connected; or devices connected but the server heard from none: the broker
is not the one the server ingests from) or a warning (some devices never connected). ``fleet-server simulate``
prints its summary line either way, then exits 1 on the error and 0 with the warning on the standard error.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from .errors import ConfigError

log = logging.getLogger("edgefleet.simulator")


@dataclass
class SimConfig:
    root: Path  # where device folders are created
    server_url: str  # fleet server HTTP (enrollment, package downloads)
    broker_url: str
    operator_token: str
    root_pub: Path
    fleet_pub: Path
    devices: int = 30
    sites: tuple[str, ...] = ("north", "south", "east")
    hardware: tuple[str, ...] = ("rpi4", "rpi5")
    target: str = "x86_64-avx2"  # simulated devices run on this host
    fleet: str = "default"
    first_package: Path | None = None
    window_count: int = 50
    window_seconds: float = 3600.0
    min_window_samples: int = 10  # below 10 (the device's privacy floor) needs allow_small_windows as well
    allow_small_windows: bool = False  # written to each device's config.toml (synthetic data only)
    heartbeat_seconds: float = 5.0
    probation_seconds: float = 5.0
    probation_predictions: int = 30
    # Device-side probation limit on p95 latency, new over previous version (the device default is 2.0). Dozens
    # of simulated devices share one interpreter, so their latencies are noisy: tests of identical models widen it.
    probation_latency_ratio: float | None = None
    prefix: str = "dev"
    # How often each device checks whether its report changed (a device does it every second; updates still
    # report at once). The check stats ~20 files (~50 µs) and rebuilds the report only when one changed. The
    # simulator runs the checks of all its devices from one thread instead of one thread per device.
    report_check_seconds: float = 1.0
    outbox_max_rows: int | None = None  # None: the device default
    # onnxruntime intra-op threads of each simulated device (the ``[runtime] threads`` of its target.toml; None:
    # the target's). A real device has the target's cores to itself; here every device shares this host's cores,
    # and with more than one thread each of hundreds of sessions keeps a worker thread that spin-waits after every
    # run (~6x the CPU of one thread at 2 predictions a second), starving the agents' own threads.
    inference_threads: int | None = 1


@dataclass
class SimDevice:
    device_id: str
    tags: dict[str, str]
    directory: Path
    runner: Any = None
    predictions: int = 0
    rejected: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Delivery:
    """What reached where in a run (:meth:`Fleet.delivery`)."""

    devices: int
    connected: int  # devices whose MQTT link connected to the broker at least once
    heard: int  # devices the server heard from during the run (their last_seen moved)
    queued: int  # outbox rows (summaries, reports) still queued on the devices
    broker: str
    server: str
    link_error: str | None = None  # the last error of a device that never connected

    def verdict(self) -> tuple[str | None, str | None]:
        """(error, warning) for the operator: an error when nothing was delivered, a warning when part was."""
        if self.devices and not self.connected:
            why = f": {self.link_error}" if self.link_error else ""
            return (f"nothing was delivered: no simulated device could connect to the broker {self.broker}{why}; "
                    f"{self.queued} message(s) are still queued in the device outboxes. Pass the broker the server "
                    "ingests from as --broker (`fleet-server serve` prints it)"), None
        if self.connected and not self.heard:
            return (f"nothing was delivered: the devices connected to the broker {self.broker}, but the server at "
                    f"{self.server} heard from none of them; --broker must be the broker the server ingests from "
                    "(`fleet-server serve` prints it)"), None
        if self.connected < self.devices:
            why = f" (last error: {self.link_error})" if self.link_error else ""
            return None, (f"{self.devices - self.connected} of {self.devices} simulated devices never connected to "
                          f"the broker {self.broker}{why}; their summaries stayed queued")
        return None, None


class Fleet:
    def __init__(self, cfg: SimConfig) -> None:
        self.cfg = cfg
        self.devices: list[SimDevice] = []
        self._http = httpx.Client(base_url=cfg.server_url, timeout=30,
                                  headers={"Authorization": f"Bearer {cfg.operator_token}"})
        self._stop = threading.Event()
        self._housekeeping: threading.Thread | None = None
        self._seen_before: dict[str, float | None] = {}

    # ---- the server's API ------------------------------------------------------------------------------
    def _api(self, method: str, path: str, **kw: Any) -> Any:
        """One request to the server; its JSON. ConfigError (one line, with the fix) when the server cannot be
        reached, refuses the token (401), does not let it enroll devices (403) or answers another error."""
        url = self.cfg.server_url
        try:
            r = self._http.request(method, path, **kw)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise ConfigError(f"cannot reach the fleet server at {url}: {str(exc) or type(exc).__name__}; is "
                              "`fleet-server serve` running there (check --server)?") from None
        if r.status_code == 401:
            raise ConfigError(f"the fleet server at {url} refused the token ({_detail(r)}); pass an operator token "
                              "(`fleet-server tokens create --data DIR --role operator`) as --token") from None
        if r.status_code == 403:
            raise ConfigError(f"the token may not enroll devices at {url} ({_detail(r)}); pass an operator token "
                              "(`fleet-server tokens create --data DIR --role operator`) as --token") from None
        if r.status_code >= 400:
            raise ConfigError(f"the fleet server at {url} answered {r.status_code} to {method} {path}: "
                              f"{_detail(r)}") from None
        try:
            return r.json()
        except ValueError:
            raise ConfigError(f"{url} answered {method} {path} with something other than JSON; is --server a "
                              "fleet server?") from None

    def check_server(self) -> None:
        """The server answers and the token may enroll devices (operator or admin). ConfigError otherwise."""
        who = self._api("GET", "/api/v1/whoami")
        role = who.get("role") if isinstance(who, dict) else None
        if role not in ("operator", "admin"):
            raise ConfigError(f"the token is a {role} token; enrolling the simulated devices needs an operator "
                              "token (`fleet-server tokens create --data DIR --role operator`) as --token")

    def _last_seen(self) -> dict[str, float | None]:
        """The server's ``last_seen`` of each simulated device (the device list, a page at a time)."""
        ours = {d.device_id for d in self.devices}
        out: dict[str, float | None] = {}
        after: str | None = None
        while True:
            page = self._api("GET", "/api/v1/devices", params={"limit": 10_000, **({"after": after} if after else {})})
            out.update({d["device_id"]: d.get("last_seen") for d in page if d["device_id"] in ours})
            if len(page) < 10_000:
                return out
            after = page[-1]["device_id"]

    # ---- setup ----------------------------------------------------------------------------------------
    def provision(self) -> list[SimDevice]:
        """Provision and enroll every device (its own folder and keys; the first package if configured)."""
        from device_agent.config import DeviceDir
        from device_agent.provision import ProvisionRequest, provision
        from edgefleet_contracts.signing import load_public_key, public_b64

        self.check_server()  # before any folder is written: an unreachable server or a bad token stops here
        c = self.cfg
        for i in range(c.devices):
            dev_id = f"{c.prefix}-{i:04d}"
            tags = {"site": c.sites[i % len(c.sites)], "hw": c.hardware[(i // len(c.sites)) % len(c.hardware)]}
            folder = c.root / dev_id
            provision(ProvisionRequest(directory=folder, device_id=dev_id, target=c.target, root_key=c.root_pub,
                                       fleet_key=c.fleet_pub, fleet=c.fleet, broker=c.broker_url,
                                       server=c.server_url, tags=tags, package=c.first_package, force=True))
            dd = DeviceDir(folder)
            if c.inference_threads is not None:
                _set_target_threads(dd.target_file, c.inference_threads)
            cfg = replace(dd.load_config(), window_count=c.window_count, window_seconds=c.window_seconds,
                          min_window_samples=c.min_window_samples, allow_small_windows=c.allow_small_windows,
                          heartbeat_seconds=c.heartbeat_seconds,
                          probation_seconds=c.probation_seconds, probation_predictions=c.probation_predictions)
            if c.outbox_max_rows is not None:
                cfg = replace(cfg, outbox_max_rows=c.outbox_max_rows)
            if c.probation_latency_ratio is not None:
                cfg = replace(cfg, probation_latency_ratio=c.probation_latency_ratio)
            dd.save_config(cfg)
            pub = public_b64(load_public_key(dd.device_pub))
            self._api("POST", "/api/v1/devices", json={"device_id": dev_id, "public_key": pub, "tags": tags,
                                                        "replace": True})
            self.devices.append(SimDevice(dev_id, tags, folder))
        self._seen_before = self._last_seen()
        return self.devices

    def start(self) -> None:
        from device_agent.runner import DeviceRunner

        for d in self.devices:
            d.runner = DeviceRunner(d.directory, http=False, backoff_initial=0.2, backoff_max=2.0,
                                    report_check_seconds=self.cfg.report_check_seconds, housekeeping=False)
            d.runner.start()
        self._stop.clear()
        self._housekeeping = threading.Thread(target=self._check_reports, name="sim-housekeeping", daemon=True)
        self._housekeeping.start()

    def _check_reports(self) -> None:
        """Every device's periodic report check (``DeviceRunner.check_report``), all from this one thread."""
        while not self._stop.wait(self.cfg.report_check_seconds):
            for d in self.devices:
                runner = d.runner
                if runner is not None and not self._stop.is_set():
                    runner.check_report()

    def stop(self) -> None:
        self._stop.set()
        if self._housekeeping is not None:
            self._housekeeping.join(30)
            self._housekeeping = None
        for d in self.devices:
            if d.runner is not None:
                try:
                    d.runner.stop()
                except Exception:  # noqa: BLE001 - stopping the others matters more
                    log.exception("stopping %s failed", d.device_id)
        self._http.close()

    # ---- traffic -------------------------------------------------------------------------------------
    def stream(self, rows_for: Callable[[SimDevice, int], np.ndarray], n: int, *,
               labels_for: Callable[[SimDevice, int], np.ndarray] | None = None, workers: int = 4) -> int:
        """Feed ``n`` rows to every device (``rows_for(device, n)`` gives them); returns predictions made.
        Devices without a model yet are skipped (counted as rejected); devices switched off (no runner) are
        skipped."""
        from device_agent.errors import AgentError

        def run(d: SimDevice) -> int:
            runner = d.runner
            if runner is None:  # switched off (an offline device in a test): its app makes no predictions
                return 0
            rows = rows_for(d, n)
            labels = labels_for(d, n) if labels_for else None
            agent = runner.agent
            made = 0
            for i, row in enumerate(rows):
                try:
                    p = agent.predict(row)
                    made += 1
                    if labels is not None and labels[i] >= 0:
                        agent.feedback(p.prediction_id, int(labels[i]))
                except AgentError as exc:
                    d.rejected += 1
                    if len(d.errors) < 5:
                        d.errors.append(str(exc))
            d.predictions += made
            return made

        with ThreadPoolExecutor(max_workers=workers) as pool:
            return sum(pool.map(run, self.devices))

    def flush_windows(self) -> None:
        """Close every device's current window now (held back if below k)."""
        for d in self.devices:
            d.runner.agent.close_window(wait=True)

    # ---- observation ----------------------------------------------------------------------------------
    def versions(self) -> dict[str, str]:
        out = {}
        for d in self.devices:
            m = d.runner.agent.model if d.runner else None
            out[d.device_id] = m.version if m else "-"
        return out

    def wait_until(self, predicate: Callable[[], bool], timeout: float, poll: float = 0.5) -> bool:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return True
            time.sleep(poll)
        return predicate()

    def outbox_depth(self) -> int:
        return sum(d.runner.agent.sink.depth() for d in self.devices if d.runner is not None)

    def delivery(self, queued: int, wait: float = 10.0) -> Delivery:
        """What this run delivered (see the module docstring), ``queued`` being the outbox depth at stop. When
        devices connected but the server has not heard from any yet, asks again for up to ``wait`` seconds (its
        ingest commits in batches). ConfigError when the server cannot be asked."""
        links = [d.runner.link for d in self.devices if d.runner is not None and d.runner.link is not None]
        connected = sum(1 for link in links if link.counters()["connects"] > 0)
        errors = [link.last_error for link in links if link.counters()["connects"] == 0 and link.last_error]
        heard = 0
        if connected:
            end = time.monotonic() + wait
            while True:
                now = self._last_seen()
                heard = sum(1 for dev, seen in now.items()
                            if seen is not None and seen != self._seen_before.get(dev))
                if heard or time.monotonic() >= end:
                    break
                time.sleep(0.5)
        return Delivery(devices=len(self.devices), connected=connected, heard=heard, queued=queued,
                        broker=self.cfg.broker_url, server=self.cfg.server_url,
                        link_error=errors[-1] if errors else None)


def _set_target_threads(target_file: Path, threads: int) -> None:
    """Set ``[runtime] threads`` in a device's target.toml (atomically). Raises ValueError when it has none."""
    import re

    from edgefleet_contracts.atomic import atomic_write_text

    text = target_file.read_text()
    head, sep, rest = text.partition("[runtime]")
    new, n = re.subn(r"(?m)^threads\s*=\s*\d+", f"threads = {int(threads)}", rest, count=1)
    if not sep or n != 1:
        raise ValueError(f"{target_file} has no [runtime] threads to set")
    atomic_write_text(target_file, head + sep + new)


def load_rows(path: Path) -> np.ndarray:
    """The rows simulated devices predict on: an ``.npz`` holding them as ``x`` or an ``.npy`` array, 2-D, numeric,
    at least one row; as float32. ConfigError naming the file and what to do otherwise (a CSV: save its feature
    columns with ``numpy.savez``). Never unpickles (``allow_pickle=False``)."""
    path = Path(path)
    fix = f"save the feature columns with numpy.savez({path.with_suffix('.npz').name!r}, x=rows)"
    if path.suffix not in (".npz", ".npy"):
        raise ConfigError(f"rows file {path} must be .npz (holding the rows as x) or .npy; for a CSV, {fix}")
    try:
        loaded = np.load(path, allow_pickle=False)
        if isinstance(loaded, np.lib.npyio.NpzFile):
            with loaded:
                if "x" not in loaded.files:
                    held = ", ".join(loaded.files) or "nothing"
                    raise ConfigError(f"rows file {path} holds no array x (it holds {held}); {fix}")
                loaded = loaded["x"]
        x = np.asarray(loaded, dtype=np.float32)
    except OSError as exc:
        raise ConfigError(f"cannot read rows file {path}: {exc.strerror or exc}") from None
    except (ValueError, TypeError, EOFError) as exc:  # not NumPy's format, pickled objects, not numbers
        raise ConfigError(f"rows file {path} is not a NumPy array of numbers ({exc}); {fix}") from None
    if x.ndim != 2 or not len(x):
        raise ConfigError(f"rows file {path} must hold a 2-D array with at least one row (rows x features), not "
                          f"shape {x.shape}")
    return x


def _detail(r: httpx.Response) -> str:
    """The server's error detail (its JSON ``detail``), else the start of the body."""
    try:
        doc = r.json()
    except ValueError:
        return f"{r.status_code}: {r.text[:200]}"
    detail = doc.get("detail") if isinstance(doc, dict) else None
    return f"{r.status_code}: {detail if detail is not None else r.text[:200]}"


def rows_sampler(x: np.ndarray, seed: int = 0) -> Callable[[SimDevice, int], np.ndarray]:
    """Rows drawn with replacement from ``x``; each device has its own reproducible random stream."""
    import zlib

    rngs: dict[str, np.random.Generator] = {}

    def f(d: SimDevice, n: int) -> np.ndarray:
        rng = rngs.get(d.device_id)
        if rng is None:
            rng = rngs[d.device_id] = np.random.default_rng([seed, zlib.crc32(d.device_id.encode())])
        return np.asarray(x[rng.integers(0, len(x), size=n)], dtype=np.float32)

    return f


@dataclass
class Receiver:
    """A local HTTP receiver standing in for the owner's on-call route (prints and keeps what it gets)."""

    received: list[dict[str, Any]] = field(default_factory=list)
    port: int = 0
    on_message: Callable[[dict[str, Any]], None] | None = None

    def __post_init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                try:
                    doc = json.loads(body)
                except ValueError:
                    doc = {"raw": body.decode(errors="replace")}
                outer.received.append(doc)
                if outer.on_message:
                    outer.on_message(doc)
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                return

        self._server = ThreadingHTTPServer(("127.0.0.1", self.port), Handler)
        self.port = int(self._server.server_address[1])
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/oncall"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()


def iter_alerts(received: list[dict[str, Any]], kind: str | None = None) -> Iterator[dict[str, Any]]:
    for doc in received:
        if kind is None or doc.get("kind") == kind or doc.get("alert", {}).get("kind") == kind:
            yield doc
