"""What `device-agent batch` and `predict` do with inputs that are not what they should be (third audit), and the
config values that used to load and then fail at run time.

A bad row of a batch is that row's error, recorded under its key and counted in the window like any refused
input; a file that cannot be read at all is one clear line naming the file and the problem (exit 1), and every
prediction computed before it is in the store. Real device folders, a real agent, the real command line.
"""

from __future__ import annotations

import csv
import io
import socket
import sqlite3
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.agent import Agent
from device_agent.batch import BatchError, KVStore, run_batch
from device_agent.cli import main as agent_cli
from device_agent.config import ConfigError, DeviceConfig, DeviceDir
from edgefleet_contracts.summary import noise_variance

from . import TARGET, new_device


@pytest.fixture
def x(built: Any) -> np.ndarray:
    with np.load(built.holdout) as z:
        return np.asarray(z["x"], dtype=np.float32)


@pytest.fixture
def device(built: Any, tmp_path: Path) -> DeviceDir:
    return new_device(built, tmp_path / "dev", package=built.package)


def _csv(agent: Agent, x: np.ndarray, n: int, *, start: int = 0, header: bool = True) -> list[list[str]]:
    """A header and ``n`` good rows (keys p-<i>) as lists of CSV cells."""
    names = agent.model.validator.names  # type: ignore[union-attr]
    rows = [["key", *names]] if header else []
    rows += [[f"p-{i}", *(repr(float(v)) for v in x[i % len(x)])] for i in range(start, start + n)]
    return rows


def _write(path: Path, rows: list[list[str]], tail: bytes = b"") -> Path:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    path.write_bytes(buf.getvalue().encode() + tail)
    return path


def _stored(store: KVStore) -> dict[str, dict[str, Any]]:
    keys = [r[0] for r in store.db.execute("SELECT key FROM predictions")]
    return {k: store.get(k)["outputs"] for k in keys}  # type: ignore[index]


# ---- bug 1: a row with an extra or a missing field ----------------------------------------------------------
def test_a_row_with_an_extra_field_is_that_rows_error_and_every_other_row_is_stored(agent, x, tmp_path):
    rows = _csv(agent, x, 100)
    rows.append(["p-extra", *rows[1][1:], "1.0"])
    rows += _csv(agent, x, 5, start=100, header=False)
    store = KVStore(tmp_path / "kv.sqlite")
    counts = run_batch(agent, _write(tmp_path / "partial.csv", rows), store)
    assert counts == {"stored": 105, "rejected": 1}
    got = _stored(store)
    assert len(got) == 106 and agent.counters.predictions == 105
    assert got["p-extra"] == {"error": "wrong_shape", "detail": "line 102 has 32 fields, the header has 31"}
    assert agent.counters.rejected == {"wrong_shape": 1}  # counted like any refused input


def test_a_short_row_is_that_rows_error(agent, x, tmp_path):
    rows = _csv(agent, x, 3)
    rows.insert(2, ["p-short", "1.0", "2.0"])
    store = KVStore(tmp_path / "kv.sqlite")
    assert run_batch(agent, _write(tmp_path / "short.csv", rows), store) == {"stored": 3, "rejected": 1}
    assert _stored(store)["p-short"] == {"error": "wrong_shape", "detail": "line 3 has 3 fields, the header has 31"}


def test_predictions_made_before_a_row_that_cannot_be_read_are_stored(agent, x, tmp_path):
    path = _write(tmp_path / "broken.csv", _csv(agent, x, 100), tail=b"p-100,\xff\xfe\n")
    store = KVStore(tmp_path / "kv.sqlite")
    with pytest.raises(BatchError) as info:
        run_batch(agent, path, store)
    assert str(info.value) == (f"{path}: line 102 is not UTF-8 text (byte 0xff); a batch CSV must be UTF-8 "
                               f"(the 100 rows before it were predicted and stored)")
    assert store.count() == 100 == agent.counters.predictions


# ---- bug 3: a non-numeric cell, a repeated key, an empty key ------------------------------------------------
def test_a_non_numeric_cell_is_that_rows_invalid_input_naming_the_column_and_value(agent, x, tmp_path):
    rows = _csv(agent, x, 3)
    rows[2][1] = "abc"
    store = KVStore(tmp_path / "kv.sqlite")
    assert run_batch(agent, _write(tmp_path / "cell.csv", rows), store) == {"stored": 2, "rejected": 1}
    bad, first = _stored(store)["p-1"], rows[0][1]
    assert bad == {"error": "invalid_input", "detail": f"line 3: column {first!r} has the non-numeric value 'abc'"}
    assert agent.counters.rejected == {"invalid_input": 1}  # not missing_field, not a schema change


def test_a_repeated_key_is_not_predicted_twice_and_is_reported(agent, x, tmp_path):
    rows = _csv(agent, x, 2)
    rows.append(["p-0", *rows[2][1:]])
    said: list[str] = []
    store = KVStore(tmp_path / "kv.sqlite")
    counts = run_batch(agent, _write(tmp_path / "dup.csv", rows), store, report=said.append)
    assert counts == {"stored": 2, "rejected": 0, "skipped": 1} and store.count() == 2
    assert said == ["line 4 repeats the key 'p-0' of line 2: not predicted (each row needs its own key)"]
    assert agent.counters.predictions == 2


def test_an_empty_key_is_an_error_for_that_row_not_a_stored_empty_key(agent, x, tmp_path):
    rows = _csv(agent, x, 2)
    rows[1][0] = ""
    said: list[str] = []
    store = KVStore(tmp_path / "kv.sqlite")
    counts = run_batch(agent, _write(tmp_path / "empty.csv", rows), store, report=said.append)
    assert counts == {"stored": 1, "rejected": 0, "skipped": 1}
    assert store.get("") is None and said == ["line 2 has an empty key: not predicted"]


def test_a_repeated_npz_key_is_reported(agent, x, tmp_path, capsys):
    np.savez(tmp_path / "dup.npz", x=x[:3], keys=np.array(["a", "b", "a"]))
    said: list[str] = []
    store = KVStore(tmp_path / "kv.sqlite")
    assert run_batch(agent, tmp_path / "dup.npz", store, report=said.append)["skipped"] == 1
    assert said == ["x[2] repeats the key 'a' of x[0]: not predicted (each row needs its own key)"]


# ---- bug 2: inputs that cannot be read are one clear line, exit 1 -------------------------------------------
def _bad_inputs(tmp_path: Path, x: np.ndarray) -> dict[str, tuple[Path, str]]:
    """name -> (input file, what the one-line error must say after the file name)."""
    utf16 = tmp_path / "utf16.csv"
    utf16.write_bytes("key,mean_radius\nk,1\n".encode("utf-16"))
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 4)
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("key,café\n".encode("latin-1"))
    np.savez(tmp_path / "nox.npz", y=x[:3])
    np.savez(tmp_path / "keys.npz", x=x[:3], keys=np.array(["a", "b"]))
    np.savez(tmp_path / "strx.npz", x=np.array([["a", "b"]]))
    with open(tmp_path / "obj.npz", "wb") as fh:
        np.savez(fh, x=np.array([{"a": 1}], dtype=object))
    (tmp_path / "notzip.npz").write_bytes(b"this is not a zip archive\n" * 10)
    return {
        "utf16": (utf16, "is UTF-16 text; a batch CSV must be UTF-8"),
        "binary": (binary, "line 1 is not text (a NUL byte); a batch CSV must be UTF-8 text"),
        "latin-1": (latin1, "line 1 is not UTF-8 text (byte 0xe9); a batch CSV must be UTF-8"),
        "no x": (tmp_path / "nox.npz", "has no array 'x' (it holds 'y'); a batch .npz holds x (and optional keys)"),
        "keys": (tmp_path / "keys.npz", "has 2 keys for 3 rows of x"),
        "string x": (tmp_path / "strx.npz", "x must be a numeric array, not text (dtype <U1)"),
        "object x": (tmp_path / "obj.npz", "x cannot be read without pickle (an object array?)"),
        "not zip": (tmp_path / "notzip.npz", "is not an .npz archive (np.savez writes one)"),
    }


@pytest.mark.parametrize("case", ["utf16", "binary", "latin-1", "no x", "keys", "string x", "object x", "not zip"])
def test_a_batch_input_that_cannot_be_read_is_one_line_naming_the_file_exit_1(device, x, tmp_path, capsys, case):
    path, words = _bad_inputs(tmp_path, x)[case]
    code = agent_cli(["batch", "--dir", str(device.path), "--input", str(path), "--store", str(tmp_path / "kv")])
    err = capsys.readouterr().err.strip()
    assert code == 1, err
    assert err.startswith(f"device-agent: error (batch_input): {path}") and words in err, err
    assert "\n" not in err and "Traceback" not in err


def test_a_store_that_is_a_folder_is_one_line_naming_it(device, x, tmp_path, capsys):
    np.savez(tmp_path / "ok.npz", x=x[:3])
    (tmp_path / "folder").mkdir()
    code = agent_cli(["batch", "--dir", str(device.path), "--input", str(tmp_path / "ok.npz"),
                      "--store", str(tmp_path / "folder")])
    err = capsys.readouterr().err.strip()
    assert code == 1
    assert err == (f"device-agent: error (kv_store): cannot open the key-value store {tmp_path / 'folder'}: it is a "
                   "folder; --store names a SQLite file"), err


def test_a_store_that_is_not_sqlite_is_one_line_naming_it(tmp_path):
    (tmp_path / "kv.sqlite").write_bytes(b"not a database" * 100)
    with pytest.raises(Exception) as info:
        KVStore(tmp_path / "kv.sqlite")
    assert not isinstance(info.value, sqlite3.Error)
    assert str(info.value).startswith(f"cannot open the key-value store {tmp_path / 'kv.sqlite'}: ")


@pytest.mark.parametrize("content", ["object", "garbage"])
def test_predict_with_an_unreadable_npy_is_one_line_naming_the_file(device, tmp_path, capsys, content):
    path = tmp_path / "one.npy"
    if content == "object":
        np.save(path, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    else:
        path.write_bytes(b"\x93NUMPY garbage" * 5)
    assert agent_cli(["predict", str(path), "--dir", str(device.path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"device-agent: error (agent): {path} is not a readable .npy array"), err
    assert "\n" not in err


def test_a_config_toml_that_is_not_utf8_names_the_file(device, capsys):
    device.config_file.write_bytes(device.config_file.read_bytes() + b"# caf\xe9\n")
    with pytest.raises(ConfigError, match=rf"^{device.config_file}: not UTF-8 text"):
        device.load_config()
    assert agent_cli(["status", "--dir", str(device.path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"device-agent: error (config): {device.config_file}: not UTF-8 text"), err


# ---- bug 5: dp_epsilon ----------------------------------------------------------------------------------
@pytest.mark.parametrize("eps", [1e-300, 1e-9, 0.001, 101.0, 1e300])
def test_dp_epsilon_outside_its_range_is_refused_naming_the_range(eps):
    with pytest.raises(ConfigError, match=r"^dp_epsilon must be 0 \(off\) or from 0.01 to 100"):
        DeviceConfig(device_id="d", target=TARGET, dp_epsilon=eps)


@pytest.mark.parametrize("eps", [0.0, 0.01, 0.5, 1.0, 100.0])
def test_dp_epsilon_inside_its_range_loads(eps):
    assert DeviceConfig(device_id="d", target=TARGET, dp_epsilon=eps).dp_epsilon == eps


@pytest.mark.parametrize("eps", [1e-300, 5e-324, 1e-160])
def test_noise_variance_of_a_tiny_epsilon_is_finite_not_a_division_by_zero(eps):
    v = noise_variance(eps)
    assert v > 1e200 and v < float("inf")


def test_noise_variance_refuses_an_epsilon_that_is_not_positive():
    for eps in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="epsilon must be a positive number"):
            noise_variance(eps)


# ---- bug 6: http_host and a busy port -----------------------------------------------------------------------
@pytest.mark.parametrize("host", ["not a host!!", "", " 127.0.0.1", "a..b", "under_score.local", "[::1]", "-x"])
def test_an_http_host_that_is_no_host_is_refused_naming_the_key(host):
    with pytest.raises(ConfigError, match=r"^http_host must be an IP address or a host name"):
        DeviceConfig(device_id="d", target=TARGET, http_host=host)


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0", "::1", "::", "localhost", "device-7.local", "edge7."])
def test_an_http_host_that_is_an_address_or_a_name_loads(host):
    assert DeviceConfig(device_id="d", target=TARGET, http_host=host).http_host == host


def _set(device: DeviceDir, **kw: Any) -> None:
    cfg = device.load_config()
    device.save_config(DeviceConfig(**{**cfg.__dict__, **kw}))


def test_run_on_a_port_in_use_is_one_line_naming_the_port_and_key(device, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        _set(device, http_port=port)
        assert agent_cli(["run", "--dir", str(device.path)]) == 1
        err = capsys.readouterr().err.strip()
        assert err == (f"device-agent: error (http_listen): the local API cannot listen on 127.0.0.1:{port} "
                       f"(http_host, http_port in {device.config_file}): port {port} is in use (another "
                       "device-agent run?)"), err
        assert agent_cli(["run", "--dir", str(device.path), "--http-port", str(port)]) == 1
        assert f"(--http-port): port {port} is in use" in capsys.readouterr().err


def test_run_with_an_http_host_that_does_not_resolve_names_the_key(device, capsys):
    _set(device, http_host="no-such-host.invalid")
    assert agent_cli(["run", "--dir", str(device.path)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("device-agent: error (http_listen): the local API cannot listen on no-such-host.invalid"), err
    assert f"(http_host, http_port in {device.config_file}): http_host does not resolve" in err


def test_predict_on_a_file_of_many_rows_points_to_batch(device, tmp_path, capsys):
    rows = tmp_path / "holdout.csv"
    rows.write_text("a,b\n1,2\n")
    assert agent_cli(["predict", "--dir", str(device.path), str(rows)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"device-agent: error (agent): {rows}: predict takes one input (a .json row, a .npy array or an image "
        f"file); for a file of many rows use `device-agent batch --dir {device.path} --input {rows} --store "
        "KV.sqlite`")  # it was read as an image: "this model takes numeric features, not an image"


def test_serve_with_a_store_that_does_not_exist_is_refused_instead_of_serving_an_empty_one(device, tmp_path,
                                                                                          capsys):
    missing = tmp_path / "nope.sqlite"
    assert agent_cli(["serve", "--dir", str(device.path), "--port", "0", "--store", str(missing)]) == 1
    assert f"--store {missing} does not exist" in capsys.readouterr().err
    assert not missing.exists()
