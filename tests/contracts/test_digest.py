"""The streamed file sha256 every side uses: the same hex as hashlib over the bytes, whatever the size and
wherever the chunks fall, in bounded memory; a file that cannot be read raises what ``open`` raises."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from edgefleet_contracts.digest import CHUNK_BYTES, sha256_file, sha256_file_with_length


def test_an_empty_file_hashes_as_no_bytes(tmp_path: Path) -> None:
    f = tmp_path / "empty"
    f.write_bytes(b"")
    assert sha256_file(f) == hashlib.sha256(b"").hexdigest()
    assert sha256_file_with_length(f) == (hashlib.sha256(b"").hexdigest(), 0)


@pytest.mark.parametrize("size", [1, CHUNK_BYTES - 1, CHUNK_BYTES, CHUNK_BYTES + 1, 3 * CHUNK_BYTES + 12345])
def test_a_file_of_any_size_hashes_as_hashlib_over_its_bytes(tmp_path: Path, size: int) -> None:
    data = os.urandom(size)
    f = tmp_path / "data.bin"
    f.write_bytes(data)
    assert sha256_file(f) == hashlib.sha256(data).hexdigest()
    assert sha256_file_with_length(str(f)) == (hashlib.sha256(data).hexdigest(), size)  # a str path too


def test_a_missing_file_raises_file_not_found(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        sha256_file(tmp_path / "nope")
    with pytest.raises(FileNotFoundError):
        sha256_file_with_length(tmp_path / "nope")


def test_a_folder_raises_an_os_error(tmp_path: Path) -> None:
    with pytest.raises(IsADirectoryError):
        sha256_file(tmp_path)


def test_the_agents_download_module_still_exports_its_sha256_file() -> None:
    from device_agent import download

    assert download.sha256_file is sha256_file and "sha256_file" in download.__all__
