"""A/B model slots and the atomic ``active.json`` pointer.

Layout (inside the device folder, see ``device_agent.config.DeviceDir``)::

    slots/a/, slots/b/        a verified, extracted package each: the payload files at the top (so the model
                              is ``<slot>/<manifest.model_file>``), plus
        manifest.json         the verified manifest (``{"signed": …}``; a contract-reserved name, so no payload
                              file can collide with it)
        .complete             written last when the slot is fully unpacked and fsynced
        .smoke.json           the passed smoke test with its numbers, written before the slot is promoted
    slots/<x>.tmp/            a slot being staged (never pointed to; discarded at start-up)
    slots/<x>.trash-*/        a slot being deleted (renamed away first, so a half-deleted slot is never "complete")
    active.json               {"slot", "name", "version", "activated"}, replaced atomically

A slot is *ready* when it has ``.complete``, a passed ``.smoke.json`` and a readable manifest. The pointer
only ever names a ready slot (``Updater.recover`` repairs it if something outside the agent broke that).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from edgefleet_contracts.atomic import atomic_write_text, fsync_dir
from edgefleet_contracts.canonical import parse_json
from edgefleet_contracts.errors import ContractError
from edgefleet_contracts.manifest import MANIFEST_NAME, Manifest
from edgefleet_contracts.timeutil import fmt, parse

from .config import DeviceDir
from .errors import AgentError

SLOT_NAMES = ("a", "b")
COMPLETE_MARKER = ".complete"
SMOKE_FILE = ".smoke.json"
RESERVED = frozenset({COMPLETE_MARKER, SMOKE_FILE, MANIFEST_NAME})

__all__ = ["COMPLETE_MARKER", "RESERVED", "SLOT_NAMES", "SMOKE_FILE", "BusyError", "Pointer", "SlotError", "Slots"]


class SlotError(AgentError):
    """A slot or the active pointer cannot be read or written."""

    reason = "slot"


class BusyError(AgentError):
    """Another process holds the update lock (an install or rollback is running)."""

    reason = "busy"


@dataclass(frozen=True)
class Pointer:
    slot: str
    name: str
    version: str
    activated: str

    def to_dict(self) -> dict[str, str]:
        return {"slot": self.slot, "name": self.name, "version": self.version, "activated": self.activated}


def other(slot: str) -> str:
    return "b" if slot == "a" else "a"


def fsync_tree(root: Path) -> None:
    """fsync every file and folder under ``root`` (files first, then their folders, then ``root``)."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for f in files:
            fd = os.open(os.path.join(folder, f), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(Path(folder))


class Slots:
    """The two slots and the pointer of one device folder. Every write here is atomic."""

    def __init__(self, device: DeviceDir) -> None:
        self.device = device
        self.root: Path = device.slots

    # ---- paths ----------------------------------------------------------------------------------------
    def path(self, slot: str) -> Path:
        if slot not in SLOT_NAMES:
            raise SlotError(f"unknown slot {slot!r}; slots: {', '.join(SLOT_NAMES)}")
        return self.device.slot(slot)

    def tmp_path(self, slot: str) -> Path:
        return self.root / f"{slot}.tmp"

    # ---- the update lock ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive, non-blocking lock on the slots folder for the duration of an update or recovery.

        Released by the kernel when the process dies (even by SIGKILL). Raises BusyError when held.
        """
        self.root.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root, os.O_RDONLY)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise BusyError(f"another device-agent process is updating {self.device.path}; try again when "
                                "it has finished") from None
            yield
        finally:
            os.close(fd)

    # ---- slot contents --------------------------------------------------------------------------------
    def manifest(self, slot: str) -> Manifest | None:
        """The manifest stored in a slot (or a staging folder), or None when absent or unreadable."""
        return read_manifest(self.path(slot))

    def is_complete(self, folder: Path) -> bool:
        return (folder / COMPLETE_MARKER).is_file()

    def smoke_passed(self, folder: Path) -> bool:
        try:
            doc = json.loads((folder / SMOKE_FILE).read_text())
        except (OSError, ValueError):
            return False
        return isinstance(doc, dict) and doc.get("passed") is True

    def is_ready(self, slot: str) -> bool:
        folder = self.path(slot)
        if not (self.is_complete(folder) and self.smoke_passed(folder)):
            return False
        m = read_manifest(folder)
        return m is not None and (folder / m.model_file).is_file()

    def write_manifest(self, folder: Path, manifest: Manifest, signer: str | None = None) -> None:
        """The slot's manifest, with the id of the key that signed it (``signer``: checked against the keyset's
        revocations when the slot is switched to again, by rollback or rollout)."""
        doc: dict[str, Any] = {"signed": manifest.to_signed()}
        if signer is not None:
            doc["signer"] = signer
        atomic_write_text(folder / MANIFEST_NAME, json.dumps(doc, sort_keys=True))

    def signer(self, slot: str) -> str | None:
        """The key id that signed the model in ``slot``; None when unknown (a slot installed by an agent older
        than the signer record, or an unreadable manifest)."""
        try:
            doc = parse_json((self.path(slot) / MANIFEST_NAME).read_bytes(), what=MANIFEST_NAME)
        except (OSError, ContractError):
            return None
        signer = doc.get("signer") if isinstance(doc, dict) else None
        return signer if isinstance(signer, str) else None

    def mark_complete(self, folder: Path, at: datetime) -> None:
        """fsync the whole unpacked tree, then write the ``.complete`` marker last (fsynced)."""
        fsync_tree(folder)
        atomic_write_text(folder / COMPLETE_MARKER, fmt(at) + "\n")

    def installed_at(self, slot: str) -> datetime | None:
        """When the model in ``slot`` was installed (the time its ``.complete`` marker holds); None when unknown."""
        try:
            return parse((self.path(slot) / COMPLETE_MARKER).read_text().strip(), COMPLETE_MARKER)
        except (OSError, UnicodeDecodeError, ContractError):
            return None

    def mark_smoke_passed(self, folder: Path, result: dict[str, Any]) -> None:
        atomic_write_text(folder / SMOKE_FILE, json.dumps({"passed": True, **result}, sort_keys=True))

    def discard(self, folder: Path) -> None:
        """Delete a slot folder so that no observer ever sees a half-deleted slot that still looks complete."""
        if not folder.exists():
            return
        trash = self.root / f"{folder.name}.trash-{uuid.uuid4().hex[:8]}"
        os.replace(folder, trash)
        fsync_dir(self.root)
        shutil.rmtree(trash, ignore_errors=True)

    def promote(self, tmp: Path, slot: str) -> None:
        """Move a staged, smoke-tested folder into ``slot`` (which must not be the active one)."""
        self.discard(self.path(slot))
        os.replace(tmp, self.path(slot))
        fsync_dir(self.root)

    def leftovers(self) -> list[Path]:
        """Staging and trash folders (anything under slots/ that is not a slot)."""
        if not self.root.exists():
            return []
        return sorted(p for p in self.root.iterdir() if p.name not in SLOT_NAMES)

    # ---- the pointer ----------------------------------------------------------------------------------
    def pointer(self) -> Pointer | None:
        """The pointer as written, or None when there is none. Raises SlotError when it is unreadable."""
        try:
            data = self.device.active_file.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SlotError(f"cannot read {self.device.active_file}: {exc}") from None
        try:
            doc = json.loads(data)
            p = Pointer(str(doc["slot"]), str(doc["name"]), str(doc["version"]), str(doc["activated"]))
        except (ValueError, KeyError, TypeError) as exc:
            raise SlotError(f"{self.device.active_file} is not a slot pointer: {exc!r}") from None
        if p.slot not in SLOT_NAMES:
            raise SlotError(f"{self.device.active_file} names unknown slot {p.slot!r}")
        return p

    def set_pointer(self, slot: str, manifest: Manifest, at: datetime) -> Pointer:
        """Atomically point at ``slot`` (temp file, fsync, rename, fsync folder)."""
        p = Pointer(slot, manifest.name, manifest.version, fmt(at))
        atomic_write_text(self.device.active_file, json.dumps(p.to_dict(), indent=1, sort_keys=True) + "\n")
        return p

    def clear_pointer(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.device.active_file)
            fsync_dir(self.device.path)

    def active_name(self) -> str | None:
        """The slot the pointer names when that slot is ready; None otherwise."""
        try:
            p = self.pointer()
        except SlotError:
            return None
        if p is None or not self.is_ready(p.slot):
            return None
        m = self.manifest(p.slot)
        if m is None or (m.name, m.version) != (p.name, p.version):
            return None
        return p.slot

    def active(self) -> tuple[Path, Manifest] | None:
        """(slot folder, manifest) of the model to serve, or None when the device has no usable model."""
        slot = self.active_name()
        if slot is None:
            return None
        m = self.manifest(slot)
        return None if m is None else (self.path(slot), m)

    def standby_name(self) -> str | None:
        """The other slot when it is ready (a model rollback can switch to without any download)."""
        active = self.active_name()
        if active is None or not self.is_ready(other(active)):
            return None
        return other(active)

    def standby(self) -> tuple[Path, Manifest] | None:
        slot = self.standby_name()
        if slot is None:
            return None
        m = self.manifest(slot)
        return None if m is None else (self.path(slot), m)

    def inactive_name(self) -> str:
        """Where the next install goes: the slot that is not active (``a`` on a device with no model)."""
        active = self.active_name()
        return other(active) if active else "a"


def read_manifest(folder: Path) -> Manifest | None:
    """The manifest stored in a slot folder, or None when it is absent or unreadable."""
    try:
        doc = parse_json((folder / MANIFEST_NAME).read_bytes(), what=str(folder / MANIFEST_NAME))
        if not isinstance(doc, dict) or not isinstance(doc.get("signed"), dict):
            return None
        return Manifest.from_signed(doc["signed"])
    except (OSError, ContractError):
        return None
