"""Hostile input on the local HTTP API: every one a clear 4xx and a counter, never a 500, a crash or gigabytes.

Real agents and real packages (the ``built`` and ``vision_built`` fixtures); bodies go through the ASGI app
(TestClient, or the raw ASGI protocol where the test must see how much of a streamed body the app reads).
"""

from __future__ import annotations

import asyncio
import base64
import json
import struct
import zlib
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np
import pytest
from fastapi.testclient import TestClient

from device_agent import imaging
from device_agent.agent import Agent
from device_agent.config import DeviceConfig
from device_agent.errors import InputError
from device_agent.http_api import create_app
from device_agent.model import load_model
from edgefleet_contracts.targets import get_target
from tests.conftest import extract

TARGET = get_target("x86_64-avx2")


@pytest.fixture()
def camera(vision_built, tmp_path) -> Iterator[Agent]:
    model = load_model(extract(vision_built.package, tmp_path / "slot", vision_built.keys / "root.pub"), TARGET)
    a = Agent(DeviceConfig(device_id="cam-limits", target=TARGET.name), TARGET, model, background=False)
    yield a
    a.close()


@pytest.fixture()
def row(built) -> list[float]:
    with np.load(built.holdout) as z:
        return [float(v) for v in z["x"][0]]


def _client(agent: Agent, **kw: Any) -> TestClient:
    return TestClient(create_app(agent, **kw), raise_server_exceptions=False)  # a 500 is a status, not a raise


def _rejected(client: TestClient, reason: str) -> int:
    prefix = f'edgefleet_agent_rejected_total{{reason="{reason}"}} '
    lines = [ln for ln in client.get("/metrics").text.splitlines() if ln.startswith(prefix)]
    return int(lines[0].removeprefix(prefix)) if lines else 0


def _b64(data: bytes) -> dict[str, str]:
    return {"image_b64": base64.b64encode(data).decode()}


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (8-bit gray) followed by one tiny IDAT: what a bomb's header says."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
            + chunk(b"IEND", b""))


# ---- decompression bombs --------------------------------------------------------------------------------------
def test_a_png_bomb_is_refused_from_its_header_and_counted(camera):
    client = _client(camera)
    ok, bomb = cv2.imencode(".png", np.zeros((8192, 8192), np.uint8))  # 67 Mpixels, ~200 MB as BGR
    assert ok and len(bomb) < 200_000  # a few tens of KB on the wire: the byte limit alone lets it through
    r = client.post("/v1/predict", json=_b64(bomb.tobytes()))
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "bad_image" and "8192x8192" in r.json()["detail"]
    assert f"{imaging.MAX_IMAGE_PIXELS}-pixel limit" in r.json()["detail"]
    # a header past OpenCV's own 2**30-pixel cap: OpenCV raises (not None) on it; refused before OpenCV sees it
    r = client.post("/v1/predict", json=_b64(_png_header_only(100_000, 100_000)))
    assert r.status_code == 422 and r.json()["error"] == "bad_image" and "100000x100000" in r.json()["detail"]
    assert _rejected(client, "bad_image") == 2
    assert camera.counters.rejected == {"bad_image": 2}


def test_jpeg_and_bmp_bombs_are_refused_and_ordinary_images_still_decode(camera, vision_built):
    client = _client(camera)
    ok, jpeg = cv2.imencode(".jpg", np.zeros((6000, 8000), np.uint8))  # 48 Mpixels
    assert ok
    r = client.post("/v1/predict", json=_b64(jpeg.tobytes()))
    assert r.status_code == 422 and "8000x6000" in r.json()["detail"], r.text
    # a BMP header claiming 20000 x 20000 (top-down rows: negative height) with no pixel data behind it
    bmp = b"BM" + struct.pack("<IHHI", 0, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, 20_000, -20_000, 1, 8,
                                                                   0, 0, 0, 0, 0, 0)
    r = client.post("/v1/predict", json=_b64(bmp))
    assert r.status_code == 422 and "20000x20000" in r.json()["detail"], r.text
    assert camera.counters.rejected == {"bad_image": 2}
    png = sorted(vision_built.holdout.glob("7/*.png"))[0].read_bytes()
    assert client.post("/v1/predict", json=_b64(png)).json()["label"] == "7"


def _jpeg_with_thumbnail_sof(jpeg: bytes, w: int, h: int) -> bytes:
    """Insert an APP1 segment holding a start-of-frame for w x h before the real one (as an EXIF thumbnail
    would): only the frame header of the image itself counts."""
    fake = b"\xff\xc0" + struct.pack(">HBHHB", 11, 8, h, w, 1) + b"\x01\x11\x00"
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + len(fake)) + b"Exif\x00\x00" + fake
    return jpeg[:2] + app1 + jpeg[2:]


@pytest.mark.parametrize("shape", [(1, 1), (17, 33), (480, 640, 3), (2001, 3000)])
def test_the_header_size_is_the_decoded_size(shape):
    img = np.random.default_rng(0).integers(0, 255, shape, dtype=np.uint8)
    for ext, params in [(".png", []), (".jpg", []), (".jpg", [cv2.IMWRITE_JPEG_PROGRESSIVE, 1]), (".bmp", [])]:
        ok, enc = cv2.imencode(ext, img, params)
        assert ok
        data = enc.tobytes()
        if ext == ".jpg":
            data = _jpeg_with_thumbnail_sof(data, 60_000, 60_000)
        decoded = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        assert decoded.shape[:2] == shape[:2]
        assert imaging.image_size(data)[1:] == (shape[1], shape[0]), (ext, params)


def test_formats_whose_header_is_not_checked_are_refused():
    for ext in (".webp", ".tiff", ".pgm"):
        ok, enc = cv2.imencode(ext, np.zeros((4, 4), np.uint8))
        assert ok
        with pytest.raises(InputError, match="not a PNG, JPEG or BMP") as e:
            imaging.image_size(enc.tobytes())
        assert e.value.kind == "bad_image"
    ok, jpeg = cv2.imencode(".jpg", np.zeros((4, 4), np.uint8))
    for broken in (jpeg.tobytes()[:20], b"\xff\xd8\xff\xe0\x00\x10JFIF\x00garbage", _png_header_only(0, 5)[:20]):
        with pytest.raises(InputError):
            imaging.image_size(broken)


# ---- body limit, streamed -------------------------------------------------------------------------------------
def _asgi(app: Any, path: str, chunks: Iterator[bytes], headers: list[tuple[bytes, bytes]]) -> tuple[int, Any, int]:
    """One POST through the raw ASGI protocol, the body sent chunk by chunk as a chunked upload arrives (no
    Content-Length unless given): (status, JSON body, number of chunks the app asked for)."""
    pulled = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal pulled
        chunk = next(chunks, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        pulled += 1
        return {"type": "http.request", "body": chunk, "more_body": True}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST", "scheme": "http",
             "path": path, "raw_path": path.encode(), "query_string": b"", "root_path": "",
             "headers": [(b"host", b"localhost"), (b"content-type", b"application/json"), *headers],
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 8000)}
    asyncio.run(app(scope, receive, send))
    status = next(m["status"] for m in sent if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return status, json.loads(body), pulled


@pytest.mark.parametrize("path", ["/v1/predict", "/v1/feedback"])
def test_a_chunked_body_over_the_limit_is_refused_while_it_streams(agent, path):
    app = create_app(agent, max_body_bytes=10_000)
    chunks = iter([b" " * 1000] * 1000)  # 1 MB, no Content-Length: the header check cannot see it
    status, body, pulled = _asgi(app, path, chunks, [(b"transfer-encoding", b"chunked")])
    assert status == 413 and body["error"] == "too_large" and "10000 bytes" in body["detail"]
    assert pulled <= 11  # stopped at the chunk that passed 10,000 bytes; the other ~989 were never read
    assert agent.counters.rejected == {"too_large": 1}


def test_a_chunked_body_under_the_limit_is_served(agent, row):
    app = create_app(agent, max_body_bytes=10_000)
    raw = json.dumps({"inputs": row}).encode()
    status, body, pulled = _asgi(app, "/v1/predict", iter([raw[i:i + 100] for i in range(0, len(raw), 100)]),
                                 [(b"transfer-encoding", b"chunked")])
    assert status == 200 and body["model"] == "clinical" and pulled == -(-len(raw) // 100)


def test_a_content_length_that_is_not_an_ascii_number_is_refused(agent):
    header = (b"content-length", "²".encode("latin-1"))  # str.isdigit() is true for it, int() refuses it
    status, body, _ = _asgi(create_app(agent), "/v1/predict", iter([b"{}"]), [header])
    assert status == 413 and body["error"] == "too_large"


# ---- numbers, nesting and labels that used to be 500s ---------------------------------------------------------
def test_an_integer_too_large_for_a_float_is_out_of_range_not_a_500(agent, row):
    client = _client(agent)
    names = agent.model.validator.names
    huge = 10**400
    r = client.post("/v1/predict", content=json.dumps({"inputs": [huge, *row[1:]]}))
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "out_of_range" and r.json()["feature"] == names[0]
    features = dict(zip(names, row, strict=True)) | {names[3]: -huge}
    r = client.post("/v1/predict", content=json.dumps({"features": features}))
    assert r.status_code == 422, r.text
    assert r.json()["error"] == "out_of_range" and r.json()["feature"] == names[3]
    assert "too large" in r.json()["detail"]
    r = client.post("/v1/predict", content=json.dumps({"instances": [{"inputs": [huge] * 30}, {"inputs": row}]}))
    preds = r.json()["predictions"]
    assert r.status_code == 200 and preds[0]["error"] == "out_of_range" and "label" in preds[1]
    assert _rejected(client, "out_of_range") == 3
    with pytest.raises(InputError, match="too large"):
        agent.model.validator.rows([[huge] * 30])


def test_json_nested_too_deeply_is_a_400_and_counted(agent):
    client = _client(agent)
    deep = b"[" * 100_000 + b"]" * 100_000
    r = client.post("/v1/predict", content=deep)
    assert r.status_code == 400 and r.json()["error"] == "invalid_json" and "nested too deeply" in r.json()["detail"]
    assert _rejected(client, "invalid_json") == 1  # counted as answered
    r = client.post("/v1/feedback", content=b'{"prediction_id": ' + deep + b', "label": 1}')
    assert r.status_code == 400 and r.json()["error"] == "invalid_feedback"
    assert _rejected(client, "invalid_feedback") == 1


def test_a_label_that_only_looks_like_digits_is_refused_clearly(agent, row):
    client = _client(agent)
    pid = client.post("/v1/predict", json={"inputs": row}).json()["prediction_id"]
    for label in ("²", "--1", "٣", "1" * 5000):
        r = client.post("/v1/feedback", json={"prediction_id": pid, "label": label})
        assert r.status_code == 422, (label, r.text)
        assert r.json()["error"] == "invalid_feedback"
        assert "neither a class name nor a class index" in r.json()["detail"]
    assert _rejected(client, "invalid_feedback") == 4 and agent.counters.feedback == 0
    assert client.post("/v1/feedback", json={"prediction_id": pid, "label": "1"}).status_code == 200
    assert agent.counters.feedback == 1


def test_request_shape_errors_found_by_the_api_are_counted(agent, row):
    client = _client(agent)
    r = client.post("/v1/predict", json={"inputs": row, "image_b64": "AA=="})
    assert r.status_code == 422 and "exactly one" in r.json()["detail"]
    r = client.post("/v1/predict", json={"inputs": ["x"] * 30})
    assert r.status_code == 422 and r.json()["error"] == "wrong_shape"
    r = client.post("/v1/predict", json={"instances": [{"image_b64": "not base64!"}, 7]})
    assert [p["error"] for p in r.json()["predictions"]] == ["bad_image", "invalid_input"]
    assert agent.counters.rejected == {"invalid_input": 2, "wrong_shape": 1, "bad_image": 1}
