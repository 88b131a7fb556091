"""What the prediction log makes durable, and when: a label is fsynced before the API answers "ok"; segments are
fsynced once per flush by the log thread, never on the predict path.

A power cut cannot be made in a test, so ``os.fsync`` is wrapped (and still called) to record which file each
fsync covered and what that file held at that moment: the only stand-in here. Everything else is real: the
agent, onnxruntime, the HTTP app, the files, and a second agent reopening the same folder.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from device_agent.agent import Agent
from device_agent.config import DeviceConfig
from device_agent.errors import AlreadyLabelledError
from device_agent.http_api import create_app
from device_agent.model import load_model
from device_agent.predlog import RECORD, PredictionLog
from edgefleet_contracts.targets import get_target
from tests.conftest import extract

TARGET = get_target("x86_64-avx2")


@dataclass(frozen=True)
class Fsync:
    path: Path
    size: int  # the file's size when it was fsynced
    content: bytes  # what it held then (regular files under 1 MB; else empty)
    thread: int


@pytest.fixture()
def fsyncs(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Fsync]]:
    """Every os.fsync from now on, in order, with the file it covered (the real fsync still runs)."""
    real = os.fsync
    seen: list[Fsync] = []

    def recording(fd: int) -> None:
        path = Path(os.readlink(f"/proc/self/fd/{fd}"))
        size = os.fstat(fd).st_size
        content = path.read_bytes() if path.is_file() and size < 1 << 20 else b""
        seen.append(Fsync(path, size, content, threading.get_ident()))
        real(fd)

    monkeypatch.setattr(os, "fsync", recording)
    yield seen


@pytest.fixture()
def x(built) -> np.ndarray:
    with np.load(built.holdout) as z:
        return z["x"]


def test_a_label_is_fsynced_before_the_api_answers_ok_and_a_new_agent_on_the_folder_sees_it(agent, x, fsyncs):
    assert agent.log is not None
    folder = agent.log.dir.resolve()
    client = TestClient(create_app(agent))
    p = client.post("/v1/predict", json={"inputs": x[0].tolist()}).json()
    del fsyncs[:]
    ok = client.post("/v1/feedback", json={"prediction_id": p["prediction_id"], "label": p["class_index"]})
    assert ok.status_code == 200

    line = f'{{"id": "{p["prediction_id"]}", "label": {p["class_index"]}}}\n'.encode()
    labels = [f for f in fsyncs if f.path == folder / "labels.jsonl"]
    assert len(labels) == 1 and labels[0].content.endswith(line), fsyncs  # the append itself, before "ok"
    assert any(f.path == folder for f in fsyncs), "the new labels file's name was not made durable"
    assert any(f.path.suffix == ".bin" for f in fsyncs), "the labelled prediction's record is not on disk"

    # No shutdown in between (no close, no flush): what the next start finds is what was on disk at "ok".
    reopened = Agent(agent.cfg, agent.target, agent.model, prediction_log=PredictionLog(folder), background=False)
    try:
        again = TestClient(create_app(reopened)).post(
            "/v1/feedback", json={"prediction_id": p["prediction_id"], "label": 1 - p["class_index"]})
        assert again.status_code == 409 and again.json()["error"] == "already_labelled", again.text
    finally:
        reopened.close()


def test_a_label_after_a_torn_last_line_is_fsynced_on_a_line_of_its_own(tmp_path, fsyncs):
    folder = (tmp_path / "log").resolve()
    folder.mkdir()
    (folder / "labels.jsonl").write_text('{"id": "b-1", "label": 1}\n{"id": "b-2", "la')  # a power cut mid-append
    log = PredictionLog(folder, flush_seconds=3600)
    assert log.corrupt_files == 1  # the torn line is skipped and counted ...
    with pytest.raises(AlreadyLabelledError):  # ... the whole lines before it still hold
        log.set_label("b-1", 0)
    del fsyncs[:]
    log.set_label("b-2", 0)
    assert [f.path.name for f in fsyncs] == ["labels.jsonl"]  # the file existed: no folder fsync needed
    assert fsyncs[0].content.endswith(b'"la\n{"id": "b-2", "label": 0}\n')
    log.close()

    reopened = PredictionLog(folder, flush_seconds=3600)
    with pytest.raises(AlreadyLabelledError):
        reopened.set_label("b-2", 1)
    reopened.close()


def test_segments_are_fsynced_once_per_flush_and_never_on_the_predict_path(built, tmp_path, fsyncs):
    model = load_model(extract(built.package, tmp_path / "slot", built.keys / "root.pub"), TARGET)
    log = PredictionLog((tmp_path / "log").resolve(), segment_rows=400, flush_seconds=3600)  # this test flushes
    agent = Agent(DeviceConfig(device_id="dev-1", target=TARGET.name), TARGET, model, prediction_log=log,
                  background=False)
    try:
        with np.load(built.holdout) as z:
            x = z["x"]
        del fsyncs[:]
        for row in np.resize(x, (300, x.shape[1])):
            agent.predict(row)
        assert fsyncs == []  # 300 predictions, two staged blocks handed to the log: no fsync

        agent.close_window()  # hands the staged rest to the log
        log.flush()
        segs = [f for f in fsyncs if f.path.suffix == ".bin"]
        assert len(segs) == 1 and segs[0].size == 300 * RECORD.itemsize  # one fsync for 300 records
        assert [f.path for f in fsyncs if f.path == log.dir] == [log.dir]  # the new segment's name, once

        del fsyncs[:]
        for row in np.resize(x, (150, x.shape[1])):
            agent.predict(row)
        agent.close_window()
        log.flush()  # 100 records fill the first segment, 50 start the next: one fsync per file written
        first = segs[0].path.name
        assert sorted((f.path.name, f.size // RECORD.itemsize) for f in fsyncs if f.path.suffix == ".bin") == [
            (first, 400), (first.replace("-000000.bin", "-000001.bin"), 50)]
    finally:
        agent.close()
