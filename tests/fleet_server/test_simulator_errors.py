"""`fleet-server simulate` when something is wrong: one line naming the problem and the fix, exit status 1, never
a traceback; a server it cannot reach, a token it may not use or a rows file it cannot read stops it before any
device folder is made; a run that delivered nothing (no device reached the broker, or the broker is not the one the
server ingests from) exits 1 saying so instead of "succeeding" with every summary stuck in the outboxes. A real
fleet server process, real Mosquitto brokers, real agents (fleet_server/simulator.py)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fleet_server.errors import ConfigError
from tests.brokers import Mosquitto, free_port
from tests.e2e.conftest import broker, make_server  # noqa: F401 - the fixtures: a served data folder, its broker
from tests.fleet_server.conftest import run_cli
from tests.support import cli


def simulate(built: Any, sim: Path, *, server: str, broker: str, token: str, fleet_pub: Path,  # noqa: F811
             rows: Path | None = None, duration: float = 2) -> tuple[int, str, str]:
    return run_cli(["simulate", "--server", server, "--broker", broker, "--token", token, "--root-key",
                    str(built.keys / "root.pub"), "--fleet-key", str(fleet_pub), "--rows", str(rows or built.holdout),
                    "--dir", str(sim), "--devices", "2", "--package", str(built.package), "--duration",
                    str(duration)])


def one_line_error(rc: int, err: str) -> str:
    """The error's text, after checking it is the CLI's one line with exit status 1."""
    assert rc == 1 and err.startswith("fleet-server: error: ") and err.count("\n") == 1, (rc, err)
    assert "Traceback" not in err
    return err.removeprefix("fleet-server: error: ").rstrip("\n")


# ---- before anything runs ---------------------------------------------------------------------------------------
def _csv(folder: Path) -> Path:
    (folder / "rows.csv").write_text("a,b\n1,2\n")
    return folder / "rows.csv"


def _npz_without_x(folder: Path) -> Path:
    np.savez(folder / "rows.npz", features=np.zeros((3, 2)))
    return folder / "rows.npz"


def _pickled(folder: Path) -> Path:
    np.save(folder / "rows.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    return folder / "rows.npy"


def _one_d(folder: Path) -> Path:
    np.save(folder / "rows.npy", np.zeros(5))
    return folder / "rows.npy"


ROWS: list[tuple[Callable[[Path], Path], str]] = [
    (_csv, "rows file {path} must be .npz (holding the rows as x) or .npy; for a CSV, save the feature columns with "
           "numpy.savez('rows.npz', x=rows)"),
    (_npz_without_x, "rows file {path} holds no array x (it holds features); save the feature columns with "
                     "numpy.savez('rows.npz', x=rows)"),
    (_pickled, "rows file {path} is not a NumPy array of numbers ("),
    (_one_d, "rows file {path} must hold a 2-D array with at least one row (rows x features), not shape (5,)"),
    (lambda folder: folder / "missing.npz", "cannot read rows file {path}: No such file or directory"),
]


@pytest.mark.parametrize(("make", "says"), ROWS, ids=["csv", "npz-without-x", "pickled", "1-d", "missing"])
def test_a_rows_file_that_is_not_rows_in_npz_or_npy_is_one_line_before_anything_runs(
        built: Any, tmp_path: Path, make: Callable[[Path], Path], says: str) -> None:
    rows = make(tmp_path)
    rc, out, err = simulate(built, tmp_path / "sim", server=f"http://127.0.0.1:{free_port()}", broker="mqtt://x:1",
                            token="t", fleet_pub=built.keys / "root.pub", rows=rows)

    assert out == "" and one_line_error(rc, err).startswith(says.format(path=rows))
    assert not (tmp_path / "sim").exists()


def test_rows_load_from_npz_x_and_from_npy_as_float32(tmp_path: Path) -> None:
    from fleet_server.simulator import load_rows

    x = np.arange(6, dtype=np.float64).reshape(3, 2)
    np.savez(tmp_path / "a.npz", x=x)
    np.save(tmp_path / "b.npy", x)
    for name in ("a.npz", "b.npy"):
        got = load_rows(tmp_path / name)
        assert got.dtype == np.float32 and np.array_equal(got, x)
    with pytest.raises(ConfigError, match="must hold a 2-D array with at least one row"):
        np.save(tmp_path / "c.npy", np.zeros((0, 2)))
        load_rows(tmp_path / "c.npy")


def test_a_server_that_cannot_be_reached_is_one_line_and_no_device_is_made(built: Any, tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there

    rc, out, err = simulate(built, tmp_path / "sim", server=url, broker="mqtt://127.0.0.1:1", token="t",
                            fleet_pub=built.keys / "root.pub")

    says = one_line_error(rc, err)
    assert out == "" and says.startswith(f"cannot reach the fleet server at {url}: ")
    assert says.endswith("; is `fleet-server serve` running there (check --server)?")
    assert not (tmp_path / "sim").exists()


# ---- against a running server -----------------------------------------------------------------------------------
@pytest.fixture()
def server(built: Any, make_server: Any) -> Any:  # noqa: F811
    return make_server([built.package], "http://127.0.0.1:9/x")


def test_a_token_the_server_refuses_or_a_viewer_token_is_one_line_and_no_device_is_made(
        built: Any, tmp_path: Path, server: Any) -> None:
    viewer = cli(["tokens", "create", "--data", str(server.data), "--role", "viewer"]).strip()
    fleet_pub = server.data / "keys" / "fleet.pub"

    rc, out, err = simulate(built, tmp_path / "sim", server=server.url, broker=server.broker.url, token="nope",
                            fleet_pub=fleet_pub)
    assert out == "" and one_line_error(rc, err) == (
        f"the fleet server at {server.url} refused the token (401: unknown token); pass an operator token "
        "(`fleet-server tokens create --data DIR --role operator`) as --token")
    rc, out, err = simulate(built, tmp_path / "sim", server=server.url, broker=server.broker.url, token=viewer,
                            fleet_pub=fleet_pub)
    assert out == "" and one_line_error(rc, err) == (
        "the token is a viewer token; enrolling the simulated devices needs an operator token "
        "(`fleet-server tokens create --data DIR --role operator`) as --token")

    assert not (tmp_path / "sim").exists()
    assert server.api().get("/api/v1/devices").json() == []  # nothing enrolled


def test_a_broker_nobody_listens_on_delivers_nothing_and_exits_1_saying_so(
        built: Any, tmp_path: Path, server: Any) -> None:
    wrong = f"mqtt://127.0.0.1:{free_port()}"

    rc, out, err = simulate(built, tmp_path / "sim", server=server.url, broker=wrong, token=server.token,
                            fleet_pub=server.data / "keys" / "fleet.pub")

    assert out.startswith("2 devices, ") and "outbox depth at stop" in out  # the run's figures, as always
    says = one_line_error(rc, err)
    assert says.startswith(f"nothing was delivered: no simulated device could connect to the broker {wrong}: "
                           f"cannot connect to {wrong}: ")
    assert "message(s) are still queued in the device outboxes. Pass the broker the server ingests from as " \
           "--broker (`fleet-server serve` prints it)" in says


def test_a_broker_the_server_does_not_ingest_from_delivers_nothing_and_exits_1_saying_so(
        built: Any, tmp_path: Path, server: Any) -> None:
    with Mosquitto(tmp_path / "other") as other:  # a broker that works, but not the server's
        rc, out, err = simulate(built, tmp_path / "sim", server=server.url, broker=other.url, token=server.token,
                                fleet_pub=server.data / "keys" / "fleet.pub")

    assert out.startswith("2 devices, ")
    assert one_line_error(rc, err) == (
        f"nothing was delivered: the devices connected to the broker {other.url}, but the server at {server.url} "
        "heard from none of them; --broker must be the broker the server ingests from (`fleet-server serve` "
        "prints it)")


# ---- the verdict ------------------------------------------------------------------------------------------------
def test_the_delivery_verdict_is_an_error_only_when_nothing_was_delivered() -> None:
    from fleet_server.simulator import Delivery

    def verdict(connected: int, heard: int, error: str | None = "refused") -> tuple[str | None, str | None]:
        return Delivery(devices=4, connected=connected, heard=heard, queued=9, broker="mqtt://b:1",
                        server="http://s", link_error=error).verdict()

    assert verdict(4, 4) == (None, None)
    assert verdict(4, 1) == (None, None)  # the server heard from the fleet (the rest may still be in its ingest)
    assert verdict(3, 3) == (None, "1 of 4 simulated devices never connected to the broker mqtt://b:1 (last error: "
                                   "refused); their summaries stayed queued")
    error, warning = verdict(0, 0)
    assert warning is None and error is not None and error.startswith(
        "nothing was delivered: no simulated device could connect to the broker mqtt://b:1: refused; 9 message(s)")
    error, warning = verdict(2, 0)
    assert warning is None and error is not None and "the server at http://s heard from none of them" in error
