"""What the prediction log keeps on disk, and the prediction ids that point into it: formats and parsing only.

``predlog.PredictionLog`` is the machinery (queue, flush thread, rotation, fsync); this module is what it
writes and reads, as plain values and pure functions (``scan_segments`` only lists a folder):

* a segment ``<boot>-<n>.bin`` is a run of fixed-size ``RECORD`` rows (counter, time, model index, predicted
  class, confidence); a partial last record (a write cut short) is not a row;
* a prediction id is ``<boot>-<counter>``: the boot is 1-100 letters, digits, '_', '.' or '-' (the agent's
  ``<device id>.<hex>``), the counter 1-19 ASCII digits after the last '-';
* ``labels.jsonl`` holds one ``{"id": ..., "label": <class index>}`` line per labelled prediction; a line that
  does not parse (a torn last line left by a power cut, or damage) is skipped and counted.

Every id a client sends back is checked against the grammar (``parse_prediction_id``) before it reaches a file
name, so it is never a path or a glob pattern.
"""

from __future__ import annotations

import json
import os
import re
import stat
from collections.abc import Mapping, Set
from pathlib import Path
from typing import NamedTuple

import numpy as np

from .errors import MalformedPredictionIdError

RECORD = np.dtype([("counter", "<i8"), ("at", "<f8"), ("model", "<i4"), ("predicted", "<i4"),
                   ("confidence", "<f4")])
EMPTY = np.empty(0, dtype=RECORD)

Record = tuple[int, float, int, int, float]

# A boot is the agent's "<device id>.<hex>" (device ids are [A-Za-z0-9_.-]); the counter follows the last '-'.
_BOOT = re.compile(r"[A-Za-z0-9_.-]{1,100}", re.ASCII)
_PREDICTION_ID = re.compile(r"([A-Za-z0-9_.-]{1,100})-([0-9]{1,19})", re.ASCII)
_SEGMENT_NAME = re.compile(r"([A-Za-z0-9_.-]{1,100})-([0-9]{1,19})\.bin", re.ASCII)
_MAX_COUNTER = 2**63 - 1


class Segment(NamedTuple):
    """A segment file as listed (sorting a list of them puts the oldest first)."""

    mtime_ns: int
    name: str
    boot: str
    rows: int
    path: Path


# ---- prediction ids and boots ------------------------------------------------------------------------------
def is_boot(boot: str) -> bool:
    """True when ``boot`` can name segments and prefix prediction ids."""
    return _BOOT.fullmatch(boot) is not None


def parse_id(pid: object) -> tuple[str, int] | None:
    """(boot, counter) of a well-formed prediction id, else None."""
    m = _PREDICTION_ID.fullmatch(pid) if isinstance(pid, str) else None
    if m is None or int(m[2]) > _MAX_COUNTER:
        return None
    return m[1], int(m[2])


def parse_prediction_id(pid: object) -> tuple[str, int]:
    """(boot, counter) of a prediction id ``<boot>-<counter>``.

    Raises MalformedPredictionIdError when ``pid`` is not of that form: the boot is 1-100 letters, digits, '_',
    '.' or '-', the counter 1-19 ASCII digits (at most 2**63 - 1). The HTTP API answers it with 422, not 404:
    every id a prediction returns has this form, so a malformed one is a bug in the client that sent it (fix
    the client), while 404 (UnknownPredictionError) is kept for a well-formed id this device does not hold
    (drop the label). Nothing else reaches a file name, so a client's id is never a path or a glob pattern.
    """
    parsed = parse_id(pid)
    if parsed is None:
        shown = pid if not isinstance(pid, str) or len(pid) <= 120 else pid[:120] + "..."
        raise MalformedPredictionIdError(
            f"malformed prediction id {shown!r}: ids are '<boot>-<counter>' exactly as a prediction returned them "
            "(letters, digits, '_', '.', '-', then '-' and digits)")
    return parsed


# ---- segments ----------------------------------------------------------------------------------------------
def segment_name(boot: str, number: int) -> str:
    return f"{boot}-{number:06d}.bin"


def segment_numbers(names: list[str], boot: str) -> list[int]:
    """The numbers of ``boot``'s segments among the file ``names`` of a log folder."""
    return [int(m[2]) for name in names if (m := _SEGMENT_NAME.fullmatch(name)) is not None and m[1] == boot]


def scan_segments(directory: Path) -> list[Segment]:
    """The segments in ``directory``, oldest first; entries that vanish or are not regular files are left out.
    Raises OSError when the folder cannot be listed."""
    out: list[Segment] = []
    with os.scandir(directory) as it:
        for entry in it:
            m = _SEGMENT_NAME.fullmatch(entry.name)
            if m is None:
                continue
            try:
                st = entry.stat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode):
                out.append(Segment(st.st_mtime_ns, entry.name, m[1], st.st_size // RECORD.itemsize, Path(entry.path)))
    out.sort()
    return out


# ---- labels.jsonl ------------------------------------------------------------------------------------------
def label_line(pid: str, label: int) -> str:
    """One line of ``labels.jsonl``, newline included."""
    return json.dumps({"id": pid, "label": label}) + "\n"


def parse_labels(text: str) -> tuple[dict[str, int], int]:
    """(labels by prediction id, number of lines skipped) of a ``labels.jsonl`` text.

    A line that is not a JSON object with a well-formed ``id`` and an integer ``label`` is skipped (a torn
    last line, damage); blank lines are ignored. When an id repeats (files written before a second label was
    refused), the first label wins: it is the one that was counted.
    """
    labels: dict[str, int] = {}
    bad = 0
    for line in text.splitlines():
        if not line.strip():
            continue
        try:
            doc = json.loads(line)
            pid, label = doc["id"], doc["label"]
        except (ValueError, KeyError, TypeError):
            bad += 1
            continue
        if parse_id(pid) is None or not isinstance(label, int) or isinstance(label, bool):
            bad += 1
            continue
        labels.setdefault(pid, label)
    return labels, bad


def live_labels(labels: Mapping[str, int], live: Mapping[str, Set[int]]) -> dict[str, int]:
    """The ``labels`` whose prediction is still in the log (``live``: the counters on disk, by boot)."""
    keep: dict[str, int] = {}
    for pid, label in labels.items():
        parsed = parse_id(pid)
        if parsed is not None and parsed[1] in live.get(parsed[0], ()):
            keep[pid] = label
    return keep
