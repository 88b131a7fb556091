"""End-to-end fixtures: a real Mosquitto, a real fleet server process, a fleet of real agents (simulator)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.brokers import Mosquitto, free_port
from tests.support import cli

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Server:
    data: Path
    port: int
    broker: Mosquitto
    token: str
    log: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
        with open(self.log, "ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fleet_server.cli", "serve", "--data", str(self.data), "--broker",
                 self.broker.url, "--http", f"127.0.0.1:{self.port}", "--drift-interval", "1"],
                stdout=fh, stderr=fh, env=env)
        end = time.monotonic() + 60
        while time.monotonic() < end:
            try:
                if httpx.get(f"{self.url}/healthz", timeout=1).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.2)
        raise AssertionError(f"fleet server did not start:\n{self.log.read_text()[-3000:]}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def api(self) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=30, headers={"Authorization": f"Bearer {self.token}"})


@pytest.fixture()
def broker(tmp_path: Path) -> Iterator[Mosquitto]:
    b = Mosquitto(tmp_path / "mosquitto", persistence=True).start()
    try:
        yield b
    finally:
        b.close()


@pytest.fixture()
def make_server(tmp_path: Path, broker: Mosquitto, built: Any) -> Iterator[Any]:
    servers: list[Server] = []

    def make(packages: list[Path], oncall: str) -> Server:
        data = tmp_path / "server"
        cli(["init", "--data", str(data), "--root-key", str(built.keys / "root.pub")])
        for p in packages:
            cli(["models", "publish", str(p), "--data", str(data), "--owner", "clinical-ml", "--oncall", oncall])
        token = cli(["tokens", "create", "--data", str(data), "--role", "operator"]).strip()
        s = Server(data, free_port(), broker, token, tmp_path / "server.log").start()
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()
