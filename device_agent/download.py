"""Package downloads for rollouts: resumable, bounded by the declared length, optionally rate-limited, verified.

``download(url, folder, sha256=, length=)`` returns ``<folder>/<sha256>.efpkg``, a file of exactly ``length``
bytes whose sha256 is the one the signed desired state names. On the way:

* bytes go to ``<folder>/<sha256>.part``. A later call (after a dropped connection, a timeout, a SIGKILL)
  resumes it with ``Range: bytes=<have>-``; a server that answers 200 instead restarts it from byte 0;
* nothing past ``length`` is ever written: a ``Content-Length`` or ``Content-Range`` that disagrees with the
  desired state is refused before the body is read, and a body that runs past ``length`` is refused at the first
  byte too many (``LengthExceededError``; the partial file is discarded: that server cannot be trusted);
* ``read_timeout`` bounds a stalled server, ``max_seconds`` one attempt, ``rate_limit`` the bandwidth (bytes/s);
* the complete file is hashed; a mismatch discards it (``HashMismatchError``). A mismatch on a *resumed*
  file is retried once from byte 0 first (a partial file can be damaged by a power cut).

Errors all derive from ``DownloadError``; ``retryable`` says whether trying again later can help (network
trouble, a 5xx, a full disk) or not (the server's file is not the one desired: fix the desired state).
The package is signed, so this channel only has to be bounded and honest about length and hash; the updater
verifies everything else.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import httpx

from edgefleet_contracts.atomic import fsync_dir
from edgefleet_contracts.digest import sha256_file  # re-exported: part of this module's API

from .errors import AgentError

log = logging.getLogger(__name__)

PART_SUFFIX = ".part"
DONE_SUFFIX = ".efpkg"

__all__ = ["BadResponseError", "ContentRangeError", "DONE_SUFFIX", "DownloadError", "DownloadInterruptedError",
           "DownloadOptions", "HashMismatchError", "LengthExceededError", "NoSpaceError", "PART_SUFFIX", "download",
           "done_path", "parse_content_range", "part_path", "response_offset", "sha256_file"]


# ---- errors -------------------------------------------------------------------------------------------
class DownloadError(AgentError):
    """A package download failed; ``retryable`` says whether trying again later can help."""

    reason = "download"
    retryable = False


class DownloadInterruptedError(DownloadError):
    """The connection dropped, stalled past the read timeout, or the attempt was stopped; the partial file stays."""

    reason = "download_interrupted"
    retryable = True


class LengthExceededError(DownloadError):
    """The server sent, or declared, more bytes than the desired state's ``length``."""

    reason = "length_exceeded"


class ContentRangeError(DownloadError):
    """A Content-Range or Content-Length that does not fit the request or the declared length."""

    reason = "length_mismatch"


class HashMismatchError(DownloadError):
    """The complete file's sha256 differs from the desired state's."""

    reason = "hash_mismatch"


class BadResponseError(DownloadError):
    """An HTTP status other than 200/206 (retryable for 5xx and 429), or an unusable URL."""

    reason = "bad_response"

    def __init__(self, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.retryable = retryable


class NoSpaceError(DownloadError):
    """Not enough free disk space for the rest of the package."""

    reason = "no_space"
    retryable = True


# ---- options and the pure parts -----------------------------------------------------------------------
@dataclass(frozen=True)
class DownloadOptions:
    rate_limit: float | None = None  # bytes per second; None: as fast as the link goes
    connect_timeout: float = 10.0
    read_timeout: float = 30.0  # a server that sends nothing for this long fails the attempt
    max_seconds: float | None = None  # one attempt's wall-clock cap; None: bounded by read_timeout per chunk only
    resumes: int = 2  # immediate Range resumes within one call when the previous attempt made progress
    fsync_every: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise ValueError("rate_limit must be positive (or None for no cap)")
        if self.connect_timeout <= 0 or self.read_timeout <= 0 or self.resumes < 0:
            raise ValueError("timeouts must be positive and resumes >= 0")


_CONTENT_RANGE = re.compile(r"\Abytes ([0-9]+)-([0-9]+)/([0-9]+|\*)\Z")


def parse_content_range(text: str) -> tuple[int, int, int | None]:
    """``bytes START-END/TOTAL`` -> (start, end, total or None for ``*``). Raises ContentRangeError."""
    m = _CONTENT_RANGE.match(text.strip())
    if not m:
        raise ContentRangeError(f"server sent an unreadable Content-Range {text!r}")
    start, end = int(m.group(1)), int(m.group(2))
    total = None if m.group(3) == "*" else int(m.group(3))
    if end < start:
        raise ContentRangeError(f"server sent Content-Range {text!r} that ends before it starts")
    return start, end, total


def response_offset(status: int, headers: Mapping[str, str], have: int, length: int) -> int:
    """Where the body of this response starts in the file, after checking it fits ``length``.

    Raises LengthExceededError, ContentRangeError or BadResponseError; pure (headers are a plain mapping).
    """
    declared = headers.get("content-length")
    size = int(declared) if declared is not None and declared.isdigit() else None
    if status == 200:
        if size is not None and size > length:
            raise LengthExceededError(f"server declares {size} bytes (Content-Length) but the desired state says "
                                      f"{length}; refusing the download")
        if size is not None and size != length:
            raise ContentRangeError(f"server declares {size} bytes (Content-Length) but the desired state says "
                                    f"{length}; the server holds another file")
        return 0
    if status == 206:
        cr = headers.get("content-range")
        if cr is None:
            raise ContentRangeError("server answered 206 without a Content-Range")
        start, end, total = parse_content_range(cr)
        if (total is not None and total > length) or end >= length:
            raise LengthExceededError(f"server's Content-Range {cr!r} runs past the {length} bytes the desired state "
                                      "declares; refusing the download")
        if total is not None and total != length:
            raise ContentRangeError(f"server's Content-Range {cr!r} says the file has {total} bytes, the desired "
                                    f"state {length}")
        if start != have:
            raise ContentRangeError(f"asked for bytes {have}- but the server sent {cr!r}")
        if size is not None and size != end - start + 1:
            raise ContentRangeError(f"Content-Length {size} disagrees with Content-Range {cr!r}")
        return start
    if status == 416:
        raise BadResponseError(f"server refused the range bytes={have}- (416); the partial file is discarded",
                               retryable=True)
    raise BadResponseError(f"server answered HTTP {status}", retryable=status >= 500 or status == 429)


def part_path(folder: Path, sha256: str) -> Path:
    return Path(folder) / f"{sha256}{PART_SUFFIX}"


def done_path(folder: Path, sha256: str) -> Path:
    return Path(folder) / f"{sha256}{DONE_SUFFIX}"


# ---- the shell ----------------------------------------------------------------------------------------
def download(url: str, folder: Path, *, sha256: str, length: int, options: DownloadOptions | None = None,
             client: httpx.Client | None = None, stop: threading.Event | None = None) -> Path:
    """Fetch ``url`` into ``folder`` (see the module docstring) and return the verified complete file.

    ``stop`` (an Event) ends the attempt early with DownloadInterruptedError, keeping the partial file.
    Raises DownloadError subclasses only.
    """
    opts = options or DownloadOptions()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    done, part = done_path(folder, sha256), part_path(folder, sha256)
    if done.exists():
        if done.stat().st_size == length and sha256_file(done) == sha256:
            return done
        done.unlink()
    own = client is None
    http = client if client is not None else httpx.Client(follow_redirects=True)
    try:
        resumed = part.exists() and part.stat().st_size > 0
        _fetch_with_resumes(http, url, part, length, opts, stop)
        try:
            _check_hash(part, sha256)
        except HashMismatchError:
            if not resumed:
                raise
            log.warning("download of %s: a resumed file does not hash as desired; fetching it again from byte 0", url)
            _fetch_with_resumes(http, url, part, length, opts, stop)
            _check_hash(part, sha256)
    finally:
        if own:
            http.close()
    os.replace(part, done)
    fsync_dir(folder)
    return done


def _check_hash(part: Path, sha256: str) -> None:
    got = sha256_file(part)
    if got != sha256:
        part.unlink(missing_ok=True)
        raise HashMismatchError(f"downloaded file has sha256 {got[:16]}…, the desired state says {sha256[:16]}…; "
                                "discarded")


def _fetch_with_resumes(http: httpx.Client, url: str, part: Path, length: int, opts: DownloadOptions,
                        stop: threading.Event | None) -> None:
    for attempt in range(opts.resumes + 1):
        before = part.stat().st_size if part.exists() else 0
        try:
            _fetch(http, url, part, length, opts, stop)
            return
        except DownloadInterruptedError as exc:
            after = part.stat().st_size if part.exists() else 0
            if attempt == opts.resumes or after <= before or (stop is not None and stop.is_set()):
                raise
            log.info("download of %s interrupted at %d of %d bytes (%s); resuming", url, after, length, exc)


def _fetch(http: httpx.Client, url: str, part: Path, length: int, opts: DownloadOptions,
           stop: threading.Event | None) -> None:
    """One HTTP request continuing ``part``; returns when it holds ``length`` bytes."""
    have = part.stat().st_size if part.exists() else 0
    if have > length:
        part.unlink()
        have = 0
    if have == length:
        return
    free = shutil.disk_usage(part.parent).free
    if free < length - have:
        raise NoSpaceError(f"{length - have} bytes still to download but only {free} free in {part.parent}")
    headers = {"Accept-Encoding": "identity"}
    if have:
        headers["Range"] = f"bytes={have}-"
    timeout = httpx.Timeout(connect=opts.connect_timeout, read=opts.read_timeout, write=opts.read_timeout,
                            pool=opts.connect_timeout)
    try:
        with http.stream("GET", url, headers=headers, timeout=timeout) as resp:
            try:
                start = response_offset(resp.status_code, resp.headers, have, length)
            except BadResponseError as exc:
                if resp.status_code == 416:
                    part.unlink(missing_ok=True)
                raise exc
            # iter_raw() without a chunk size yields bytes as they arrive: nothing received is held back in a
            # buffer when the server stalls or the process is killed
            _write_body(resp.iter_raw(), part, start, length, opts, stop, url)
    except DownloadError:
        raise
    except httpx.TimeoutException as exc:
        raise DownloadInterruptedError(f"download of {url} stalled ({type(exc).__name__}: no data for "
                                       f"{opts.read_timeout:g} s); it resumes from the partial file") from None
    except httpx.TransportError as exc:
        raise DownloadInterruptedError(f"download of {url} was cut off ({type(exc).__name__}: {exc}); it resumes "
                                       "from the partial file") from None
    except (httpx.HTTPError, httpx.InvalidURL) as exc:
        raise BadResponseError(f"cannot download {url}: {exc}") from None
    except OSError as exc:
        raise DownloadError(f"cannot write {part}: {exc}") from None


def _write_body(chunks: Iterator[bytes], part: Path, start: int, length: int, opts: DownloadOptions,
                stop: threading.Event | None, url: str) -> None:
    t0 = time.monotonic()
    got = 0
    since_sync = 0
    with open(part, "r+b" if part.exists() else "wb") as fh:
        fh.seek(start)
        fh.truncate(start)
        pos = start
        for chunk in chunks:
            if pos + len(chunk) > length:
                fh.close()
                part.unlink(missing_ok=True)
                raise LengthExceededError(f"server sent more than the {length} bytes the desired state declares "
                                          f"for {url}; stopped at byte {length}, nothing kept")
            fh.write(chunk)
            pos += len(chunk)
            got += len(chunk)
            since_sync += len(chunk)
            if since_sync >= opts.fsync_every:
                fh.flush()
                os.fsync(fh.fileno())
                since_sync = 0
            elapsed = time.monotonic() - t0
            if stop is not None and stop.is_set():
                raise DownloadInterruptedError(f"download of {url} stopped at {pos} of {length} bytes")
            if opts.max_seconds is not None and elapsed > opts.max_seconds:
                raise DownloadInterruptedError(f"download of {url} took over {opts.max_seconds:g} s; stopped at "
                                               f"{pos} of {length} bytes")
            if opts.rate_limit is not None:
                ahead = got / opts.rate_limit - elapsed
                if ahead > 0:
                    if stop is not None:
                        stop.wait(ahead)
                    else:
                        time.sleep(ahead)
        fh.flush()
        os.fsync(fh.fileno())
    if pos < length:
        raise DownloadInterruptedError(f"connection to {url} ended after {pos} of {length} bytes; it resumes from "
                                       "the partial file")
