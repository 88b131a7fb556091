"""The model registry: publish verified packages, record ownership, serve packages with HTTP Range."""

from __future__ import annotations

import json
import re
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from edgefleet_contracts.archive import open_package
from edgefleet_contracts.digest import sha256_file
from edgefleet_contracts.errors import ContractError
from edgefleet_contracts.signing import load_public_key
from edgefleet_contracts.timeutil import parse_duration, utcnow

from .errors import ConflictError, NotFoundError, RequestError
from .store import Store


def publish(store: Store, packages_dir: Path, root_pub: Path, pkg: Path, *, owner: str, oncall: str,
            retrain_every: str | None = None, retrain_hook: str | None = None,
            retrain_on_drift: bool = False) -> dict[str, Any]:
    """Verify ``pkg`` against the fleet's root key and store it. Raises ContractError (why it is untrusted),
    ConflictError (version already published with other content) or RequestError."""
    if not owner or not oncall:
        raise RequestError("a model needs an owner and an on-call route (--owner, --oncall URL)")
    if not (oncall.startswith("http://") or oncall.startswith("https://")):
        raise RequestError(f"--oncall {oncall!r} must be an http(s) webhook URL")
    every = parse_duration(retrain_every).total_seconds() if retrain_every else None
    with tempfile.TemporaryDirectory(dir=packages_dir.parent if packages_dir.parent.exists() else None) as tmp:
        vp = open_package(Path(pkg), load_public_key(root_pub), now=utcnow(), staging=Path(tmp))
        m = vp.manifest
        profile = (Path(tmp) / "profile.json").read_text()
        calibration = (Path(tmp) / "calibration.json").read_text()
    data_hash = sha256_file(Path(pkg))  # streamed: a package may be hundreds of MB
    existing = store.one("SELECT sha256 FROM model_versions WHERE name = ? AND version = ?", (m.name, m.version))
    if existing is not None and existing["sha256"] != data_hash:
        raise ConflictError(f"{m.name} {m.version} is already published with different content; "
                            "publish a new version instead")
    dest = packages_dir / f"{m.name}-{m.version}.efpkg"
    packages_dir.mkdir(parents=True, exist_ok=True)
    if existing is None:
        tmp_dest = dest.with_suffix(".tmp")
        shutil.copyfile(pkg, tmp_dest)
        tmp_dest.replace(dest)
    now = time.time()
    with store.write() as c:
        c.execute(
            "INSERT INTO models (name, owner, oncall, retrain_every_s, last_retrained, retrain_hook, retrain_on_drift,"
            " created) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(name) DO UPDATE SET owner=excluded.owner,"
            " oncall=excluded.oncall, retrain_every_s=COALESCE(excluded.retrain_every_s, retrain_every_s),"
            " retrain_hook=COALESCE(excluded.retrain_hook, retrain_hook),"
            " retrain_on_drift=excluded.retrain_on_drift",
            (m.name, owner, oncall, every, m.created.timestamp(), retrain_hook, int(retrain_on_drift), now))
        # Publishing a version counts as a retraining: the cadence restarts from the newest model's creation.
        c.execute("UPDATE models SET last_retrained = MAX(COALESCE(last_retrained, 0), ?) WHERE name = ?",
                  (m.created.timestamp(), m.name))
        if existing is None:
            c.execute("INSERT INTO model_versions VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                      (m.name, m.version, m.target, data_hash, dest.stat().st_size, str(dest),
                       json.dumps(m.to_signed()), profile, calibration, now))
    return {"name": m.name, "version": m.version, "target": m.target, "sha256": data_hash,
            "length": dest.stat().st_size, "owner": owner, "oncall": oncall, "lineage": m.lineage}


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
    """``bytes=a-b`` / ``bytes=a-`` / ``bytes=-n`` -> inclusive (start, end); None for no Range.

    Raises RequestError (416) for an unsatisfiable or malformed range."""
    if not header:
        return None
    if not header.startswith("bytes=") or "," in header:
        raise RequestError(f"unsupported Range {header!r}; use a single bytes=start-end range")
    a, _, b = header[6:].partition("-")
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


__all__ = ["ContractError", "list_models", "parse_range", "profile_of", "publish", "show", "version_row"]
