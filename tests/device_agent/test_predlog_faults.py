"""The prediction log under faults: a corrupt model map, a full disk, a failing log thread, labels sent twice,
hostile prediction ids. Real files throughout; a full disk is a real one for this process (RLIMIT_FSIZE: writes
past the limit fail with EFBIG, as they fail with ENOSPC on a full disk; Python ignores SIGXFSZ)."""

from __future__ import annotations

import json
import resource
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from device_agent.agent import Agent, FeedbackError
from device_agent.errors import AlreadyLabelledError, MalformedPredictionIdError
from device_agent.http_api import create_app
from device_agent.predlog import RECORD, PredictionLog
from edgefleet_contracts.targets import get_target
from tests.support import wait_until

TARGET = get_target("x86_64-avx2")


@contextmanager
def disk_full_after(nbytes: int) -> Iterator[None]:
    """Writes of this process past ``nbytes`` into any file fail (EFBIG), as on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def quiet_log(path: Path, max_rows: int = 100_000, **kw: object) -> PredictionLog:
    """A log whose thread never flushes by itself: the test decides when records are written."""
    log = PredictionLog(path, max_rows, flush_seconds=3600, **kw)  # type: ignore[arg-type]
    log.set_boot("b")
    return log


def log_block(log: PredictionLog, first: int, n: int, model: int = 0, predicted: int = 1) -> None:
    log.record_many(np.arange(first, first + n), np.full(n, 1.7e9), model, np.full(n, predicted), np.full(n, 0.9))


def rows_on_disk(folder: Path, boot: str = "b") -> int:
    return sum(p.stat().st_size for p in folder.glob(f"{boot}-[0-9]*.bin")) // RECORD.itemsize


# ---- models.json ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("content", [b"", b"[[\"clinical\", \"1.0", b"\xff\xfe", b"{\"clinical\": 0}", b"[[1, 2]]"],
                         ids=["empty", "torn", "not-utf8", "object", "not-strings"])
def test_an_unreadable_model_map_is_replaced_by_an_empty_one_and_counted(tmp_path, caplog, content):
    folder = tmp_path / "log"
    first = quiet_log(folder)
    first.model_index("clinical", "1.0.0")
    log_block(first, 1, 5)
    first.close()
    (folder / "models.json").write_bytes(content)  # what a power cut left under the old non-fsynced writer

    with caplog.at_level("WARNING", logger="edgefleet.agent"):
        log = quiet_log(folder)
    assert log.corrupt_files == 1 and log.counters()["corrupt_files"] == 1
    assert any("models.json is unreadable" in r.getMessage() for r in caplog.records), caplog.text
    # the old records named indexes of the lost map: they are gone, not attributed to whatever loads first
    assert log.lookup("b-1") is None and log.count() == 0
    assert log.model_index("other", "2.0.0") == 0
    assert json.loads((folder / "models.json").read_text()) == [["other", "2.0.0"]]  # rebuilt as models load
    log.close()


def test_an_agent_opens_on_a_device_whose_model_map_was_emptied_by_a_power_cut(built, tmp_path):
    from tests.device_agent import new_device

    dev = new_device(built, tmp_path / "dev", package=built.package)
    with np.load(built.holdout) as z:
        x = z["x"]
    agent = Agent.open(dev.path, background=False)
    agent.predict(x[0])
    agent.close()
    (dev.path / "predictions" / "models.json").write_bytes(b"")

    agent = Agent.open(dev.path, background=False)  # raised JSONDecodeError on every start before
    try:
        p = agent.predict(x[1])
        agent.feedback(p.prediction_id, p.class_index)
        assert agent.log is not None and agent.log.corrupt_files == 1
        assert agent.counters.feedback == 1
    finally:
        agent.close()


def test_a_failed_write_of_the_model_map_is_retried_on_the_next_flush(tmp_path):
    folder = tmp_path / "log"
    log = quiet_log(folder)
    with disk_full_after(0):
        idx = log.model_index("clinical", "1.0.0")  # the model still loads: the index holds in memory
        log_block(log, 1, 3, idx)
        log.flush()
    assert idx == 0 and log.write_errors >= 1 and not (folder / "models.json").exists()
    assert rows_on_disk(folder) == 0  # no record is written while the map naming its model is not on disk

    log.flush()  # space again
    assert json.loads((folder / "models.json").read_text()) == [["clinical", "1.0.0"]]
    log.close()
    reopened = quiet_log(folder)  # a restart reads the map back, so the records keep their model
    assert reopened.lookup("b-2") == ("clinical", "1.0.0", 1) and reopened.corrupt_files == 0
    reopened.close()


# ---- a full disk and a failing log thread -----------------------------------------------------------------
def test_while_writes_fail_memory_holds_at_most_max_pending_rows_and_the_oldest_are_dropped(tmp_path):
    folder = tmp_path / "log"
    log = quiet_log(folder, max_pending_rows=50)
    idx = log.model_index("clinical", "1.0.0")
    with disk_full_after(0):
        for k in range(5):
            log_block(log, 1 + 30 * k, 30, idx)
            log.flush()
        held = log.counters()
    assert held["write_errors"] == 5 and held["pending"] == 50 and held["dropped"] == 100

    log.flush()  # space again: what was held is written
    assert log.count() == 50 and log.counters()["pending"] == 0
    assert log.lookup("b-150") == ("clinical", "1.0.0", 1)  # the newest were kept
    assert log.lookup("b-100") is None  # the oldest were dropped (and counted)
    log.close()


def test_records_held_after_a_failed_write_can_still_be_looked_up(tmp_path):
    log = quiet_log(tmp_path / "log")
    idx = log.model_index("clinical", "1.0.0")
    with disk_full_after(0):
        log_block(log, 1, 4, idx, predicted=0)
        assert log.lookup("b-3") == ("clinical", "1.0.0", 0)
    log.close()


def test_a_write_cut_short_by_a_full_disk_leaves_no_torn_record_behind(tmp_path):
    folder = tmp_path / "log"
    log = quiet_log(folder)
    idx = log.model_index("clinical", "1.0.0")
    log_block(log, 1, 5, idx, predicted=0)
    log.flush()
    with disk_full_after(5 * RECORD.itemsize + 10):  # room for 10 bytes of the next block, then full
        log_block(log, 6, 5, idx, predicted=1)
        log.flush()
    assert log.write_errors == 1
    log.flush()
    assert log.count() == 10
    assert [log.lookup(f"b-{n}") for n in (5, 6, 10)] == [("clinical", "1.0.0", 0), ("clinical", "1.0.0", 1),
                                                         ("clinical", "1.0.0", 1)]
    log.close()


def test_the_log_thread_goes_on_after_a_segment_it_cannot_stat(tmp_path):
    folder = tmp_path / "log"
    folder.mkdir()
    (folder / "gone-000000.bin").symlink_to(folder / "nowhere")  # a segment that vanished under the scan
    log = PredictionLog(folder, flush_seconds=0.05)
    log.set_boot("b")
    idx = log.model_index("clinical", "1.0.0")
    log_block(log, 1, 3, idx)
    assert wait_until(lambda: rows_on_disk(folder) == 3, 5)
    log_block(log, 4, 3, idx)
    assert wait_until(lambda: rows_on_disk(folder) == 6, 5), "the log thread stopped writing"
    assert log.count() == 6 and log.lookup("b-6") == ("clinical", "1.0.0", 1)
    assert log.counters()["flush_failures"] == 0  # handled where it happens, not by the thread's last resort
    log.close()


class _RotateFailsOnce(PredictionLog):
    """Stands in for a bug that raises something unexpected inside a flush (no real fault raises anything
    but OSError there, and those are handled where they happen)."""

    failed = False

    def _rotate(self) -> None:
        if not self.failed:
            self.failed = True
            raise RuntimeError("a bug in rotation")
        super()._rotate()


def test_the_log_thread_survives_an_unexpected_exception_and_counts_it(tmp_path, caplog):
    folder = tmp_path / "log"
    with caplog.at_level("ERROR", logger="edgefleet.agent"):
        log = _RotateFailsOnce(folder, flush_seconds=0.05)
        log.set_boot("b")
        log_block(log, 1, 3)
        assert wait_until(lambda: log.flush_failures == 1, 5)
        log_block(log, 4, 3)
        assert wait_until(lambda: rows_on_disk(folder) == 6, 5), "the log thread died with the exception"
    assert any("prediction log flush failed" in r.getMessage() for r in caplog.records), caplog.text
    assert log.counters()["flush_failures"] == 1
    log.close()


def test_a_malformed_record_is_dropped_and_counted_and_its_neighbours_are_written(tmp_path):
    log = quiet_log(tmp_path / "log")
    log.record(1, 1.7e9, 0, 1, 0.9)
    log.record("not a counter", 1.7e9, 0, 1, 0.9)  # type: ignore[arg-type]
    log.record(3, 1.7e9, 0, 1, 0.9)
    log.flush()
    assert log.count() == 2 and log.dropped == 1
    log.close()


def test_segments_stay_at_segment_rows_and_keep_distinct_names_while_rotating(tmp_path):
    folder = tmp_path / "log"
    log = quiet_log(folder, max_rows=20, segment_rows=5)
    for k in range(40):
        log_block(log, 1 + 5 * k, 5)
        log.flush()
    sizes = {p.name: p.stat().st_size // RECORD.itemsize for p in folder.glob("b-*.bin")}
    assert set(sizes.values()) == {5}, sizes
    assert 20 <= log.count() <= 25 and len(sizes) <= 5
    log.close()


# ---- labels -----------------------------------------------------------------------------------------------
def test_a_second_label_for_a_prediction_is_refused_also_after_a_restart(tmp_path):
    folder = tmp_path / "log"
    log = quiet_log(folder)
    log.set_label("b-1", 1)
    with pytest.raises(AlreadyLabelledError, match="'b-1' already has a label"):
        log.set_label("b-1", 0)
    log.close()
    reopened = quiet_log(folder)
    with pytest.raises(AlreadyLabelledError, match="already has a label"):
        reopened.set_label("b-1", 1)
    reopened.close()
    assert (folder / "labels.jsonl").read_text().splitlines() == ['{"id": "b-1", "label": 1}']


@pytest.fixture()
def x(built) -> np.ndarray:
    with np.load(built.holdout) as z:
        return z["x"]


def test_feedback_sent_twice_for_a_prediction_is_counted_once_in_the_confusion_matrix(agent, x):
    p = agent.predict(x[0])
    agent.feedback(p.prediction_id, p.class_index)
    with pytest.raises(FeedbackError, match="already has a label"):
        agent.feedback(p.prediction_id, 1 - p.class_index)
    agent.close_window(wait=True)
    s = agent.sink.summaries[0]  # type: ignore[attr-defined]
    assert s.confusion is not None and sum(map(sum, s.confusion)) == 1
    assert s.confusion[p.class_index][p.class_index] == 1 and agent.counters.feedback == 1


def test_the_http_api_refuses_a_second_label_with_409(agent, x):
    client = TestClient(create_app(agent))
    pid = client.post("/v1/predict", json={"inputs": x[0].tolist()}).json()["prediction_id"]
    assert client.post("/v1/feedback", json={"prediction_id": pid, "label": 0}).status_code == 200
    again = client.post("/v1/feedback", json={"prediction_id": pid, "label": 0})
    assert again.status_code == 409 and "already has a label" in again.json()["detail"]
    assert again.json()["error"] == "already_labelled"
    assert agent.counters.feedback == 1


def test_the_labels_file_is_bounded_by_the_predictions_still_in_the_log(tmp_path):
    folder = tmp_path / "log"
    log = quiet_log(folder, max_rows=20, segment_rows=5)
    idx = log.model_index("clinical", "1.0.0")
    for n in range(1, 201):
        log.record(n, 1.7e9, idx, 1, 0.9)
        assert log.lookup(f"b-{n}") is not None  # feedback looks the prediction up first
        log.set_label(f"b-{n}", 1)
    lines = (folder / "labels.jsonl").read_text().splitlines()
    assert len(lines) <= 2 * (20 + 5), len(lines)
    log.close()
    reopened = quiet_log(folder, max_rows=20, segment_rows=5)
    with pytest.raises(FeedbackError, match="already has a label"):  # the live ones are still known
        reopened.set_label("b-200", 0)
    reopened.close()


# ---- prediction ids from clients --------------------------------------------------------------------------
BAD_IDS = ["/x-1", "*-5", "b-*", "b-[0-9]", "b-?", "../b-1", "b/../b-1", "b-1\n", "b-\u00b2", "b-", "-5", "nope",
           "", "b-" + "9" * 20, "b" * 101 + "-1", "b-1 "]


@pytest.mark.parametrize("pid", BAD_IDS)
def test_a_malformed_prediction_id_is_refused_before_any_file_is_touched(tmp_path, pid):
    log = quiet_log(tmp_path / "log")
    with pytest.raises(MalformedPredictionIdError, match="malformed prediction id .*'<boot>-<counter>'"):
        log.lookup(pid)
    with pytest.raises(MalformedPredictionIdError, match="malformed prediction id"):
        log.set_label(pid, 1)
    assert not (tmp_path / "log" / "labels.jsonl").exists()
    log.close()


def test_an_id_names_exactly_one_boot(tmp_path):
    folder = tmp_path / "log"
    log = quiet_log(folder)
    idx = log.model_index("clinical", "1.0.0")
    log.set_boot("b-1")  # a boot that begins with another boot's name and '-'
    log_block(log, 5, 1, idx)
    log.flush()
    assert log.lookup("b-1-5") == ("clinical", "1.0.0", 1)
    assert log.lookup("b-5") is None  # boot "b" made no prediction 5
    log.close()


def test_the_http_api_answers_a_glob_or_path_id_with_422_not_500(agent, x):
    client = TestClient(create_app(agent))
    pid = client.post("/v1/predict", json={"inputs": x[0].tolist()}).json()["prediction_id"]
    counter = pid.rpartition("-")[2]
    for bad in ("/x-1", f"*-{counter}", f"{pid[:3]}*-{counter}"):
        r = client.post("/v1/feedback", json={"prediction_id": bad, "label": 0})
        assert r.status_code == 422 and r.json()["error"] == "malformed_prediction_id", (bad, r.text)
    assert agent.counters.feedback == 0
