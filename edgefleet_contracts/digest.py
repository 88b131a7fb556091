"""The sha256 of a file, streamed: one definition for every side that hashes a file on disk.

The packager hashes payload files (the manifest's ``files``) and calibration data (lineage), the agent hashes
downloads and the payload files of a slot, the server's backup hashes copied packages. All of them mean the
same thing by "the file's sha256": the lowercase hex sha256 of its bytes from first to last.

Decisions:

* The file is read in 1 MiB chunks into one reused buffer, so memory stays flat whatever the size (a package
  can be hundreds of MB on a device with little RAM) and no bytes object is made per chunk.
* This is ``hashlib.file_digest`` (3.11) with the length counted too. ``file_digest`` itself is not called: its
  buffer size (256 KiB) is settable only through a private argument, and it does not give the length. The
  length is that of the bytes hashed, so a caller that needs both (a manifest ``FileEntry``) gets the two from
  one read instead of a hash and a later ``stat``.
* Errors are the ones ``open`` and ``read`` raise, untranslated (``FileNotFoundError``, ``PermissionError``,
  ``IsADirectoryError``, other ``OSError``): each caller already says what a missing file means to it.
* Bytes already in memory are hashed with ``hashlib.sha256(data)`` where they are; only files come here.
"""

from __future__ import annotations

import hashlib
import os

__all__ = ["CHUNK_BYTES", "sha256_file", "sha256_file_with_length"]

CHUNK_BYTES = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """The lowercase hex sha256 of the file at ``path``, read in chunks.

    Raises OSError (FileNotFoundError, PermissionError, IsADirectoryError, ...) when it cannot be read.
    """
    return sha256_file_with_length(path)[0]


def sha256_file_with_length(path: str | os.PathLike[str]) -> tuple[str, int]:
    """(lowercase hex sha256, length in bytes) of the file at ``path``, both of the same single read.

    Raises OSError (FileNotFoundError, PermissionError, IsADirectoryError, ...) when it cannot be read.
    """
    h = hashlib.sha256()
    length = 0
    buf = bytearray(CHUNK_BYTES)
    with open(path, "rb") as fh, memoryview(buf) as view:
        while size := fh.readinto(buf):
            h.update(view[:size])
            length += size
    return h.hexdigest(), length
