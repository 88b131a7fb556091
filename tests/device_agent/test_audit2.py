"""Second audit with real agents: a disk too full to open the outbox at start, the full disk in the status text,
a probation length that switches the latency check off, and two answers of the local API.

The full disk is a real one: a 16 MB tmpfs mounted by the test (as root, like
``tests/hardening/test_fault_disk_full.py``; CI runs as root, and a failed mount fails the test) and filled
with zeros until
the kernel says ENOSPC. That is what the audit saw: opening an existing WAL outbox then fails in SQLite with
SQLITE_IOERR_SHMSIZE ("disk I/O error", it cannot create ``outbox.sqlite-shm``) and ``os.statvfs`` says 0 bytes
free. RLIMIT_FSIZE (used elsewhere for the prediction log) would give EFBIG with free space left, and a
read-only folder gives EROFS/EACCES: neither is a full disk, and neither would exercise the statvfs check.
"""

from __future__ import annotations

import base64
import logging
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient

from device_agent import cli
from device_agent.agent import Agent
from device_agent.config import DeviceConfig, DeviceDir
from device_agent.http_api import create_app
from device_agent.outbox import SUMMARY, Outbox, OutboxFullError
from device_agent.runner import DeviceRunner
from device_agent.status import status_doc
from edgefleet_contracts.summary import Summary
from tests.device_agent import new_device
from tests.support import fill, small_tmpfs, wait_until


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    with small_tmpfs(tmp_path / "fs", "16m") as mnt:
        yield mnt


def _full_device(built: Any, small_fs: Path) -> tuple[DeviceDir, Path]:
    """A device that has run before (outbox and prediction log exist), on a file system now full."""
    dev = new_device(built, small_fs / "dev", package=built.package)
    dev.save_config(replace(dev.load_config(), window_count=10, window_seconds=3600, min_window_samples=10))
    first = Agent.open(dev.path, background=False)
    first.close()
    first.sink.close()  # type: ignore[attr-defined]  # the last connection: SQLite removes -wal and -shm
    assert dev.outbox.exists() and not Path(f"{dev.outbox}-shm").exists()
    return dev, fill(small_fs)


@pytest.fixture
def holdout(built: Any) -> np.ndarray:
    with np.load(built.holdout) as z:
        return np.asarray(z["x"], dtype=np.float32)


# ---- 1. the agent starts on a full disk ----------------------------------------------------------------
def test_opening_the_outbox_on_a_full_disk_says_disk_full_not_disk_io_error(built: Any, small_fs: Path) -> None:
    dev, _ = _full_device(built, small_fs)
    with pytest.raises(OutboxFullError, match=r"^disk full: cannot open the outbox .*disk I/O error; 0 bytes free"):
        Outbox(dev.outbox, 100)


def test_the_agent_starts_serves_and_holds_windows_on_a_disk_too_full_to_open_its_outbox(
        built: Any, small_fs: Path, holdout: np.ndarray, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="device_agent.outbox")
    caplog.set_level(logging.WARNING, logger="edgefleet.agent")
    dev, filler = _full_device(built, small_fs)
    runner = DeviceRunner(dev.path, http=False, housekeeping=False)  # what `device-agent run` builds: it raised
    agent, outbox = runner.agent, runner.agent.sink
    assert isinstance(outbox, Outbox)
    outbox.reopen_seconds = 0.2
    try:
        runner.start()
        assert not outbox.is_open
        assert "disk full: cannot open the outbox" in caplog.text
        for x in holdout[:30]:  # three windows of 10: served, closed, held in memory
            agent.predict(x)
        assert wait_until(lambda: agent.summarizer.windows_held_disk_full == 3, 10), agent.status()
        st = agent.status()
        assert st["predictions"] == 30 and st["windows_lost"] == 0
        assert st["outbox"]["open"] == 0 and st["outbox"]["disk_full"] >= 1, st["outbox"]
        runner.check_report()
        runner.check_report()  # the report waits for space: said once, without a trace
        assert caplog.text.count("the reported state is queued when disk space frees") == 1
        assert "Traceback" not in caplog.text

        filler.unlink()  # space frees: the summarizer's retry opens the outbox and writes the three, merged
        assert wait_until(lambda: agent.summarizer.windows_recovered == 3, 15), agent.status()
        assert outbox.is_open and agent.summarizer.windows_held_disk_full == 0
        bodies = [Summary.from_dict(r.document()) for r in outbox.peek(100) if r.kind == SUMMARY]
        assert [(s.windows, s.count) for s in bodies] == [(3, 30)]
        assert agent.status()["outbox"]["open"] == 1
        runner.check_report()  # the next periodic check queues the reported state
        assert [r.kind for r in outbox.peek(100)].count("report") == 1
    finally:
        runner.stop()


# ---- 2. the status text shows a full disk -----------------------------------------------------------------
def test_status_text_shows_windows_held_in_memory_for_a_full_disk(
        built: Any, small_fs: Path, holdout: np.ndarray, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    dev, _ = _full_device(built, small_fs)
    agent = Agent.open(dev.path, background=False)
    try:
        for x in holdout[:20]:
            agent.predict(x)
        agent.close_window(wait=True)
        assert agent.summarizer.windows_held_disk_full == 2
        live = agent.status()
    finally:
        agent.close()

    def with_live_agent(device: DeviceDir) -> dict[str, Any]:  # as status_doc builds it when the agent answers
        doc = status_doc(device)
        doc.update({k: live[k] for k in live if k in doc})
        doc["agent"] = {"state": "running", "pid": 1, "url": "http://127.0.0.1:8470", "detail": ""}
        return doc

    monkeypatch.setattr(cli, "status_doc", with_live_agent)
    assert cli.main(["status", "--dir", str(dev.path)]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("agent"))
    assert "0 held below k; DISK FULL: 2 windows held in memory until space frees" in line, line
    assert "outbox writes failed for lack of space, outbox not open" in line, line


def test_status_text_says_nothing_of_a_disk_that_never_filled() -> None:
    doc = {"agent": {"state": "running", "pid": 1, "url": "u", "detail": ""}, "predictions": 5, "rejected": {},
           "windows_closed": 1, "summaries_emitted": 1, "windows_held_for_k": 0, "windows_held_disk_full": 0,
           "windows_lost": 0, "outbox": {"open": 1, "depth": 1, "disk_full": 0, "write_errors": 0}}
    assert cli._agent(doc).endswith("1 summaries, 0 held below k")


# ---- 3. probation_predictions below 100 warns -----------------------------------------------------------
def _cfg(**kw: Any) -> dict[str, Any]:
    return {"device_id": "dev-audit2", "fleet": "f", "target": "x86_64-avx2", **kw}


def test_probation_predictions_below_100_warns_once_per_process_that_latency_may_not_be_compared(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import edgefleet_contracts.process as process

    monkeypatch.setattr(process, "_warned", set())  # what this process has said already
    caplog.set_level(logging.WARNING, logger="edgefleet.agent")
    for i in range(3):  # one folder loaded again and again, then others alike (a simulator's hundreds of devices)
        cfg = DeviceConfig.from_dict(_cfg(probation_predictions=50), source="/dev-a2/config.toml")
        DeviceConfig.from_dict(_cfg(probation_predictions=50), source=f"/dev-a2-{i}/config.toml")
    assert cfg.probation_predictions == 50  # a valid value: used as it is
    warnings = [r.getMessage() for r in caplog.records if "probation_predictions" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("/dev-a2/config.toml: probation_predictions is 50, below 100")
    assert "compared with the previous one's only when more predictions came in" in warnings[0]
    assert "probation_predictions = 100 or more" in warnings[0] and "(said once per process)" in warnings[0]


def test_probation_predictions_of_100_or_more_does_not_warn(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="edgefleet.agent")
    DeviceConfig.from_dict(_cfg(probation_predictions=100), source="/dev-a2b/config.toml")
    DeviceConfig.from_dict(_cfg(), source="/dev-a2b/config.toml")
    assert "probation_predictions" not in caplog.text


# ---- 4. the local API's answers ---------------------------------------------------------------------------
def test_image_b64_that_is_not_a_string_says_it_must_be_a_string(agent: Agent) -> None:
    client = TestClient(create_app(agent))
    r = client.post("/v1/predict", json={"image_b64": 5})
    assert r.status_code == 422
    assert r.json()["detail"] == "'image_b64' must be a string of base64, not int 5"
    r = client.post("/v1/predict", json={"image_b64": "%%%"})
    assert r.json()["detail"] == "'image_b64' is not valid base64"


def test_a_batch_whose_every_instance_failed_is_a_422_with_the_errors(agent: Agent, holdout: np.ndarray) -> None:
    client = TestClient(create_app(agent))
    r = client.post("/v1/predict", json={"instances": [{}, {"image_b64": 5}, 7]})
    assert r.status_code == 422
    assert [p["error"] for p in r.json()["predictions"]] == ["invalid_input", "bad_image", "invalid_input"]
    good = {"inputs": [float(v) for v in holdout[0]]}
    r = client.post("/v1/predict", json={"instances": [{}, good]})
    assert r.status_code == 200 and "error" in r.json()["predictions"][0] and "label" in r.json()["predictions"][1]
    r = client.post("/v1/predict", json={"instances": []})
    assert r.status_code == 200 and r.json() == {"predictions": []}


def test_image_b64_bytes_in_a_batch_still_work_as_before(agent: Agent) -> None:
    """Only the type check is new: a base64 string of non-image bytes is refused by the image decoder as before."""
    client = TestClient(create_app(agent))
    r = client.post("/v1/predict", json={"image_b64": base64.b64encode(b"not an image").decode()})
    assert r.status_code in (422, 503) and "must be a string" not in r.json()["detail"]
