"""What validation reads from the store, per batch of messages: device keys (with their revocation and
generation), published model versions, and which summaries are already stored."""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any, NamedTuple

from edgefleet_contracts.errors import SchemaError
from edgefleet_contracts.signing import public_from_b64

from ..errors import RejectedError
from ..store import Store
from .results import reject
from .signatures import DeviceKey

__all__ = ["StoreLookups"]

log = logging.getLogger(__name__)

_KEY_CHUNK = 500


class _Device(NamedTuple):
    """A device's enrollment as validation needs it."""

    key: DeviceKey | None  # None: not enrolled, revoked, or an unusable stored key
    revoked: bool
    seq_base: int  # its generation's offset: summaries are stored at seq + seq_base


_NOT_ENROLLED = _Device(None, False, 0)


class StoreLookups:
    """A device's enrolled key is read from the store once per batch of messages (one query for the batch's
    MQTT topic devices, then a primary-key look-up for any other device), so a re-enrolled, revoked or removed
    device takes effect for every batch validated after it committed, in every validator thread or process;
    parsed keys and published versions are cached (a version is re-read on a miss). Whether a summary is
    already stored is also one query per batch. Thread-safe: the batch's memo is per thread."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._parsed: dict[str, DeviceKey] = {}  # base64 public key -> parsed key
        self._versions: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._local = threading.local()  # .memo: device id -> _Device, for the batch being checked

    def _new_batch(self, devices: Sequence[str] = ()) -> None:
        """Forget what was read for the previous batch; read the enrollments of ``devices`` in one query."""
        memo: dict[str, _Device] = {}
        wanted = sorted(set(devices))
        for i in range(0, len(wanted), _KEY_CHUNK):
            chunk = wanted[i:i + _KEY_CHUNK]
            rows = self.store.query("SELECT device_id, public_key, revoked, seq_base FROM devices WHERE device_id IN "
                                    f"({','.join('?' * len(chunk))})", tuple(chunk))
            memo.update((str(r[0]), self._enrollment(str(r[0]), r)) for r in rows)
        self._local.memo = memo

    def _device(self, device_id: str) -> _Device:
        """The device's enrollment as this batch sees it, read once per batch (a primary-key look-up for a device
        the batch's first query did not cover)."""
        memo: dict[str, _Device] | None = getattr(self._local, "memo", None)
        if memo is None:
            memo = self._local.memo = {}
        entry = memo.get(device_id)
        if entry is None:
            row = self.store.one("SELECT device_id, public_key, revoked, seq_base FROM devices WHERE device_id = ?",
                                 (device_id,))
            entry = memo[device_id] = _NOT_ENROLLED if row is None else self._enrollment(device_id, row)
        return entry

    def _enrollment(self, device_id: str, row: Any) -> _Device:
        revoked = row[2] is not None
        key = None if revoked else self._parse_key(device_id, str(row[1]))
        return _Device(key, revoked, int(row[3] or 0))

    def _device_key(self, device_id: str) -> DeviceKey | None:
        """The device's enrolled key (None when not enrolled, revoked, or its stored key is unusable)."""
        return self._device(device_id).key

    def _seq_base(self, device_id: str) -> int:
        """The ``seq_base`` of the device's current generation (``devices._enroll_in``)."""
        return self._device(device_id).seq_base

    def _not_enrolled(self, device_id: str, what: str) -> RejectedError:
        """The refusal for a device without a usable key: revoked (by an operator) or never enrolled."""
        if self._device(device_id).revoked:
            return reject("device_revoked", f"{what}: device {device_id!r} was revoked by an operator; its "
                                            "messages are refused (`fleet-server devices show` says why)")
        return reject("unknown_device", f"{what}: device {device_id!r} is not enrolled; enroll it "
                                        "(`fleet-server devices enroll`) before it reports")

    def _parse_key(self, device_id: str, b64: str) -> DeviceKey | None:
        with self._lock:
            entry = self._parsed.get(b64)
        if entry is None:
            try:
                key = public_from_b64(b64)
            except SchemaError:
                log.error("device %s has an unusable public key in the store; re-enroll it", device_id)
                return None
            entry = DeviceKey(key)
            with self._lock:
                self._parsed[b64] = entry
        return entry

    def _published(self, model: str, version: str) -> bool:
        with self._lock:
            if (model, version) in self._versions:
                return True
        row = self.store.one("SELECT 1 FROM model_versions WHERE name = ? AND version = ?", (model, version))
        if row is None:
            return False
        with self._lock:
            self._versions.add((model, version))
        return True

    def _stored(self, keys: list[tuple[str, int]]) -> set[tuple[str, int]]:
        """Which ``(device_id, seq)`` are already stored (duplicates take no token): one indexed query per
        chunk (a join with a VALUES list: SQLite scans the whole table for ``(a, b) IN (VALUES ...)``)."""
        found: set[tuple[str, int]] = set()
        for i in range(0, len(keys), _KEY_CHUNK):
            chunk = keys[i:i + _KEY_CHUNK]
            values = ",".join("(?,?)" for _ in chunk)
            rows = self.store.query(f"SELECT s.device_id, s.seq FROM (VALUES {values}) AS k JOIN summaries AS s"
                                    " ON s.device_id = k.column1 AND s.seq = k.column2",
                                    tuple(x for key in chunk for x in key))
            found.update((str(r[0]), int(r[1])) for r in rows)
        return found
