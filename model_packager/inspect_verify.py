"""``model-packager verify`` and ``inspect``: the device's own verification, run on a workstation."""

from __future__ import annotations

import json
import tarfile
from datetime import datetime
from pathlib import Path
from typing import Any

from edgefleet_contracts.archive import VerifiedPackage, check_layout, open_package
from edgefleet_contracts.canonical import parse_json
from edgefleet_contracts.errors import PackageError, SchemaError
from edgefleet_contracts.signing import load_public_key
from edgefleet_contracts.targets import get_target
from edgefleet_contracts.timeutil import utcnow
from edgefleet_contracts.trust import verify_keyset

from .errors import InputFileError


def _existing(path: Path, what: str) -> Path:
    """``path`` when it is a file; else InputFileError saying what is missing (not a verdict on a package)."""
    path = Path(path)
    if not path.exists():
        raise InputFileError(f"{what} {path} does not exist")
    if not path.is_file():
        raise InputFileError(f"{what} {path} is not a file")
    return path


def verify(path: Path, root_pub: Path, *, target: str | None = None, keyset: Path | None = None,
           now: datetime | None = None) -> VerifiedPackage:
    """Verify ``path`` as a device would. ``keyset`` is the newest keyset the verifier knows (so a package
    carrying an older one is refused, and revocations take effect).

    Raises UnknownTargetError (``target`` is no known target; the message lists them), InputFileError (a file
    given does not exist) or ContractError subclasses (the package's verdict)."""
    if target is not None:
        get_target(target, require_supported=False)  # a typo is not a package built for another target
    _existing(path, "package file")
    _existing(root_pub, "root key")
    if keyset is not None:
        _existing(keyset, "keyset file")
    now = now or utcnow()
    root = load_public_key(root_pub)
    trusted = None
    if keyset is not None:
        trusted = verify_keyset(parse_json(Path(keyset).read_bytes(), what=str(keyset)), root, now, allow_expired=True)
    vp = open_package(Path(path), root, now=now, target=target, trusted_keyset=trusted)
    return vp


def read_manifest_unverified(path: Path) -> dict[str, Any]:
    """The manifest's ``signed`` part, without verifying it (``inspect`` says so). Raises InputFileError (no such
    file) or PackageError."""
    _existing(path, "package file")
    check_layout(path)  # an oversized extended header would be read whole by tarfile: refused first
    try:
        with tarfile.open(path, mode="r:") as tar:
            for m in tar:
                if m.name == "manifest.json" and m.isreg() and m.size < 1 << 20:
                    fh = tar.extractfile(m)
                    assert fh is not None
                    env = parse_json(fh.read(m.size), what="manifest.json")
                    if isinstance(env, dict) and isinstance(env.get("signed"), dict):
                        return dict(env["signed"])
                    raise SchemaError("manifest.json is not a signed envelope")
    except (tarfile.TarError, OSError) as exc:
        raise PackageError(f"{path} is not a readable package archive: {exc}") from exc
    raise PackageError(f"{path} has no manifest.json")


def _obj(value: Any) -> dict[str, Any]:
    """``value`` when it is a JSON object, else an empty one: ``inspect`` shows an unverified manifest, which may
    hold anything, and prints ``None`` for what is missing or malformed rather than failing."""
    return value if isinstance(value, dict) else {}


def describe(signed: dict[str, Any]) -> str:
    """A few lines on an unverified manifest; fields of the wrong type show as None."""
    ev = _obj(signed.get("evaluation"))
    q = _obj(signed.get("quantization"))
    lines = [
        f"{signed.get('name')} {signed.get('version')}  target={signed.get('target')}  runtime={signed.get('runtime')}"
        f"  kind={signed.get('kind')}",
        f"quantization: {q.get('mode')} (requested {q.get('requested')})",
        f"evaluation: accuracy={ev.get('accuracy')} delta={ev.get('accuracy_delta_points')} points "
        f"agreement={ev.get('agreement')} size_ratio={ev.get('size_ratio')}",
        f"owner: {signed.get('owner') or '-'}  created: {signed.get('created')}  expires: {signed.get('expires')}",
        "files:",
    ]
    for name, e in sorted(_obj(signed.get("files")).items(), key=lambda kv: str(kv[0])):
        e = _obj(e)
        lines.append(f"  {name:<20} {e.get('length')!s:>10}  {str(e.get('sha256'))[:16]}…")
    return "\n".join(lines)


def to_json(signed: dict[str, Any]) -> str:
    return json.dumps(signed, indent=2, sort_keys=True)
