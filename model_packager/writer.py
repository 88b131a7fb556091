"""Writing a package archive: keyset, signed manifest, then the payload, as a reproducible uncompressed tar."""

from __future__ import annotations

import io
import json
import os
import tarfile
import tempfile
from pathlib import Path
from typing import Any

from edgefleet_contracts.atomic import fsync_dir
from edgefleet_contracts.digest import sha256_file_with_length
from edgefleet_contracts.manifest import KEYSET_NAME, MANIFEST_NAME, FileEntry

from .errors import OutputError, OutputExistsError


def file_entry(path: Path) -> FileEntry:
    """The manifest entry of a payload file: its sha256 and length, of one read. Raises OSError."""
    return FileEntry(*sha256_file_with_length(path))


def _info(name: str, size: int) -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.size = size
    ti.mode = 0o644
    ti.mtime = 0
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = ""
    return ti


def refuse_existing(out: Path, *, overwrite: bool) -> None:
    """Raises OutputExistsError when ``out`` is a folder, or exists and ``overwrite`` is False."""
    out = Path(out)
    if out.is_dir():
        raise OutputExistsError(f"{out} is a folder; give --out the path of the package file to write")
    if not overwrite and (out.exists() or out.is_symlink()):
        raise OutputExistsError(f"{out} already exists; refusing to overwrite it (pass --force to replace it)")


def check_writable(out: Path) -> None:
    """Raises OutputError when the package file ``out`` could not be created: its folder (or the nearest existing
    folder above it) does not accept a new file. Checked by creating and removing a temporary file there, which
    also holds for root and for read-only mounts, where permission bits say nothing."""
    out = Path(out)
    folder = out.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise OutputError(f"cannot write --out {out}: {folder} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write --out {out}: {folder} does not accept new files "
                          f"({exc.strerror or exc})") from None
    os.close(fd)
    os.unlink(probe)


def write_archive(
    out: Path, keyset_env: dict[str, Any], manifest_env: dict[str, Any], payload: dict[str, Path], *,
    overwrite: bool = False,
) -> None:
    """Atomically write the package: readers see no file or the whole one.

    Without ``overwrite`` an existing ``out`` is never replaced, not even one created while the package was being
    written (the finished file is linked into place, which fails if the name is taken). Raises OutputExistsError
    or OutputError (the file system refused: read-only, full, ...; the message names ``out``, never the hidden
    temporary file)."""
    out = Path(out)
    try:
        _write(out, keyset_env, manifest_env, payload, overwrite)
    except OSError as exc:
        raise OutputError(f"cannot write --out {out}: {exc.strerror or exc}; nothing was written") from exc


def _write(out: Path, keyset_env: dict[str, Any], manifest_env: dict[str, Any], payload: dict[str, Path],
           overwrite: bool) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        os.fchmod(fd, 0o644)  # a package is public; its integrity comes from the signatures
        with os.fdopen(fd, "wb") as fh:
            with tarfile.open(fileobj=fh, mode="w:", format=tarfile.PAX_FORMAT) as tar:
                for name, doc in ((KEYSET_NAME, keyset_env), (MANIFEST_NAME, manifest_env)):
                    data = (json.dumps(doc, indent=1, sort_keys=True) + "\n").encode()
                    tar.addfile(_info(name, len(data)), io.BytesIO(data))
                for name in sorted(payload):
                    src = payload[name]
                    with open(src, "rb") as sf:
                        tar.addfile(_info(name, src.stat().st_size), sf)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, out)
        else:
            _place_new(Path(tmp), out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(out.parent)


def _place_new(tmp: Path, out: Path) -> None:
    """Give the finished ``tmp`` the name ``out`` only if nothing has it. On an error the caller removes ``tmp``."""
    try:
        os.link(tmp, out)
    except FileExistsError:
        refuse_existing(out, overwrite=False)
        raise
    except OSError:  # a file system without hard links: check, then rename (not atomic against a racing writer)
        refuse_existing(out, overwrite=False)
        os.replace(tmp, out)
        return
    tmp.unlink()
