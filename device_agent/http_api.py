"""The local HTTP API for apps on the device (loopback by default), and the batch key-value lookup.

    POST /v1/predict   {"features": {name: value, ...}} | {"inputs": [numbers]} | {"image_b64": "..."}
                       | {"instances": [one of the above, ...]}             -> prediction(s) with model version
    POST /v1/feedback  {"prediction_id": "...", "label": <class name or index>}
    GET  /v1/status    agent status
    GET  /v1/precomputed/{key}   a prediction precomputed by `device-agent batch` (when a store is configured);
                       a key may hold '/' (image keys such as ``0/0010.png``), sent as is or as ``%2F``
    GET  /metrics      Prometheus text format

Bad input is a 4xx whose body names the problem (``error`` kind, ``detail``, ``feature``); it is counted in
the window and the ``rejected`` counters and never stops the service. Bodies over ``max_body_bytes`` are refused
with 413 before parsing: by ``Content-Length`` when sent, else while the body streams in (chunked uploads), so an
oversized body is never buffered whole. JSON nested too deeply for the parser is a 400, not a crash.

A batch (``{"instances": [...]}``) answers ``{"predictions": [...]}``, one entry per instance in order: a
prediction, or ``{"error", "detail", "feature"}`` for an instance that was refused. Like the fleet server's
summaries API it is **200 when at least one instance succeeded** (or the list is empty) and **422 when every
instance was refused**, with the same body, so a client that only checks the status never takes "nothing
predicted" for success.

Feedback answers (``error`` is the exception's stable ``reason``; table ``_FEEDBACK_STATUS``): 200 ``{"ok": true}``
only once the label is fsynced; 400 ``invalid_feedback`` (body not {"prediction_id", "label"}); 404
``unknown_prediction`` (a well-formed id this device does not hold: never made here, or rotated out); 409
``already_labelled`` (the first label stands; counted once); 422 ``malformed_prediction_id`` (not an id a
prediction returns: a client bug), ``unknown_class``, ``invalid_feedback``; 503 ``feedback_unavailable`` (no model
installed) or ``label_not_saved`` (the disk refused it). 4xx: do not send the label again; 503: send it again later.
Every refusal but ``feedback_unavailable`` (as ``no_model`` on predict) is counted in ``rejected`` by its reason.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from starlette.requests import ClientDisconnect

from .agent import Agent, FeedbackError, NoModelError
from .batch import KVStore
from .errors import (
    AgentError,
    AlreadyLabelledError,
    FeedbackUnavailableError,
    InferenceError,
    InputError,
    LabelWriteError,
    MalformedPredictionIdError,
    UnknownClassError,
    UnknownPredictionError,
)
from .worker_stats import WorkerStats

MAX_BODY_BYTES = 25 * 1024 * 1024
MAX_INSTANCES = 1024
# A class index sent as a string: ASCII digits only (str.isdigit also takes "²", which int() refuses), and short
# enough for int() (Python refuses over 4300 digits) — any longer is out of range for every model anyway.
_INDEX = re.compile(r"-?[0-9]{1,18}")
# Why a label was refused, as a status a client can act on: 4xx drop the label, 503 send it again later. Looked up
# along the exception's class hierarchy, so a new FeedbackError subclass without a row of its own is a 422.
_FEEDBACK_STATUS: dict[type[AgentError], int] = {
    UnknownPredictionError: 404,
    AlreadyLabelledError: 409,
    MalformedPredictionIdError: 422,
    UnknownClassError: 422,
    FeedbackError: 422,
    FeedbackUnavailableError: 503,
    LabelWriteError: 503,
}


def _feedback_status(exc: AgentError) -> int:
    return next(_FEEDBACK_STATUS[t] for t in type(exc).__mro__ if t in _FEEDBACK_STATUS)


class _TooLarge(Exception):
    """The request body passed ``max_body_bytes`` while streaming in."""


def _error(status: int, kind: str, detail: str, feature: str | None = None) -> JSONResponse:
    return JSONResponse({"error": kind, "detail": detail, "feature": feature}, status_code=status)


def _too_large(agent: Agent, limit: int) -> JSONResponse:
    agent._reject("too_large", None)
    return _error(413, "too_large", f"request body over {limit} bytes")


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, read as it streams in. Raises _TooLarge as soon as it passes ``limit`` bytes (the rest is
    never read), whether or not the client declared a Content-Length."""
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


def _loads(raw: bytes) -> Any:
    """Parse a JSON body. Raises ValueError for anything that is not JSON, including nesting too deep for the
    parser (RecursionError) and integers with too many digits to convert."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _bad(agent: Agent, detail: str, kind: str) -> InputError:
    """An InputError found here, before the agent sees the input: counted here like the agent counts its own."""
    agent._reject(kind, None)
    return InputError(detail, kind=kind)


# The fields one input may come in, and what each holds (a body may also be {"instances": [...]} of them).
INPUT_FIELDS = {"features": "an object of feature name -> value", "inputs": "a list of numbers",
                "image_b64": "base64 of encoded image bytes"}
_ONE_OF = ", ".join(f"'{k}' ({v})" for k, v in INPUT_FIELDS.items())
BODY_FIELDS_HELP = (f"give exactly one of {_ONE_OF}, or 'instances' (a list of up to {MAX_INSTANCES} objects, "
                    "each with one of those three)")
INSTANCE_FIELDS_HELP = f"give exactly one of {_ONE_OF}"


def _one(agent: Agent, inst: Any, *, top: bool = False) -> Any:
    """Predict one input given as ``{"features"|"inputs"|"image_b64": ...}``. ``top``: ``inst`` is the whole
    request body (where ``instances`` is accepted too, so the refusal lists it), not one of its instances."""
    what, fields = ("the request body", BODY_FIELDS_HELP) if top else ("each instance", INSTANCE_FIELDS_HELP)
    if not isinstance(inst, dict):
        raise _bad(agent, f"{what} must be a JSON object: {fields}", "invalid_input")
    keys = INPUT_FIELDS.keys() & set(inst)
    if len(keys) != 1:
        given = ", ".join(f"'{k}'" for k in sorted(inst)[:10]) or "no field"
        raise _bad(agent, f"{fields}; {what} has {given}", "invalid_input")
    if "features" in inst:
        return agent.predict(inst["features"])
    if "inputs" in inst:
        v = inst["inputs"]
        if not isinstance(v, list) or not all(isinstance(n, int | float) and not isinstance(n, bool) for n in v):
            raise _bad(agent, "'inputs' must be a list of numbers", "wrong_shape")
        return agent.predict(v)
    v = inst["image_b64"]
    if not isinstance(v, str):
        raise _bad(agent, f"'image_b64' must be a string of base64, not {type(v).__name__} {str(v)[:40]}",
                   "bad_image")
    try:
        data = base64.b64decode(v, validate=True)
    except (binascii.Error, TypeError, ValueError):
        raise _bad(agent, "'image_b64' is not valid base64", "bad_image") from None
    return agent.predict(data)


def create_app(agent: Agent, kv: KVStore | None = None, *, max_body_bytes: int = MAX_BODY_BYTES,
               status: Callable[[], dict[str, Any]] | None = None) -> FastAPI:
    """``status``: what ``/v1/status`` and ``/metrics`` report (default: the agent's own status; under ``serve``
    the service's, summed over its workers: ``worker_stats``)."""
    status_of = status or agent.status
    app = FastAPI(title="edgefleet device agent", version="1", docs_url=None, redoc_url=None)

    @app.middleware("http")
    async def limit_body(request: Request, call_next: Any) -> Response:
        length = request.headers.get("content-length")
        if length is not None and (not length.isascii() or not length.isdigit()
                                   or len(length) > 18 or int(length) > max_body_bytes):
            return _too_large(agent, max_body_bytes)
        response: Response = await call_next(request)
        return response

    async def body_of(request: Request) -> bytes | Response:
        """The body, read no further than the limit; or the error answer (413 counted, 400 on a disconnect)."""
        try:
            return await _read_body(request, max_body_bytes)
        except _TooLarge:
            return _too_large(agent, max_body_bytes)
        except ClientDisconnect:
            return _error(400, "disconnected", "the client went away before sending the whole body")

    @app.post("/v1/predict")
    async def predict(request: Request) -> Response:
        raw = await body_of(request)
        if isinstance(raw, Response):
            return raw
        try:
            body = _loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            agent._reject("invalid_json", None)  # counted under the kind the client is answered with
            return _error(400, "invalid_json", f"request body is not JSON ({exc})")
        try:
            if isinstance(body, dict) and "instances" in body:
                items = body["instances"]
                if not isinstance(items, list) or len(items) > MAX_INSTANCES:
                    raise _bad(agent, f"'instances' must be a list of at most {MAX_INSTANCES}", "invalid_input")
                out = []
                for inst in items:
                    try:
                        out.append(_one(agent, inst).to_dict())
                    except InputError as exc:
                        out.append({"error": exc.kind, "detail": str(exc), "feature": exc.feature})
                failed = bool(out) and all("error" in p for p in out)  # see the module docstring
                return JSONResponse({"predictions": out}, status_code=422 if failed else 200)
            return JSONResponse(_one(agent, body, top=True).to_dict())
        except InputError as exc:
            return _error(422, exc.kind, str(exc), exc.feature)
        except NoModelError as exc:
            return _error(503, exc.reason, str(exc))
        except InferenceError as exc:
            return _error(500, exc.reason, str(exc))

    @app.post("/v1/feedback")
    async def feedback(request: Request) -> Response:
        raw = await body_of(request)
        if isinstance(raw, Response):
            return raw
        try:
            body = _loads(raw)
            pid, label = body["prediction_id"], body["label"]
            if not isinstance(pid, str) or not isinstance(label, int | str) or isinstance(label, bool):
                raise TypeError
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            agent.refuse_feedback("invalid_feedback")
            return _error(400, "invalid_feedback", "body must be {\"prediction_id\": str, \"label\": class or index}")
        if isinstance(label, str) and label.lstrip("-").isdigit() and not _INDEX.fullmatch(label):
            # The agent reads a string of digits as a class index; only plain ASCII ones are (see _INDEX).
            agent.refuse_feedback("invalid_feedback")
            return _error(422, "invalid_feedback", f"label {label!r} is neither a class name nor a class index "
                          "(a class index is an integer written in ASCII digits)")
        try:
            agent.feedback(pid, label)  # counts its refusals in `rejected` by reason
        except (FeedbackError, LabelWriteError) as exc:
            return _error(_feedback_status(exc), exc.reason, str(exc))
        return JSONResponse({"ok": True})

    @app.get("/v1/status")
    async def get_status() -> Response:
        return JSONResponse(status_of())

    @app.get("/v1/precomputed/{key:path}")
    async def precomputed(key: str) -> Response:
        if kv is None:
            return _error(404, "no_store", "no batch store configured (device-agent serve --store KV.sqlite)")
        row = kv.get(key)
        if row is None:
            return _error(404, "unknown_key", f"no precomputed prediction for key {key!r}")
        return JSONResponse(row)

    @app.get("/metrics")
    async def metrics() -> Response:
        return PlainTextResponse(prometheus_text(agent, status_of()), media_type="text/plain; version=0.0.4")

    return app


def prometheus_text(agent: Agent, status: dict[str, Any] | None = None) -> str:
    """The Prometheus text of ``status`` (default: the agent's own)."""
    st = agent.status() if status is None else status
    m = st["model"] or {"name": "", "version": ""}
    lab = f'model="{m["name"]}",version="{m["version"]}"'
    lines = [
        "# HELP edgefleet_agent_predictions_total Predictions served.",
        "# TYPE edgefleet_agent_predictions_total counter",
        f"edgefleet_agent_predictions_total{{{lab}}} {st['predictions']}",
        "# HELP edgefleet_agent_rejected_total Requests rejected, by reason.",
        "# TYPE edgefleet_agent_rejected_total counter",
    ]
    lines += [f'edgefleet_agent_rejected_total{{reason="{k}"}} {v}' for k, v in sorted(st["rejected"].items())]
    lines += [
        "# HELP edgefleet_agent_feedback_total Labels fed back.",
        "# TYPE edgefleet_agent_feedback_total counter",
        f"edgefleet_agent_feedback_total {st['feedback']}",
        "# HELP edgefleet_agent_windows_closed_total Summary windows closed.",
        "# TYPE edgefleet_agent_windows_closed_total counter",
        f"edgefleet_agent_windows_closed_total {st['windows_closed']}",
        "# HELP edgefleet_agent_summaries_total Summaries queued for sending.",
        "# TYPE edgefleet_agent_summaries_total counter",
        f"edgefleet_agent_summaries_total {st['summaries_emitted']}",
        "# HELP edgefleet_agent_windows_held_total Windows held back below k and merged forward.",
        "# TYPE edgefleet_agent_windows_held_total counter",
        f"edgefleet_agent_windows_held_total {st['windows_held_for_k']}",
        "# HELP edgefleet_agent_windows_held_disk_full Windows held in memory now because the disk is full.",
        "# TYPE edgefleet_agent_windows_held_disk_full gauge",
        f"edgefleet_agent_windows_held_disk_full {st['windows_held_disk_full']}",
        "# HELP edgefleet_agent_windows_recovered_total Windows written after being held for a full disk.",
        "# TYPE edgefleet_agent_windows_recovered_total counter",
        f"edgefleet_agent_windows_recovered_total {st['windows_recovered']}",
        "# HELP edgefleet_agent_windows_lost_total Windows lost (held past the bound, or at shutdown on a full disk).",
        "# TYPE edgefleet_agent_windows_lost_total counter",
        f"edgefleet_agent_windows_lost_total {st['windows_lost']}",
    ]
    return "\n".join(lines) + "\n"


def app_from_env() -> FastAPI:
    """uvicorn factory for ``device-agent serve``'s workers: EDGEFLEET_DEVICE_DIR, optional EDGEFLEET_KV_STORE,
    and EDGEFLEET_SERVE_URL (the service's address, recorded in ``agent.json`` for ``device-agent status``).

    Each worker process opens its own agent on the folder. Their prediction logs share the folder
    (``PredictionLog.share``): feedback for a prediction another worker made is taken at once, and a prediction
    is labelled once whichever worker gets the label. One worker at a time runs the device's link, reported
    state and desired state (``runner.ServeLink``); it stops with the worker (SIGTERM) and another takes over.
    """
    from .runner import ServeLink

    d = os.environ.get("EDGEFLEET_DEVICE_DIR")
    if not d:
        raise AgentError("EDGEFLEET_DEVICE_DIR is not set")
    store = os.environ.get("EDGEFLEET_KV_STORE")
    agent = Agent.open(Path(d))
    if agent.log is not None:
        agent.log.share(agent.flush_staged)
    link = ServeLink(Path(d), agent, os.environ.get("EDGEFLEET_SERVE_URL") or None)
    stats = WorkerStats(Path(d), agent.counter_fields)
    app = create_app(agent, KVStore(Path(store)) if store else None,
                     status=lambda: stats.service_status(agent.status()))
    app.router.on_startup.append(link.start)
    app.router.on_startup.append(stats.start)
    app.router.on_shutdown.append(link.close)
    app.router.on_shutdown.append(stats.stop)
    return app
