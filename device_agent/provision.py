"""``device-agent provision``: create a device folder (config, target profile, keys, trust store, first model).

The folder is built in a temporary sibling (``.<name>.provision-*``) and renamed into place only when it is
complete, so a failed or interrupted provisioning never leaves a half-provisioned device. With ``force`` an
existing *device* folder is replaced the same way (rename the old one aside, rename the new one in, delete the
old one); a folder that is not a device folder is never replaced, even with ``force``.

With a package, the package is installed through the updater into the new folder before it is renamed into
place, so the device serves from first boot with no network.

The device key is generated here; provisioning on the device itself keeps it from ever leaving the device.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from edgefleet_contracts.atomic import atomic_write_bytes, fsync_dir
from edgefleet_contracts.errors import SchemaError
from edgefleet_contracts.signing import Ed25519PublicKey, generate_key, key_id, save_private_key, save_public_key
from edgefleet_contracts.tags import parse_tag as _parse_tag
from edgefleet_contracts.targets import default_targets_dir, get_target
from edgefleet_contracts.timeutil import utcnow

from .config import ConfigError, DeviceConfig, DeviceDir
from .errors import AgentError
from .slots import fsync_tree
from .trust_store import TrustStore, TrustStoreError, load_pinned_key
from .updater import InstallResult, Updater

__all__ = ["AlreadyProvisionedError", "ProvisionError", "ProvisionRequest", "ProvisionResult", "parse_tag",
           "provision"]


class ProvisionError(AgentError):
    """Provisioning cannot go ahead (bad key file, bad tag, destination unusable, first package refused)."""

    reason = "provision"

    def __init__(self, message: str, *, reason: str | None = None) -> None:
        super().__init__(message)
        if reason is not None:
            self.reason = reason


class AlreadyProvisionedError(ProvisionError):
    """The folder already holds a device; replacing it needs ``--force``."""

    reason = "already_provisioned"


def parse_tag(text: str) -> tuple[str, str]:
    """``key=value`` -> (key, value) by the tag contract (:mod:`edgefleet_contracts.tags`), so the device is
    written only tags the fleet server can store and filter on: split at the first ``=``, the value may be
    empty or hold ``=``. Nothing is stripped any more: ``site = ward-3`` is refused (edge whitespace) rather
    than quietly provisioned as ``site=ward-3``, and a control character (a newline would break
    ``config.toml``) is refused before any folder is made. Raises ProvisionError (reason ``bad_tag``)."""
    try:
        return _parse_tag(text)
    except SchemaError as exc:
        raise ProvisionError(f"{exc} (e.g. --tag site=ward-3)", reason="bad_tag") from None


@dataclass(frozen=True)
class ProvisionRequest:
    directory: Path
    device_id: str
    target: str
    root_key: Path
    fleet_key: Path
    fleet: str = "default"
    broker: str = ""
    server: str = ""
    tags: Mapping[str, str] = field(default_factory=dict)
    package: Path | None = None
    force: bool = False


@dataclass(frozen=True)
class ProvisionResult:
    device: DeviceDir
    config: DeviceConfig
    device_key_id: str
    install: InstallResult | None


def provision(req: ProvisionRequest, *, clock: Callable[[], datetime] = utcnow,
              targets_dir: Path | None = None) -> ProvisionResult:
    """Write a complete device folder at ``req.directory``.

    Raises UnknownTargetError (lists the known targets), UnsupportedTargetError (with the profile's reason),
    ConfigError, ProvisionError (bad key file: ``bad_key``; folder exists: ``already_provisioned``; first
    package refused: the package's reason).
    """
    tdir = targets_dir or default_targets_dir()
    target = get_target(req.target, tdir)
    root = _key(req.root_key, "--root-key (root public key)")
    fleet = _key(req.fleet_key, "--fleet-key (fleet public key)")
    if key_id(root) == key_id(fleet):
        raise ProvisionError("--root-key and --fleet-key are the same key; the offline root key must not also "
                             "sign desired-state commands", reason="bad_key")
    cfg = DeviceConfig(device_id=req.device_id, target=target.name, fleet=req.fleet, broker=req.broker,
                       server=req.server, tags=dict(req.tags))
    dest = Path(req.directory).absolute()
    _check_destination(dest, req.force)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.provision-", dir=dest.parent))
    try:
        d = DeviceDir(tmp)
        d.save_config(cfg)
        atomic_write_bytes(d.target_file, (tdir / f"{target.name}.toml").read_bytes())
        d.keys.mkdir(mode=0o700)
        device_key = generate_key()
        save_private_key(device_key, d.device_key)
        save_public_key(device_key.public_key(), d.device_pub)
        save_public_key(root, d.root_pub)
        save_public_key(fleet, d.fleet_pub)
        TrustStore.initialise(d, clock())
        d.slots.mkdir()
        installed = None
        if req.package is not None:
            installed = Updater(d, clock=clock).install(Path(req.package))
            if not installed.ok:
                raise ProvisionError(f"first package {req.package} was {installed.status}: {installed.message}",
                                     reason=installed.reason)
        os.chmod(tmp, 0o750)
        fsync_tree(tmp)
        _swap_into_place(tmp, dest)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ProvisionResult(DeviceDir(dest), cfg, key_id(device_key.public_key()), installed)


def _key(path: Path, what: str) -> Ed25519PublicKey:
    try:
        return load_pinned_key(Path(path), what)
    except TrustStoreError as exc:
        raise ProvisionError(str(exc), reason="bad_key") from None


def _check_destination(dest: Path, force: bool) -> None:
    if not dest.exists():
        return
    if not dest.is_dir():
        raise ProvisionError(f"{dest} exists and is not a folder; choose another --dir")
    if not any(dest.iterdir()):
        return
    cfg = DeviceDir(dest).config_file
    if not cfg.exists():
        raise ProvisionError(f"{dest} is not empty and is not a device folder (no config.toml); refusing to "
                             "replace it, even with --force; choose an empty or new --dir")
    if not force:
        try:
            who = f" as device {DeviceDir(dest).load_config().device_id}"
        except ConfigError:
            who = ""
        raise AlreadyProvisionedError(
            f"{dest} is already provisioned{who}; pass --force to replace it (the device gets a new key and "
            "loses its models and queued summaries; re-enrol it on the fleet server)")


def _swap_into_place(tmp: Path, dest: Path) -> None:
    """Rename the finished folder to ``dest``; an existing ``dest`` is renamed aside first, then deleted.

    At every instant ``dest`` is the old complete folder, absent, or the new complete folder.
    """
    parent = dest.parent
    old: Path | None = None
    if dest.exists():
        if any(dest.iterdir()):
            old = parent / f".{dest.name}.replaced-{uuid.uuid4().hex[:8]}"
            os.rename(dest, old)
        else:
            os.rmdir(dest)
    os.rename(tmp, dest)
    fsync_dir(parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
