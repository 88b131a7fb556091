"""`fleet-server simulate`: a bounded load run of simulated devices against a running server."""

from __future__ import annotations

import sqlite3

from fleet_server.cli import main as fleet_cli
from fleet_server.simulator import Receiver


def test_simulate_runs_devices_whose_summaries_reach_the_server(built, tmp_path, make_server, capsys):
    receiver = Receiver()
    server = make_server([built.package], receiver.url)
    try:
        rc = fleet_cli(["simulate", "--server", server.url, "--broker", server.broker.url, "--token", server.token,
                        "--root-key", str(built.keys / "root.pub"), "--fleet-key",
                        str(server.data / "keys" / "fleet.pub"), "--rows", str(built.holdout), "--dir",
                        str(tmp_path / "sim"), "--devices", "4", "--package", str(built.package), "--duration", "3"])
        assert rc == 0
        out = capsys.readouterr().out
        assert out.startswith("4 devices, ")
        db = sqlite3.connect(server.data / "fleet.sqlite")
        import time

        end = time.monotonic() + 30
        while time.monotonic() < end:
            n = db.execute("SELECT COUNT(DISTINCT device_id) FROM summaries").fetchone()[0]
            if n == 4:
                break
            time.sleep(0.5)
        assert n == 4
    finally:
        receiver.close()
