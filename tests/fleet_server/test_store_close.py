"""``Store.close`` closes every thread's connection, so the WAL is checkpointed into the database file and a
cleanly stopped server leaves one self-contained file (what an operator backs up)."""

from __future__ import annotations

import sqlite3
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from fleet_server.store import Store
from tests.brokers import Mosquitto
from tests.hardening.server_proc import ServerProcess


def _write(store: Store, i: int) -> None:
    with store.write() as c:
        c.execute("INSERT INTO events (at, kind, subject, detail) VALUES (0, 'test', ?, '')", (str(i),))


def test_close_closes_the_connections_of_threads_that_are_still_alive(tmp_path: Path) -> None:
    store = Store(tmp_path / "fleet.sqlite")
    with ThreadPoolExecutor(4) as pool:  # like the server's thread pool: its threads outlive each request
        list(pool.map(lambda i: _write(store, i), range(40)))
        assert (tmp_path / "fleet.sqlite-wal").exists()
        store.close()
        # The pool's threads are alive and kept their connections until now; all are closed, the WAL is gone.
        assert not (tmp_path / "fleet.sqlite-wal").exists()
        assert not (tmp_path / "fleet.sqlite-shm").exists()
        # A thread using the store after close gets a fresh connection, and nothing written was lost.
        pool.submit(_write, store, 40).result()
    assert store.one("SELECT COUNT(*) FROM events WHERE kind = 'test'")[0] == 41  # type: ignore[index]
    store.close()
    con = sqlite3.connect(tmp_path / "fleet.sqlite")  # the file alone holds every row
    assert con.execute("SELECT COUNT(*) FROM events WHERE kind = 'test'").fetchone()[0] == 41
    con.close()


def test_a_server_stopped_with_sigterm_leaves_one_self_contained_database(tmp_path: Path, built: Any) -> None:
    """``serve`` checkpoints the WAL into the database file when it stops. Another process keeps a connection
    open meanwhile (as a backup or a CLI command might), so the -wal file stays and closing the connections
    alone would leave the rows in it: only the checkpoint leaves it empty."""
    broker = Mosquitto(tmp_path / "mosquitto").start()
    server = ServerProcess.create(tmp_path, broker, built).start()
    other = None
    try:
        with server.client("operator") as c:
            for i in range(5):  # writes from the server's request threads
                r = c.post("/api/v1/enrollment-tokens", json={"tags": {"n": str(i)}})
                assert r.status_code == 200, r.text
            assert c.get("/api/v1/devices").status_code == 200
        wal = server.data / "fleet.sqlite-wal"
        assert wal.exists() and wal.stat().st_size > 0
        other = sqlite3.connect(server.data / "fleet.sqlite")
        assert other.execute("SELECT COUNT(*) FROM enrollment_tokens").fetchone()[0] == 5  # no transaction left open
        proc = server.proc
        assert proc is not None
        server.stop()
        assert proc.returncode == 0, server.log.read_text()[-2000:]
        assert wal.exists() and wal.stat().st_size == 0, server.log.read_text()[-2000:]
        other.close()
        con = sqlite3.connect(f"file:{server.data / 'fleet.sqlite'}?mode=ro&immutable=1", uri=True)
        assert con.execute("SELECT COUNT(*) FROM enrollment_tokens").fetchone()[0] == 5  # the file alone
        con.close()
    finally:
        if other is not None:
            other.close()
        server.stop()
        broker.close()
