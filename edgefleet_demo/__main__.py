"""`make demo`: package models, run a fleet server and a simulated fleet of real agents, roll out, catch a bad
version, detect drift, page the owner. Loopback only; about three minutes by default.

    python -m edgefleet_demo [--devices 30] [--seed 0] [--out demo-out] [--keep-running]
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from rich.console import Console
from rich.table import Table


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _slow_model(model: Path, out: Path) -> Path:
    """Version 2: the same predictions with orders of magnitude more compute per call — fine on a workstation
    benchmark of one request, far too slow under a device's real traffic."""
    from model_packager.examples import slowed_model

    out.write_bytes(slowed_model(model, layers=300))
    return out


class Demo:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.out = Path(args.out).resolve()
        self.console = Console(width=None if Console().is_terminal else 120)
        self.server: subprocess.Popen[str] | None = None
        self.fleet: Any = None
        self.receiver: Any = None
        self.pages: list[str] = []

    def say(self, step: str, text: str) -> None:
        self.console.print(f"[bold cyan]{step}[/] {text}")

    # ---- 1. packages -------------------------------------------------------------------------------------
    def packages(self) -> dict[str, Path]:
        from model_packager.build import BuildRequest, build_package
        from model_packager.examples import write_examples
        from model_packager.keys import init_keys

        ex = write_examples(self.out / "examples", seed=self.args.seed)
        # The reference profile comes from the training and calibration splits (455 rows): drift tests need a
        # reference of several hundred rows to tell a real shift from the noise of a small sample.
        ref = self.out / "examples" / "clinical" / "reference.csv"
        lines = (self.out / "examples" / "clinical" / "train.csv").read_text().splitlines()
        lines += (self.out / "examples" / "clinical" / "calibration.csv").read_text().splitlines()[1:]
        ref.write_text("\n".join(lines) + "\n")
        init_keys(self.out / "keys")
        v2_model = _slow_model(ex["clinical_model"], self.out / "examples" / "clinical-v2.onnx")
        pk = {}
        for version, model in (("1.0.0", ex["clinical_model"]), ("2.0.0", v2_model)):
            pk[version] = self.out / "packages" / f"clinical-{version}.efpkg"
            r = build_package(BuildRequest(model=model, name="clinical", version=version, target="x86_64-avx2",
                                           calibration=ref, holdout=ex["clinical_holdout"],
                                           keys=self.out / "keys", out=pk[version], quantize="none",
                                           owner="clinical-ml", latency_runs=100))
            ch = r.report["chosen"]
            self.say("1.", f"packaged clinical {version}: accuracy {ch['accuracy']:.3f}, "
                     f"p50 {ch['p50_ms'] * 1000:.0f} µs on this host, signed by the demo signing key")
        self.examples = ex
        return pk

    # ---- 2. server -----------------------------------------------------------------------------------------
    def start_server(self, packages: dict[str, Path]) -> None:
        from fleet_server.cli import main as fleet_cli
        from fleet_server.simulator import Receiver

        data = self.out / "server"
        self.receiver = Receiver(on_message=self._page)
        quiet = ["--data", str(data)]
        _run_quiet(fleet_cli, ["init", *quiet, "--root-key", str(self.out / "keys" / "root.pub")])
        for v in ("1.0.0", "2.0.0"):
            _run_quiet(fleet_cli, ["models", "publish", str(packages[v]), *quiet, "--owner", "clinical-ml",
                                   "--oncall", self.receiver.url, "--retrain-every", "30d"])
        self.token = _capture(fleet_cli, ["tokens", "create", *quiet, "--role", "operator"]).strip()
        self.http_port, self.mqtt_port = _free_port(), _free_port()
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self._log = open(self.out / "server.log", "w")  # noqa: SIM115 - closed in shutdown()
        self.server = subprocess.Popen(
            [sys.executable, "-m", "fleet_server.cli", "serve", *quiet, "--http", f"127.0.0.1:{self.http_port}",
             "--mqtt-port", str(self.mqtt_port), "--drift-interval", "2"],
            stdout=subprocess.DEVNULL, stderr=self._log, env=env, text=True)
        self.api = httpx.Client(base_url=f"http://127.0.0.1:{self.http_port}", timeout=30,
                                headers={"Authorization": f"Bearer {self.token}"})
        if not _wait(lambda: _ok(self.api, "/healthz"), 60):
            raise SystemExit(f"fleet server did not start; see {self.out / 'server.log'}")
        self.say("2.", f"fleet server up: HTTP http://127.0.0.1:{self.http_port}, embedded MQTT broker on "
                 f"127.0.0.1:{self.mqtt_port}, SQLite in {data}; models published with owner clinical-ml")

    def _page(self, doc: dict[str, Any]) -> None:
        kind = doc.get("kind") or doc.get("alert", {}).get("kind", "?")
        summary = doc.get("summary") or doc.get("alert", {}).get("summary") or str(doc)[:160]
        self.pages.append(f"{kind}: {summary}")
        self.console.print(f"    [bold red]PAGE[/] to clinical-ml on-call: [{kind}] {summary}")

    # ---- 3. fleet -----------------------------------------------------------------------------------------
    def start_fleet(self) -> None:
        from fleet_server.simulator import Fleet, SimConfig

        cfg = SimConfig(root=self.out / "devices", server_url=f"http://127.0.0.1:{self.http_port}",
                        broker_url=f"mqtt://127.0.0.1:{self.mqtt_port}", operator_token=self.token,
                        root_pub=self.out / "keys" / "root.pub", fleet_pub=self.out / "server" / "keys" / "fleet.pub",
                        devices=self.args.devices, window_count=40, min_window_samples=10)
        self.fleet = Fleet(cfg)
        self.fleet.provision()
        self.fleet.start()
        self.say("3.", f"provisioned {len(self.fleet.devices)} devices with the real agent (own folder, keys, slots, "
                 "outbox, MQTT link) across sites north/south/east on rpi4/rpi5 tags; none has a model yet")

    def rows(self) -> np.ndarray:
        """Every row of the data set: the devices' patients come from the same population as the reference."""
        import csv

        out = []
        for split in ("train", "calibration", "holdout"):
            with open(self.out / "examples" / "clinical" / f"{split}.csv") as fh:
                out += [[float(v) for v in row[:-1]] for row in list(csv.reader(fh))[1:]]
        return np.asarray(out, dtype=np.float32)

    def rollout(self, version: str, stages: str, bake: str) -> str:
        r = self.api.post("/api/v1/rollouts", json={"model": "clinical", "version": version, "stages": stages,
                                                    "bake_seconds": _seconds(bake),
                                                    "thresholds": {"min_predictions": 20}})
        r.raise_for_status()
        return str(r.json()["id"])

    def stream_in_background(self, stop: threading.Event, shift_site: str | None = None) -> threading.Thread:
        from fleet_server.simulator import rows_sampler

        x = self.rows()
        sample = rows_sampler(x, self.args.seed)
        std = x.std(axis=0)

        rng = np.random.default_rng(self.args.seed)

        def rows_for(d: Any, n: int) -> np.ndarray:
            # Resampled rows with 2% jitter, so devices see new patients from the same population.
            rows = np.maximum(sample(d, n) + rng.normal(0, 0.02, size=(n, x.shape[1])) * std, 0).astype(np.float32)
            if shift_site and d.tags["site"] == shift_site:
                rows = rows.copy()
                rows[:, :3] += 1.5 * std[:3]  # the site's sensor calibration drifted on three features
            return rows

        def loop() -> None:
            while not stop.is_set():
                self.fleet.stream(rows_for, 20)
                time.sleep(0.2)

        t = threading.Thread(target=loop, daemon=True)
        t.start()
        return t

    def status(self, rid: str) -> dict[str, Any]:
        return dict(self.api.get(f"/api/v1/rollouts/{rid}").json())

    # ---- the story ------------------------------------------------------------------------------------------
    def run(self) -> int:
        import logging

        quiet = logging.getLogger("edgefleet")
        previous = quiet.level
        quiet.setLevel(logging.ERROR)
        try:
            return self._run()
        finally:
            quiet.setLevel(previous)  # the demo may run inside another program (the tests): leave it as found

    def _run(self) -> int:
        if self.out.exists():
            shutil.rmtree(self.out)
        self.out.mkdir(parents=True)
        t0 = time.monotonic()
        self.console.rule("edgefleet demo")
        try:
            pk = self.packages()
            self.start_server(pk)
            self.start_fleet()
            stop = threading.Event()
            streamer = self.stream_in_background(stop)

            rid = self.rollout("1.0.0", "100", "2s")
            self.say("4.", f"rollout {rid}: clinical 1.0.0 to every device (signed desired state, retained MQTT)")
            ok = self.fleet.wait_until(lambda: all(v == "1.0.0" for v in self.fleet.versions().values()), 120)
            self.say("  ", f"{sum(v == '1.0.0' for v in self.fleet.versions().values())}/{len(self.fleet.devices)} "
                     f"devices verified, smoke-tested and activated 1.0.0" + ("" if ok else " (timed out)"))
            self.fleet.wait_until(lambda: self.status(rid)["state"] == "completed", 60)
            self.say("  ", f"rollout {rid}: {self.status(rid)['state']}; devices now stream holdout data")

            rid2 = self.rollout("2.0.0", "10,50,100", "6s")
            self.say("5.", f"rollout {rid2}: clinical 2.0.0 in stages 10% → 50% → 100%, 6 s bake, gates on error "
                     "rate, p95 latency vs the control group, install failures, estimated accuracy")
            self.fleet.wait_until(lambda: self.status(rid2)["state"] in ("rolled_back", "completed", "aborted"), 150)
            st = self.status(rid2)
            last = st["decisions"][-1]
            self.say("  ", f"rollout {rid2}: [bold]{st['state']}[/] at stage {st['stage']} — {last['detail']}")
            if st["state"] == "rolled_back":
                self.fleet.wait_until(lambda: "2.0.0" not in self.fleet.versions().values(), 60)
            on_v2 = [d for d, v in self.fleet.versions().items() if v == "2.0.0"]
            self.say("  ", f"{st['targeted']} device(s) got 2.0.0; {len(on_v2)} still run it; the rest never saw it")

            stop.set()
            streamer.join(30)
            stop = threading.Event()
            streamer = self.stream_in_background(stop, shift_site="north")
            self.say("6.", "site north's inputs shift (+1.5 SD on three features); the others stay as they were")
            before = len(self.pages)
            self.fleet.wait_until(lambda: any("site=north" in p for p in self.pages[before:]),
                                  self.args.drift_timeout)
            stop.set()
            streamer.join(30)
            self.final_table(time.monotonic() - t0)
            if self.args.keep_running:
                self.console.print(f"server keeps running at http://127.0.0.1:{self.http_port} (Ctrl-C to stop)")
                while True:
                    time.sleep(3600)
        except KeyboardInterrupt:
            pass
        finally:
            self.shutdown()
        return 0

    def final_table(self, elapsed: float) -> None:
        running = [v for v in self.fleet.versions().values() if v != "-"]
        version = max(set(running), key=running.count) if running else "1.0.0"
        drift = self.api.get("/api/v1/drift", params={"model": "clinical", "version": version, "by": "site"}).json()
        t = Table(title=f"fleet after {elapsed:.0f} s")
        for col in ("site", "devices", "versions", f"input drift on {version} (features)"):
            t.add_column(col)
        versions = self.fleet.versions()
        by_site: dict[str, list[str]] = {}
        for d in self.fleet.devices:
            by_site.setdefault(d.tags["site"], []).append(versions[d.device_id])
        cohorts = drift.get("cohorts", {}) if isinstance(drift, dict) else {}
        for site, vs in sorted(by_site.items()):
            c = cohorts.get(site) or {}
            feats = c.get("input_drift", {}).get("drifted_features", [])
            t.add_row(site, str(len(vs)), ", ".join(f"{v}×{vs.count(v)}" for v in sorted(set(vs))),
                      ", ".join(feats) or "none")
        self.console.print(t)
        alerts = self.api.get("/api/v1/alerts").json()
        a = Table(title="alerts")
        for col in ("id", "kind", "scope", "state", "delivery"):
            a.add_column(col)
        for al in alerts if isinstance(alerts, list) else []:
            a.add_row(str(al.get("id")), str(al.get("kind")), str(al.get("evidence", {}).get("scope", "")),
                      str(al.get("state")), str(al.get("delivery", {}).get("state")))
        self.console.print(a)
        self.console.print(f"dashboard: http://127.0.0.1:{self.http_port}/ui/  ·  operator API: "
                           f"http://127.0.0.1:{self.http_port}/docs  (sign in with the token in "
                           f"{self.out / 'operator.token'}; --keep-running keeps them up)")
        (self.out / "operator.token").write_text(self.token + "\n")
        (self.out / "operator.token").chmod(0o600)

    def shutdown(self) -> None:
        if self.fleet is not None:
            self.fleet.stop()
        if self.server is not None:
            self.server.terminate()
            try:
                self.server.wait(20)
            except subprocess.TimeoutExpired:
                self.server.kill()
            self._log.close()
        if self.receiver is not None:
            self.receiver.close()


def _seconds(text: str) -> float:
    from edgefleet_contracts.timeutil import parse_duration

    return parse_duration(text).total_seconds()


def _wait(pred: Any, timeout: float) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.2)
    return False


def _ok(client: httpx.Client, path: str) -> bool:
    try:
        return client.get(path).status_code == 200
    except httpx.HTTPError:
        return False


def _run_quiet(fn: Any, argv: list[str]) -> None:
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        rc = fn(argv)
    if rc != 0:
        raise SystemExit(f"{' '.join(argv[:2])} failed: {buf.getvalue()}")


def _capture(fn: Any, argv: list[str]) -> str:
    import contextlib
    import io

    buf, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(err):
        rc = fn(argv)
    if rc != 0:
        raise SystemExit(f"{' '.join(argv[:2])} failed: {err.getvalue()}")
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m edgefleet_demo", description=__doc__)
    p.add_argument("--devices", type=int, default=30)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="demo-out")
    p.add_argument("--drift-timeout", type=float, default=90.0)
    p.add_argument("--keep-running", action="store_true")
    return Demo(p.parse_args(argv)).run()


if __name__ == "__main__":
    raise SystemExit(main())
