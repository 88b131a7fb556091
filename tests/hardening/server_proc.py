"""A real fleet server for the attack tests: `fleet-server serve` as its own process on a free loopback port,
ingesting from a real Mosquitto, with the session's signed package published, devices ``dev-a`` and ``dev-b``
enrolled with real keys, and viewer / operator / admin tokens. Stopped by its PID (SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from edgefleet_contracts.signing import Ed25519PrivateKey, generate_key, save_public_key
from tests.brokers import Mosquitto, free_port
from tests.support import cli, wait_until

ROOT = Path(__file__).resolve().parents[2]
FLEET = "hardening"


@dataclass
class ServerProcess:
    data: Path
    broker: Mosquitto
    log: Path
    port: int = field(default_factory=free_port)
    keys: dict[str, Ed25519PrivateKey] = field(default_factory=dict)
    tokens: dict[str, str] = field(default_factory=dict)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def create(cls, folder: Path, broker: Mosquitto, built: Any) -> ServerProcess:
        s = cls(folder / "server", broker, folder / "server.log")
        cli(["init", "--data", str(s.data), "--root-key", str(built.keys / "root.pub"), "--fleet", FLEET])
        cli(["models", "publish", str(built.package), "--data", str(s.data), "--owner", "clinical-ml",
             "--oncall", "http://127.0.0.1:9/x"])
        for dev in ("dev-a", "dev-b"):
            key = generate_key()
            pub = folder / f"{dev}.pub"
            save_public_key(key.public_key(), pub)
            cli(["devices", "enroll", "--data", str(s.data), "--device-id", dev, "--public-key", str(pub)])
            s.keys[dev] = key
        for role in ("viewer", "operator", "admin"):
            s.tokens[role] = cli(["tokens", "create", "--data", str(s.data), "--role", role]).strip()
        return s

    def start(self) -> ServerProcess:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fleet_server.cli", "serve", "--data", str(self.data), "--broker",
                 self.broker.url, "--http", f"127.0.0.1:{self.port}", "--drift-interval", "3600"],
                stdout=fh, stderr=fh, env=env, start_new_session=True)
        ok = wait_until(self._healthy, 60, 0.2)
        assert ok, f"fleet server did not start:\n{self.log.read_text()[-3000:]}"
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None and self.proc.poll() is None, self.log.read_text()[-3000:]
        try:
            return httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self._healthy()

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)

    # ---- reading what the server did ----------------------------------------------------------------------
    def client(self, role: str | None = None, **kw: Any) -> httpx.Client:
        headers = {"Authorization": f"Bearer {self.tokens[role]}"} if role else {}
        return httpx.Client(base_url=self.url, timeout=30, headers=headers, **kw)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        return 0.0

    def rejected(self, reason: str) -> float:
        return self.metric(f'edgefleet_ingest_rejected_total{{reason="{reason}"}}')

    def quarantine(self) -> list[dict[str, Any]]:
        with self.client("viewer") as c:
            r = c.get("/api/v1/quarantine", params={"limit": 1000})
        assert r.status_code == 200, r.text
        return list(r.json())

    def db(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        con = sqlite3.connect(f"file:{self.data / 'fleet.sqlite'}?mode=ro", uri=True, timeout=10)
        try:
            return con.execute(sql, args).fetchall()
        finally:
            con.close()

    def seqs(self, device: str) -> list[int]:
        return [int(r[0]) for r in self.db("SELECT seq FROM summaries WHERE device_id = ? ORDER BY seq", (device,))]

    def body(self, device: str, seq: int) -> dict[str, Any]:
        rows = self.db("SELECT body FROM summaries WHERE device_id = ? AND seq = ?", (device, seq))
        assert len(rows) == 1
        return dict(json.loads(rows[0][0]))
