"""The model registry: publish verified packages, record ownership, serve packages with HTTP Range.

Trust: the server judges a package by the rules a device applies (``edgefleet_contracts.open_package``): the
keyset chains to the pinned root, the newest keyset the server has verified decides (a package carrying an older
one is judged by it, so a revocation the server has seen sticks), and a revoked or expired signing key, an
expired keyset or package is refused. That newest keyset is ``keys/keyset.json`` in the data folder (the root-signed
envelope as the package carried it, 0644, written atomically, re-verified against the root key on every read). It
moves only forward, and only after a package that carries a newer one has fully verified and is being published.
A data folder that has none yet (published before the server kept one, or the file removed) starts from the newest
keyset among the packages it has published. Publishes hold an exclusive lock of ``keys/``, so two of them
cannot move the keyset backwards or publish past a revocation the other is recording.

A version stays published when the server later learns a keyset that revokes its signing key (or when it or its
key expires), and devices holding that keyset refuse to install it. :func:`judge_published` applies the publish
rule again, today, to a stored package: what rollouts and rollbacks ask before they send devices to a version.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from edgefleet_contracts.archive import VerifiedPackage, carried_keyset, open_package
from edgefleet_contracts.atomic import atomic_write_text, fsync_dir
from edgefleet_contracts.canonical import parse_json
from edgefleet_contracts.digest import sha256_file
from edgefleet_contracts.errors import ContractError, ExpiredError, PackageError, SchemaError, SignatureError
from edgefleet_contracts.keyset import Keyset
from edgefleet_contracts.manifest import Manifest
from edgefleet_contracts.signing import Ed25519PublicKey, load_public_key
from edgefleet_contracts.timeutil import parse_duration, utcnow
from edgefleet_contracts.trust import verify_keyset

from .errors import ConfigError, ConflictError, NotFoundError, RequestError
from .store import Store

KEYSET_FILE = "keyset.json"  # in the data folder's keys/: the newest keyset the server has verified
KEYSET_MODE = 0o644  # root-signed and public: every package carries one
PACKAGE_MODE = 0o644  # a package is public; its integrity comes from the signatures


def keyset_path(packages_dir: Path) -> Path:
    """Where the server keeps the newest keyset it has verified: ``<data>/keys/keyset.json``."""
    return Path(packages_dir).parent / "keys" / KEYSET_FILE


@dataclass(frozen=True)
class HeldKeyset:
    """The newest keyset the server has verified and its root-signed envelope."""

    keyset: Keyset
    envelope: dict[str, Any]
    stored: bool  # False when it was found in a published package, not in keys/keyset.json


def newer_keyset(held: HeldKeyset | None, keyset: Keyset) -> bool:
    """True when ``keyset`` (of a package that fully verified) should replace the held one: keysets move forward."""
    return held is None or keyset.version > held.keyset.version


def held_keyset(store: Store, packages_dir: Path, root: Ed25519PublicKey, now: datetime) -> HeldKeyset | None:
    """The newest keyset this server has verified: ``keys/keyset.json``, else the newest carried by a package it
    has published (a data folder from before the server kept the file), else None.

    Raises ConfigError when ``keys/keyset.json`` exists but is unreadable or does not verify against ``root``."""
    path = keyset_path(packages_dir)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return _newest_published_keyset(store, packages_dir, root, now)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc}") from None
    try:
        envelope = parse_json(data, what=str(path))
        ks = verify_keyset(envelope, root, now, allow_expired=True)
    except ContractError as exc:
        raise ConfigError(f"{path} does not verify against the fleet's root key ({exc}); restore it from a "
                          "backup, or remove it and the server starts again from its published packages' newest "
                          "keyset") from None
    assert isinstance(envelope, dict)  # verify_keyset accepted it
    return HeldKeyset(ks, envelope, stored=True)


def _newest_published_keyset(store: Store, packages_dir: Path, root: Ed25519PublicKey,
                             now: datetime) -> HeldKeyset | None:
    best: HeldKeyset | None = None
    for row in store.query("SELECT path FROM model_versions"):
        envelope = carried_keyset(packages_dir / Path(row["path"]).name)
        try:
            ks = verify_keyset(envelope, root, now, allow_expired=True)
        except ContractError:
            continue  # a package the root does not vouch for teaches nothing
        if isinstance(envelope, dict) and (best is None or ks.version > best.keyset.version):
            best = HeldKeyset(ks, envelope, stored=False)
    return best


@contextlib.contextmanager
def _publishing(keys_dir: Path) -> Iterator[None]:
    """An exclusive lock of the data folder's ``keys/`` for one publish (created 0700 when missing)."""
    keys_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd = os.open(keys_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@dataclass(frozen=True)
class ModelSettings:
    """A model's registry settings as one publish gives them: None is "not given" (keep what is stored)."""

    owner: str | None = None
    oncall: str | None = None
    retrain_every_s: float | None = None  # 0: clear the cadence
    retrain_hook: str | None = None  # "": clear the hook
    retrain_on_drift: bool | None = None

    @classmethod
    def given(cls, owner: str | None, oncall: str | None, retrain_every: str | None, retrain_hook: str | None,
              retrain_on_drift: bool | None) -> ModelSettings:
        """Validate the settings given to one publish. Raises RequestError naming the bad one."""
        if owner is not None and not owner.strip():
            raise RequestError("--owner must name the model's owner (a team or a person)")
        if oncall is not None and not (oncall.startswith("http://") or oncall.startswith("https://")):
            raise RequestError(f"--oncall {oncall!r} must be an http(s) webhook URL")
        every = None
        if retrain_every is not None:
            try:
                every = parse_duration(retrain_every).total_seconds() if retrain_every else 0.0
            except ContractError as exc:
                raise RequestError(f"--retrain-every: {exc} (or \"\" to clear the cadence)") from None
        return cls(owner, oncall, every, retrain_hook, retrain_on_drift)

    def merged(self, stored: Any | None, name: str) -> dict[str, Any]:
        """The model row after this publish: given settings replace ``stored`` ones, the rest stay; a model's
        first publish takes the defaults. Raises RequestError when a first publish lacks owner or on-call."""
        if stored is None and (self.owner is None or self.oncall is None):
            raise RequestError(f"{name} is published for the first time: it needs an owner and an on-call route "
                               "(--owner, --oncall URL)")

        def pick(given: Any, column: str, default: Any) -> Any:
            if given is not None:
                return given
            return default if stored is None else stored[column]

        every = pick(self.retrain_every_s, "retrain_every_s", None)
        hook = pick(self.retrain_hook, "retrain_hook", None)
        return {"owner": pick(self.owner, "owner", None), "oncall": pick(self.oncall, "oncall", None),
                "retrain_every_s": every or None, "retrain_hook": hook or None,
                "retrain_on_drift": bool(pick(self.retrain_on_drift, "retrain_on_drift", False))}


def publish(store: Store, packages_dir: Path, root_pub: Path, pkg: Path, *, owner: str | None = None,
            oncall: str | None = None, retrain_every: str | None = None, retrain_hook: str | None = None,
            retrain_on_drift: bool | None = None) -> dict[str, Any]:
    """Verify ``pkg`` as a device would and store it (module docstring: which keyset decides).

    Model settings: a setting given to this publish (not None) replaces the stored one; a setting left out (None)
    keeps what the model has; a model's first publish needs ``owner`` and ``oncall`` and takes the defaults for the
    rest (no cadence, no hook, no retraining on drift). ``retrain_every=""`` and ``retrain_hook=""`` clear the
    cadence and the hook; ``retrain_on_drift=False`` turns retraining on drift off. The same rule holds for a new
    version and for the same version published again.

    The package is copied into the data folder first and everything is decided on that copy, so the bytes stored
    are the bytes verified. A refused publish leaves nothing behind: no package, no row, no keyset.

    Raises ContractError (why the package is untrusted: its ``reason`` is ``revoked_key``, ``expired``, ...),
    ConflictError (version already published with other content), RequestError (a bad or missing setting) or
    ConfigError (the stored keyset is unusable)."""
    given = ModelSettings.given(owner, oncall, retrain_every, retrain_hook, retrain_on_drift)
    root = load_public_key(root_pub)
    packages_dir = Path(packages_dir)
    packages_dir.mkdir(parents=True, exist_ok=True)
    keyset_file = keyset_path(packages_dir)
    now = utcnow()
    pkg = Path(pkg)
    if not pkg.exists():
        raise PackageError(f"package {pkg} does not exist")
    if pkg.is_dir():
        raise PackageError(f"{pkg} is a folder, not a package file")
    with _publishing(keyset_file.parent), tempfile.TemporaryDirectory(dir=packages_dir.parent) as tmp:
        copy = Path(tmp) / "package.efpkg"
        shutil.copyfile(pkg, copy)
        held = held_keyset(store, packages_dir, root, now)
        try:
            vp = _open_as_device(copy, root, held, now, staging=Path(tmp) / "payload")
        except ContractError as exc:  # named by the file the operator gave, not the copy being checked
            raise type(exc)(str(exc).replace(str(copy), str(pkg))) from None
        m = vp.manifest
        profile = (Path(tmp) / "payload" / "profile.json").read_text()
        calibration = (Path(tmp) / "payload" / "calibration.json").read_text()
        data_hash = sha256_file(copy)
        existing = store.one("SELECT sha256 FROM model_versions WHERE name = ? AND version = ?",
                             (m.name, m.version))
        if existing is not None and existing["sha256"] != data_hash:
            raise ConflictError(f"{m.name} {m.version} is already published with different content; "
                                "publish a new version instead")
        given.merged(store.one("SELECT * FROM models WHERE name = ?", (m.name,)), m.name)  # first publish: owner?
        # Everything is decided: from here on the publish is recorded.
        if newer_keyset(held, vp.keyset):
            envelope = carried_keyset(copy)  # the document open_package just verified: this copy is ours alone
            assert isinstance(envelope, dict)
            _store_keyset(keyset_file, envelope)
        elif held is not None and not held.stored:
            _store_keyset(keyset_file, held.envelope)
        dest = packages_dir / f"{m.name}-{m.version}.efpkg"
        if existing is None:
            copy.chmod(PACKAGE_MODE)
            with open(copy, "rb") as fh:
                os.fsync(fh.fileno())
            copy.replace(dest)
            fsync_dir(packages_dir)
        row = _record(store, m, given, existing is None, dest, data_hash, profile, calibration)
    return {"name": m.name, "version": m.version, "target": m.target, "sha256": data_hash,
            "length": dest.stat().st_size, "keyset_version": vp.keyset.version, **row, "lineage": m.lineage}


def _open_as_device(pkg: Path, root: Ed25519PublicKey, held: HeldKeyset | None, now: datetime, *,
                    staging: Path | None = None) -> VerifiedPackage:
    """``open_package`` as a device holding ``held`` runs it: the one rule publish and :func:`judge_published`
    apply. Raises ContractError; a signature or expiry refusal names the keyset that decided."""
    try:
        return open_package(pkg, root, now=now, trusted_keyset=held.keyset if held else None, staging=staging)
    except (SignatureError, ExpiredError) as exc:
        if held is None:
            raise
        raise type(exc)(f"{exc} (judged by keyset version {held.keyset.version}, the newest this server has "
                        "verified)") from None


def judge_published(store: Store, packages_dir: Path, root_pub: Path, name: str, version: str,
                    now: datetime | None = None) -> VerifiedPackage:
    """Would a device holding the newest keyset this server has verified install published ``name`` ``version``
    at ``now``? The publish rule applied again to the stored package: its signing key live in that keyset, not
    revoked, not expired; the keyset and the package not expired; its files as signed. A version published before
    the server learnt of a keyset that revokes its key is refused here, though its publish was accepted.

    Reads the whole package (its files are hashed, as a device hashes them): about 60 ms for 40 MB. Returns the
    verified package (``keyset`` is the keyset that decided).

    Raises NotFoundError (not published), ContractError (devices refuse it: ``reason`` is ``revoked_key``,
    ``expired``, ``untrusted_key``, ``file_mismatch``, ...; the message names the version and the keyset that
    decided), ConfigError (the root key ``root_pub`` or the stored keyset is unusable)."""
    row = version_row(store, name, version)
    now = now or utcnow()
    try:
        root = load_public_key(root_pub)
    except (OSError, SchemaError) as exc:
        raise ConfigError(f"cannot judge {name} {version}: the fleet's root key {root_pub} is unusable ({exc}); "
                          "restore it from the packager's key folder (keys/root.pub)") from None
    packages_dir = Path(packages_dir)
    held = held_keyset(store, packages_dir, root, now)
    try:
        return _open_as_device(packages_dir / Path(row["path"]).name, root, held, now)
    except ContractError as exc:
        raise type(exc)(f"devices refuse {name} {version}: {exc}") from None


def _record(store: Store, m: Manifest, given: ModelSettings, new_version: bool, dest: Path, data_hash: str,
            profile: str, calibration: str) -> dict[str, Any]:
    """Write the model row (settings merged) and the version row in one transaction; the merged settings."""
    now = time.time()
    with store.write() as c:
        stored = c.execute("SELECT * FROM models WHERE name = ?", (m.name,)).fetchone()
        row = given.merged(stored, m.name)
        values = (row["owner"], row["oncall"], row["retrain_every_s"], row["retrain_hook"],
                  int(row["retrain_on_drift"]))
        if stored is None:
            c.execute("INSERT INTO models (owner, oncall, retrain_every_s, retrain_hook, retrain_on_drift, name,"
                      " last_retrained, created) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                      (*values, m.name, m.created.timestamp(), now))
        else:
            c.execute("UPDATE models SET owner = ?, oncall = ?, retrain_every_s = ?, retrain_hook = ?,"
                      " retrain_on_drift = ? WHERE name = ?", (*values, m.name))
        # Publishing a version counts as a retraining: the cadence restarts from the newest model's creation.
        c.execute("UPDATE models SET last_retrained = MAX(COALESCE(last_retrained, 0), ?) WHERE name = ?",
                  (m.created.timestamp(), m.name))
        if new_version:
            c.execute("INSERT INTO model_versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (m.name, m.version, m.target, data_hash, dest.stat().st_size, str(dest),
                       json.dumps(m.to_signed()), profile, calibration, now))
    return row


def _store_keyset(path: Path, envelope: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(envelope, indent=2, sort_keys=True) + "\n", mode=KEYSET_MODE)


def version_row(store: Store, name: str, version: str) -> Any:
    row = store.one("SELECT * FROM model_versions WHERE name = ? AND version = ?", (name, version))
    if row is None:
        raise NotFoundError(f"model {name} version {version} is not published")
    return row


# the lineage is read out of the manifest by SQLite: the rest of the signed manifest is not decoded per version
_VERSION_COLUMNS = ("name, version, target, sha256, length, published,"
                    " json_extract(manifest, '$.lineage') AS lineage")


def show(store: Store, name: str) -> dict[str, Any]:
    """One model: owner, on-call route, retraining cadence, alert rules and its versions. Raises NotFoundError."""
    m = store.one("SELECT * FROM models WHERE name = ?", (name,))
    if m is None:
        known = [r["name"] for r in store.query("SELECT name FROM models ORDER BY name")]
        raise NotFoundError(f"unknown model {name!r}; known: {', '.join(known) or 'none'}")
    return _model_doc(m, [_version_doc(r) for r in store.query(
        f"SELECT {_VERSION_COLUMNS} FROM model_versions WHERE name = ? ORDER BY published", (name,))])


def list_models(store: Store, *, limit: int | None = None, after: str | None = None) -> list[dict[str, Any]]:
    """Models as ``show`` gives them, in name order, past the name ``after`` (exclusive), at most ``limit`` (all
    when None). Two queries for the whole page, not two per model."""
    sql = "SELECT * FROM models" + (" WHERE name > ?" if after is not None else "") + " ORDER BY name"
    args: tuple[Any, ...] = () if after is None else (after,)
    if limit is not None:
        sql, args = sql + " LIMIT ?", (*args, limit)
    models = store.query(sql, args)
    if not models:
        return []
    versions: dict[str, list[dict[str, Any]]] = {}
    # the page is a contiguous run of names: its versions are one range of the (name, version) key
    for r in store.query(f"SELECT {_VERSION_COLUMNS} FROM model_versions WHERE name BETWEEN ? AND ?"
                         " ORDER BY name, published", (models[0]["name"], models[-1]["name"])):
        versions.setdefault(r["name"], []).append(_version_doc(r))
    return [_model_doc(m, versions.get(m["name"], [])) for m in models]


def _version_doc(r: Any) -> dict[str, Any]:
    return {"version": r["version"], "target": r["target"], "sha256": r["sha256"], "length": r["length"],
            "published": r["published"], "lineage": json.loads(r["lineage"]) if r["lineage"] else {}}


def _model_doc(m: Any, versions: list[dict[str, Any]]) -> dict[str, Any]:
    due = (m["last_retrained"] + m["retrain_every_s"]) if m["retrain_every_s"] and m["last_retrained"] else None
    return {
        "name": m["name"], "owner": m["owner"], "oncall": m["oncall"], "retrain_every_s": m["retrain_every_s"],
        "last_retrained": m["last_retrained"], "retrain_due": due,
        "retrain_overdue": bool(due is not None and due < time.time()), "retrain_hook": m["retrain_hook"],
        "retrain_on_drift": bool(m["retrain_on_drift"]), "alert_rules": json.loads(m["alert_rules"]),
        "versions": versions,
    }


_RANGE_NUMBERS = re.compile(r"[0-9]{0,18}-[0-9]{0,18}")


def parse_range(header: str | None, length: int) -> tuple[int, int] | None:
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` -> inclusive (start, end); None for no Range, and for one this
    server ignores as RFC 9110 lets it (section 14.2): another unit than ``bytes`` (which it must ignore) or
    several ranges (the whole package is then sent, 200, which a resuming client handles).

    Raises RequestError (416) for an unsatisfiable or malformed single byte range."""
    if not header:
        return None
    unit, eq, _ = header.partition("=")
    if not eq or unit.strip().lower() != "bytes" or "," in header:
        return None
    a, _, b = header[len(unit) + 1:].partition("-")
    if not _RANGE_NUMBERS.fullmatch(f"{a}-{b}") or (a == "" and b == ""):
        # RFC 9110: ASCII digits only (int() would also take '1_0', ' 5' or Arabic-Indic digits)
        raise RequestError(f"malformed Range {header!r}")
    if a == "":
        start, end = max(0, length - int(b)), length - 1
    else:
        start = int(a)
        end = int(b) if b else length - 1
    end = min(end, length - 1)
    if start > end or start >= length:
        raise RequestError(f"Range {header!r} is outside the {length}-byte package")
    return start, end


def profile_of(store: Store, name: str, version: str) -> tuple[dict[str, Any], dict[str, Any]]:
    row = version_row(store, name, version)
    return json.loads(row["profile"]), json.loads(row["calibration"])


__all__ = ["KEYSET_FILE", "ContractError", "HeldKeyset", "ModelSettings", "carried_keyset", "held_keyset",
           "judge_published", "keyset_path", "list_models", "newer_keyset", "parse_range", "profile_of", "publish",
           "show", "version_row"]
