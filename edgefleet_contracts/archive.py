"""Reading a package archive safely: verify before extracting, stream within declared lengths.

The archive is an uncompressed tar whose first member is ``keyset.json`` and second ``manifest.json``; the
signatures are checked before any payload byte is read. Each payload member must be a regular file listed in
the manifest with the same length; exactly that many bytes are read and hashed. Nothing is written outside
the staging folder; links, devices, absolute paths, ``..`` and duplicates are refused, and so are oversized
extended headers and anything after the end of the archive (``check_layout``, before ``tarfile`` reads a
byte). Uncompressed tar keeps byte ranges meaningful for resumable downloads and removes decompression bombs
from the threat model.
"""

from __future__ import annotations

import hashlib
import tarfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import IO

from .canonical import parse_json
from .errors import ContractError, ExpiredError, FileMismatchError, PackageError, SchemaError, UnsafeArchiveError
from .keyset import Keyset
from .manifest import KEYSET_NAME, MANIFEST_NAME, Manifest
from .signing import Ed25519PublicKey
from .timeutil import fmt
from .trust import check_target, verify_keyset, verify_manifest

MAX_METADATA_BYTES = 1024 * 1024
MAX_MEMBERS = 256
CHUNK = 1024 * 1024
# An extended header (PAX ``x``/``g``, GNU long name ``L``/``K``) carries a member's long name or attributes:
# a few hundred bytes. Python's tarfile reads one whole into memory before anything is verified, so a package
# padded with a 300 MB header cost 1 GB of memory to read; the layout check refuses one over this size first.
MAX_EXTENDED_HEADER = 64 * 1024
MAX_TRAILER = 64 * 1024  # zero padding after the end-of-archive blocks (tar writers pad to 10 KiB records)
_BLOCK = 512


@dataclass(frozen=True)
class VerifiedPackage:
    manifest: Manifest
    keyset: Keyset
    signer: str
    directory: Path | None  # where the payload was extracted, when a staging folder was given


def _check_member(m: tarfile.TarInfo, seen: set[str]) -> str:
    name = m.name
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith("/"):
        raise UnsafeArchiveError(f"archive member {name!r} has an absolute path")
    if ".." in p.parts:
        raise UnsafeArchiveError(f"archive member {name!r} escapes the package folder with '..'")
    if m.issym() or m.islnk():
        raise UnsafeArchiveError(f"archive member {name!r} is a link (to {m.linkname!r}); links are not allowed")
    if not m.isreg():
        raise UnsafeArchiveError(f"archive member {name!r} is not a regular file")
    norm = str(p)
    if norm in seen:
        raise UnsafeArchiveError(f"archive member {name!r} appears twice")
    seen.add(norm)
    return norm


def check_layout(path: Path) -> None:
    """Walk the tar headers of ``path`` (reading 512-byte headers only, seeking over contents) before ``tarfile``
    parses it: refuse an extended header over ``MAX_EXTENDED_HEADER`` bytes, more than ``3 * MAX_MEMBERS``
    headers, and anything after the end-of-archive blocks but zero padding (up to ``MAX_TRAILER`` bytes): no
    byte of a package goes unsigned and unread. A header it cannot read, or a file cut short, is left to
    ``tarfile`` (which names it). Raises UnsafeArchiveError, PackageError (unreadable file)."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, 2)
            offset, headers = 0, 0
            while offset + _BLOCK <= size:
                fh.seek(offset)
                block = fh.read(_BLOCK)
                if block == bytes(_BLOCK):  # end of archive: only zero padding may follow
                    tail = size - offset
                    if tail > 2 * _BLOCK + MAX_TRAILER:
                        raise UnsafeArchiveError(f"package has {tail - 2 * _BLOCK:,} bytes after the end of its "
                                                 "archive; a package holds nothing else")
                    if fh.read(tail - _BLOCK).strip(b"\0"):
                        raise UnsafeArchiveError("package has data after the end of its archive (an appended "
                                                 "member or bytes); a package holds nothing else")
                    return
                headers += 1
                if headers > 3 * MAX_MEMBERS:
                    raise UnsafeArchiveError(f"package has more than {3 * MAX_MEMBERS} tar headers")
                length = _header_size(block)
                if length is None:
                    return  # not a header tarfile can read either: it says so
                kind = block[156:157]
                if kind in (b"x", b"g", b"L", b"K") and length > MAX_EXTENDED_HEADER:
                    raise UnsafeArchiveError(f"package has a {length:,}-byte extended tar header (type "
                                             f"{kind.decode()!r}); at most {MAX_EXTENDED_HEADER:,} bytes are read")
                offset += _BLOCK + -(-length // _BLOCK) * _BLOCK
    except FileNotFoundError:
        raise PackageError(f"package {path} does not exist") from None
    except IsADirectoryError:
        raise PackageError(f"{path} is a folder, not a package file") from None
    except OSError as exc:
        raise PackageError(f"{path} is not a readable package archive: {exc.strerror or exc}") from exc


def _header_size(block: bytes) -> int | None:
    """The size field of a tar header: octal digits, or base-256 when its first byte has the high bit set."""
    field = block[124:136]
    if field[0] & 0x80:
        return int.from_bytes(field[1:], "big") if field[0] == 0x80 else None
    digits = field.strip(b" \0")
    try:
        return int(digits, 8) if digits else 0
    except ValueError:
        return None


def _read_bounded(fh: IO[bytes], length: int) -> bytes:
    try:
        data = fh.read(length)
    except tarfile.TarError as exc:  # the archive is cut short inside the member
        raise FileMismatchError(f"archive ended early: expected {length} bytes ({exc})") from None
    if len(data) != length:
        raise FileMismatchError(f"archive ended early: expected {length} bytes, got {len(data)}")
    return data


def _metadata(tar: tarfile.TarFile, expected: str, seen: set[str]) -> object:
    try:
        m = tar.next()
    except tarfile.TarError as exc:
        raise PackageError(f"package is not a readable tar archive: {exc}") from exc
    if m is None:
        raise FileMismatchError(f"package is missing {expected}")
    name = _check_member(m, seen)
    if name != expected:
        raise FileMismatchError(f"package must start with {KEYSET_NAME} then {MANIFEST_NAME}; found {name!r}")
    if m.size > MAX_METADATA_BYTES:
        raise SchemaError(f"{expected} is {m.size} bytes, over the {MAX_METADATA_BYTES}-byte limit")
    fh = tar.extractfile(m)
    assert fh is not None
    return parse_json(_read_bounded(fh, m.size), what=expected)


def open_package(
    path: Path,
    root: Ed25519PublicKey,
    *,
    now: datetime,
    target: str | None = None,
    trusted_keyset: Keyset | None = None,
    staging: Path | None = None,
) -> VerifiedPackage:
    """Verify a package archive against ``root``; when ``staging`` is given, extract the payload there.

    ``trusted_keyset`` is the newest keyset the verifier already holds. The package's own keyset (root-signed)
    is used only when it is newer; otherwise the trusted one decides, so revocations stick and an old keyset
    replayed inside a package changes nothing. ``VerifiedPackage.keyset`` is the keyset that decided.

    Raises a ContractError subclass naming what failed (see ``edgefleet_contracts.errors``); the caller owns
    ``staging`` and should delete it on error.
    """
    seen: set[str] = set()
    check_layout(path)
    try:
        tar = tarfile.open(path, mode="r:")  # noqa: SIM115 - closed by the with below
    except (tarfile.TarError, OSError) as exc:
        raise PackageError(f"{path} is not a readable package archive: {exc}") from exc
    with tar:
        carried = verify_keyset(_metadata(tar, KEYSET_NAME, seen), root, now, allow_expired=True)
        keyset = carried if trusted_keyset is None or carried.version > trusted_keyset.version else trusted_keyset
        if keyset.expires <= now:
            raise ExpiredError(f"keyset version {keyset.version} expired at {fmt(keyset.expires)}; publish a new one")
        manifest, signer = verify_manifest(_metadata(tar, MANIFEST_NAME, seen), keyset, now)
        check_target(manifest, target)
        remaining = dict(manifest.files)
        count = 2
        while True:
            try:
                m = tar.next()
            except tarfile.TarError as exc:
                raise PackageError(f"package archive is corrupt after {count} members: {exc}") from exc
            if m is None:
                break
            count += 1
            if count > MAX_MEMBERS:
                raise UnsafeArchiveError(f"package has more than {MAX_MEMBERS} members")
            name = _check_member(m, seen)
            entry = remaining.pop(name, None)
            if entry is None:
                raise FileMismatchError(f"package holds file {name!r}, which the signed manifest does not list")
            if m.size != entry.length:
                raise FileMismatchError(
                    f"file {name!r} is {m.size} bytes in the archive but the manifest says {entry.length}"
                )
            _stream_file(tar, m, name, entry.length, entry.sha256, staging)
        if remaining:
            raise FileMismatchError(f"package is missing files listed in the manifest: {', '.join(sorted(remaining))}")
    return VerifiedPackage(manifest, keyset, signer, staging)


def _stream_file(
    tar: tarfile.TarFile, m: tarfile.TarInfo, name: str, length: int, sha256: str, staging: Path | None
) -> None:
    fh = tar.extractfile(m)
    assert fh is not None
    digest = hashlib.sha256()
    out = None
    if staging is not None:
        dest = (staging / name).resolve()
        if not dest.is_relative_to(staging.resolve()):
            raise UnsafeArchiveError(f"archive member {name!r} would be written outside the staging folder")
        dest.parent.mkdir(parents=True, exist_ok=True)
        out = open(dest, "xb")  # noqa: SIM115 - closed in finally
    try:
        left = length
        while left:
            try:
                chunk = fh.read(min(CHUNK, left))
            except tarfile.TarError:  # the archive is cut short inside the member
                chunk = b""
            if not chunk:
                raise FileMismatchError(f"file {name!r} ended after {length - left} of {length} bytes")
            digest.update(chunk)
            if out is not None:
                out.write(chunk)
            left -= len(chunk)
        if out is not None:
            out.flush()
    finally:
        if out is not None:
            out.close()
    if digest.hexdigest() != sha256:
        raise FileMismatchError(
            f"file {name!r} has sha256 {digest.hexdigest()[:12]}… but the manifest says {sha256[:12]}… "
            "(the file was altered or swapped)"
        )


def carried_keyset(pkg: Path) -> object:
    """A package's ``keyset.json`` document, unverified: what a verifier holding an older keyset learns from it
    (the device's trust store, the server's publish). None when it cannot be read (``open_package`` then says
    why). Reads only the first member, bounded like ``open_package`` reads it."""
    try:
        check_layout(pkg)
        with tarfile.open(pkg, mode="r:") as tar:
            m = tar.next()
            if m is None or m.name != KEYSET_NAME or not m.isreg() or m.size > MAX_METADATA_BYTES:
                return None
            fh = tar.extractfile(m)
            return None if fh is None else parse_json(fh.read(m.size), what=KEYSET_NAME)
    except (tarfile.TarError, OSError, ContractError):
        return None
