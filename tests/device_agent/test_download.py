"""Package downloads: Range resume after a drop, a stall or a kill; never past the declared length; hash checked.

``PackageServer`` is a real HTTP server (http.server on 127.0.0.1:0, in a thread) that supports single ranges like
the fleet server's ``/packages/{name}/{version}`` and can be told to misbehave in the ways the fleet server never
does on purpose: drop the connection after N bytes (once), stall after N bytes until released, send more bytes
than the file has (with or without declaring them), lie in Content-Range, ignore Range, answer an error status.
The desired-state and probation tests use it too.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from device_agent.download import (
    BadResponseError,
    ContentRangeError,
    DownloadInterruptedError,
    DownloadOptions,
    HashMismatchError,
    LengthExceededError,
    done_path,
    download,
    parse_content_range,
    part_path,
    response_offset,
)


class PackageServer:
    """See the module docstring. ``requests`` lists (path, Range header or None) in arrival order."""

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        self.requests: list[tuple[str, str | None]] = []
        self.drop_after: int | None = None  # one-shot: close the connection once this many file bytes went out
        self.stall_after: int | None = None  # one-shot: stop sending here until ``release`` is set
        self.stalled = threading.Event()
        self.release = threading.Event()
        self.extra = b""  # sent after the file's bytes
        self.declare_extra = False  # Content-Length counts the extra bytes (else no Content-Length at all)
        self.ignore_range = False
        self.content_range: str | None = None  # sent instead of the true Content-Range
        self.status: int | None = None  # answer this status with an empty body
        self.rate: float | None = None  # bytes per second the server sends at (simulates a slow link)
        owner = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                owner._serve(self)

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def add(self, name: str, data: bytes) -> str:
        self.files[f"/packages/{name}"] = data
        return f"http://127.0.0.1:{self._httpd.server_address[1]}/packages/{name}"

    def ranges(self) -> list[str | None]:
        return [r for _, r in self.requests]

    def start(self) -> PackageServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self.release.set()
        self._httpd.shutdown()
        self._httpd.server_close()

    def __enter__(self) -> PackageServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _serve(self, h: BaseHTTPRequestHandler) -> None:
        rng = h.headers.get("Range")
        self.requests.append((h.path, rng))
        data = self.files.get(h.path)
        if self.status is not None or data is None:
            h.send_response(self.status or 404)
            h.send_header("Content-Length", "0")
            h.end_headers()
            return
        start = 0
        if rng and not self.ignore_range:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(data):
                h.send_response(416)
                h.send_header("Content-Range", f"bytes */{len(data)}")
                h.send_header("Content-Length", "0")
                h.end_headers()
                return
        partial = bool(rng) and not self.ignore_range
        body = data[start:]
        h.send_response(206 if partial else 200)
        if self.extra and not self.declare_extra:
            h.send_header("Connection", "close")  # body delimited by the connection closing
            h.close_connection = True
        else:
            h.send_header("Content-Length", str(len(body) + (len(self.extra) if self.declare_extra else 0)))
        if partial:
            h.send_header("Content-Range", self.content_range or f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        pos = start
        out = body + self.extra
        i = 0
        t0 = time.monotonic()
        while i < len(out):
            step = 8192
            if self.drop_after is not None and pos < self.drop_after <= pos + step:
                step = self.drop_after - pos
            if self.stall_after is not None and pos < self.stall_after <= pos + step:
                step = self.stall_after - pos
            try:
                h.wfile.write(out[i:i + step])
                h.wfile.flush()
            except OSError:
                return
            i += step
            pos += step
            if self.drop_after is not None and pos >= self.drop_after:
                self.drop_after = None
                h.close_connection = True
                h.connection.shutdown(2)  # the link drops mid-file
                return
            if self.stall_after is not None and pos >= self.stall_after:
                self.stall_after = None
                self.stalled.set()
                self.release.wait(60)
                h.close_connection = True
                return
            if self.rate is not None:
                ahead = i / self.rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)


@pytest.fixture
def server() -> Any:
    with PackageServer() as srv:
        yield srv


def _blob(n: int) -> bytes:
    return (hashlib.sha256(b"seed").digest() * (n // 32 + 1))[:n]


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


FAST = DownloadOptions(read_timeout=5, connect_timeout=2)


# ---- the pure checks ----------------------------------------------------------------------------------
def test_content_range_is_parsed_and_unreadable_ones_refused():
    assert parse_content_range("bytes 10-99/100") == (10, 99, 100)
    assert parse_content_range("bytes 0-0/*") == (0, 0, None)
    for bad in ("bytes 5-4/10", "10-20/30", "bytes=0-1/2"):
        with pytest.raises(ContentRangeError):
            parse_content_range(bad)


@pytest.mark.parametrize(
    ("status", "headers", "have", "error"),
    [
        (200, {"content-length": "101"}, 0, LengthExceededError),
        (200, {"content-length": "99"}, 0, ContentRangeError),
        (206, {"content-range": "bytes 10-100/101"}, 10, LengthExceededError),
        (206, {"content-range": "bytes 10-99/100", "content-length": "10"}, 10, ContentRangeError),
        (206, {"content-range": "bytes 20-99/100"}, 10, ContentRangeError),
        (206, {"content-range": "bytes 10-49/50"}, 10, ContentRangeError),
        (206, {}, 10, ContentRangeError),
        (404, {}, 0, BadResponseError),
    ],
)
def test_responses_that_disagree_with_the_declared_length_are_refused_before_the_body(status, headers, have, error):
    with pytest.raises(error):
        response_offset(status, headers, have, 100)


def test_a_matching_response_says_where_its_body_starts():
    assert response_offset(200, {"content-length": "100"}, 40, 100) == 0  # Range ignored: start over
    assert response_offset(206, {"content-range": "bytes 40-99/100", "content-length": "60"}, 40, 100) == 40
    assert BadResponseError("x", retryable=True).retryable and not BadResponseError("x").retryable


# ---- against a real HTTP server -----------------------------------------------------------------------
def test_a_dropped_connection_resumes_with_a_range_request_and_completes(server, tmp_path):
    data = _blob(300_000)
    url = server.add("p", data)
    server.drop_after = 150_000
    got = download(url, tmp_path, sha256=_sha(data), length=len(data), options=FAST)
    assert got == done_path(tmp_path, _sha(data)) and got.read_bytes() == data
    first, second = server.ranges()
    assert first is None
    start = int(second.removeprefix("bytes=").rstrip("-"))  # type: ignore[union-attr]
    assert 0 < start <= 150_000  # resumed from what had arrived, not from byte 0
    assert not part_path(tmp_path, _sha(data)).exists()


def test_a_partial_file_left_by_an_earlier_run_is_resumed(server, tmp_path):
    data = _blob(100_000)
    url = server.add("p", data)
    part_path(tmp_path, _sha(data)).write_bytes(data[:12_345])
    download(url, tmp_path, sha256=_sha(data), length=len(data), options=FAST)
    assert server.ranges() == ["bytes=12345-"]
    assert done_path(tmp_path, _sha(data)).read_bytes() == data


def test_a_stalled_server_fails_within_the_read_timeout_and_the_next_attempt_resumes(server, tmp_path):
    data = _blob(200_000)
    url = server.add("p", data)
    server.stall_after = 64_000
    t0 = time.monotonic()
    with pytest.raises(DownloadInterruptedError, match="stalled"):
        download(url, tmp_path, sha256=_sha(data), length=len(data),
                 options=DownloadOptions(read_timeout=0.5, resumes=0))
    assert time.monotonic() - t0 < 5
    have = part_path(tmp_path, _sha(data)).stat().st_size
    assert 0 < have <= 64_000
    server.release.set()
    download(url, tmp_path, sha256=_sha(data), length=len(data), options=FAST)
    assert server.ranges()[-1] == f"bytes={have}-"
    assert done_path(tmp_path, _sha(data)).read_bytes() == data


def test_a_server_sending_more_than_the_declared_length_is_stopped_and_nothing_is_kept(server, tmp_path):
    data = _blob(50_000)
    url = server.add("p", data)
    server.extra = b"X" * 20_000  # no Content-Length: the body runs on until the connection closes
    with pytest.raises(LengthExceededError, match="more than the 50000 bytes"):
        download(url, tmp_path, sha256=_sha(data), length=len(data), options=FAST)
    assert list(tmp_path.iterdir()) == []


def test_a_declared_length_over_the_desired_one_is_refused_before_reading(server, tmp_path):
    data = _blob(50_000)
    url = server.add("p", data)
    server.extra, server.declare_extra = b"X" * 10, True
    with pytest.raises(LengthExceededError, match="declares 50010 bytes"):
        download(url, tmp_path, sha256=_sha(data), length=len(data), options=FAST)
    assert not any(p.stat().st_size for p in tmp_path.iterdir())


def test_a_content_range_that_does_not_match_the_request_is_refused(server, tmp_path):
    data = _blob(50_000)
    url = server.add("p", data)
    part_path(tmp_path, _sha(data)).write_bytes(data[:1000])
    server.content_range = "bytes 0-49999/50000"  # answers 206 but from the wrong offset
    with pytest.raises(ContentRangeError, match="asked for bytes 1000-"):
        download(url, tmp_path, sha256=_sha(data), length=len(data), options=FAST)
    assert part_path(tmp_path, _sha(data)).read_bytes() == data[:1000]  # untouched


def test_a_hash_mismatch_discards_the_file(server, tmp_path):
    data = _blob(40_000)
    url = server.add("p", data)
    wanted = _sha(b"another file")
    with pytest.raises(HashMismatchError, match="discarded"):
        download(url, tmp_path, sha256=wanted, length=len(data), options=FAST)
    assert list(tmp_path.iterdir()) == []


def test_a_damaged_partial_file_is_fetched_again_from_byte_zero(server, tmp_path):
    data = _blob(40_000)
    url = server.add("p", data)
    part_path(tmp_path, _sha(data)).write_bytes(b"\0" * 5000)  # e.g. what a power cut can leave
    download(url, tmp_path, sha256=_sha(data), length=len(data), options=FAST)
    assert server.ranges() == ["bytes=5000-", None]
    assert done_path(tmp_path, _sha(data)).read_bytes() == data


def test_a_server_that_ignores_range_restarts_the_file(server, tmp_path):
    data = _blob(40_000)
    url = server.add("p", data)
    part_path(tmp_path, _sha(data)).write_bytes(data[:7000])
    server.ignore_range = True
    download(url, tmp_path, sha256=_sha(data), length=len(data), options=FAST)
    assert done_path(tmp_path, _sha(data)).read_bytes() == data


def test_the_bandwidth_cap_is_respected(server, tmp_path):
    data = _blob(60_000)
    url = server.add("p", data)
    t0 = time.monotonic()
    download(url, tmp_path, sha256=_sha(data), length=len(data), options=DownloadOptions(rate_limit=150_000))
    assert time.monotonic() - t0 >= 0.3  # 60 kB at 150 kB/s: at least 0.4 s minus the first chunk


@pytest.mark.parametrize(("status", "retryable"), [(404, False), (503, True)])
def test_error_statuses_say_whether_a_retry_can_help(server, tmp_path, status, retryable):
    url = server.add("p", b"x")
    server.status = status
    with pytest.raises(BadResponseError, match=f"HTTP {status}") as err:
        download(url, tmp_path, sha256=_sha(b"x"), length=1, options=FAST)
    assert err.value.retryable is retryable


def test_an_already_complete_file_is_not_downloaded_again(server, tmp_path):
    data = _blob(10_000)
    url = server.add("p", data)
    done_path(tmp_path, _sha(data)).write_bytes(data)
    assert download(url, tmp_path, sha256=_sha(data), length=len(data)).read_bytes() == data
    assert server.requests == []
    os.truncate(done_path(tmp_path, _sha(data)), 10)  # damaged: fetched again
    assert download(url, tmp_path, sha256=_sha(data), length=len(data), options=FAST).read_bytes() == data
    assert server.ranges() == [None]


def test_stopping_keeps_the_partial_file(server, tmp_path):
    data = _blob(400_000)
    url = server.add("p", data)
    server.rate = 200_000
    stop = threading.Event()
    threading.Timer(0.4, stop.set).start()
    with pytest.raises(DownloadInterruptedError, match="stopped"):
        download(url, tmp_path, sha256=_sha(data), length=len(data), options=FAST, stop=stop)
    assert 0 < part_path(tmp_path, _sha(data)).stat().st_size < len(data)
