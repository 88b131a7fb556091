"""The checks of a verified package that need no model run (pure): version order, reserved names, the files of
a slot, and the device's target profile.

Decisions:
* A package for a *different model name* than the active one is accepted (a device runs one model; switching
  it is an operator decision expressed by publishing a signed package for the device's target). Only the same
  name must move forward in version (:func:`check_newer`); going back is ``rollback`` to a version the device
  already holds.
* A rollback only goes back (:func:`goes_back`): to an older version of the same model, or, when the standby
  holds another model (no version order between the two), to the one installed before the active one. After a
  rollback the standby holds the newer version; a second ``device-agent rollback`` is refused rather than
  switching forward to it again (a fleet's rollout does that, on probation: ``Updater.activate_standby``).
"""

from __future__ import annotations

import tomllib
from datetime import datetime
from pathlib import Path

from edgefleet_contracts.digest import sha256_file
from edgefleet_contracts.errors import SchemaError
from edgefleet_contracts.manifest import Manifest
from edgefleet_contracts.targets import Target
from edgefleet_contracts.versions import is_newer

from ..slots import RESERVED
from .errors import NotNewerError, ReservedNameError


def check_newer(candidate: Manifest, active: Manifest | None) -> None:
    """Raises NotNewerError when ``candidate`` does not move the same model name forward."""
    if active is not None and candidate.name == active.name and not is_newer(candidate.version, active.version):
        raise NotNewerError(f"{candidate.version} is not newer than the active {active.version} "
                            f"(model {candidate.name}); to go back to a version this device holds, roll back")


def goes_back(active: Manifest, standby: Manifest, active_installed: datetime | None,
              standby_installed: datetime | None) -> bool:
    """Is switching from ``active`` to ``standby`` a step back? Same model name: the standby's version is older.
    Two names: the standby was installed no later than the active one (what the device ran before); an unknown
    install time counts as a step back."""
    if active.name == standby.name:
        return is_newer(active.version, standby.version)
    if active_installed is None or standby_installed is None:
        return True
    return standby_installed <= active_installed


def check_reserved(manifest: Manifest) -> None:
    """Raises ReservedNameError when a payload file would collide with the agent's files inside a slot."""
    clash = sorted(set(manifest.files) & RESERVED)
    if clash:
        raise ReservedNameError(f"package lists {', '.join(clash)}, which the agent reserves inside a slot; "
                                "rename the file in the package")


def files_intact(folder: Path, manifest: Manifest) -> str | None:
    """None when every payload file in ``folder`` matches the manifest; else what differs."""
    for name, entry in sorted(manifest.files.items()):
        try:
            got = sha256_file(folder / name)
        except OSError as exc:
            return f"{name}: {exc.strerror or exc}"
        if got != entry.sha256:
            return f"{name} changed on disk (sha256 {got[:12]}…, manifest {entry.sha256[:12]}…)"
    return None


def load_device_target(path: Path) -> Target:
    """The device's copy of its target profile (``target.toml``; its name is inside, not in the file name).

    Raises SchemaError when it is missing or invalid.
    """
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SchemaError(f"cannot read the device's target profile {path}: {exc}; re-provision the device") from None
    return Target.from_dict(data, str(path))

