"""The OpenAPI document as integrators need it: the bearer scheme, the request bodies the routes read by hand,
and the error answers the routes give.

FastAPI derives a document from the route signatures; ours read their JSON bodies themselves (``read_json``
and the getters of :mod:`bodies`, so every refusal names the field), so FastAPI sees no body, and it sees the
bearer token as an optional ``authorization`` header. :func:`install` completes the document once, when it is
first asked for:

* ``components.securitySchemes.bearer`` (HTTP bearer) on every operation that takes the token, instead of the
  header parameter;
* ``requestBody`` for the routes of :data:`BODIES`, whose property names are the fields the route accepts
  (``tests/fleet_server/test_openapi.py`` checks that the two agree, and that the document matches what the
  routes answer);
* the ``Error`` schema (``{error, detail}``, one shape for every 4xx and 5xx) for 401 and 403 on operations
  with a token, 404 on operations with path parameters, 413 on operations with a body, and 422 everywhere
  FastAPI listed its own ``HTTPValidationError``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fastapi import FastAPI

__all__ = ["BODIES", "ERROR_SCHEMA", "EXTRA", "install"]

_STR: dict[str, Any] = {"type": "string"}
_TAGS: dict[str, Any] = {"type": "object", "additionalProperties": {"type": "string"},
                         "description": 'tags as key -> value, e.g. {"site": "north"}'}
_NUM: dict[str, Any] = {"type": "number"}

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error", "detail"],
    "properties": {
        "error": {"type": "string", "description": "a token naming the kind of refusal, e.g. invalid_request"},
        "detail": {"type": "string", "description": "a sentence naming the field or parameter and the problem"},
        "errors": {"type": "array", "description": "for parameters FastAPI checked: each one's loc, msg, type",
                   "items": {"type": "object"}},
    },
}

# (method, path) -> (required fields, {field: schema}, description). The properties are exactly the fields the
# route accepts: any other is a 422 naming it.
BODIES: dict[tuple[str, str], tuple[tuple[str, ...], dict[str, Any], str]] = {
    ("post", "/api/v1/devices"): (
        ("device_id", "public_key"),
        {"device_id": _STR, "public_key": {"type": "string", "description": "the device's keys/device.pub (PEM) "
                                           "or base64 of its 32 raw Ed25519 bytes"},
         "tags": _TAGS, "replace": {"type": "boolean", "description": "enrol again with a new key (a revoked "
                                                                     "device comes back only this way)"}},
        "Enrol a device."),
    ("post", "/api/v1/enrollment-tokens"): (
        (), {"tags": _TAGS, "ttl_seconds": {"type": "number", "minimum": 1, "maximum": 366 * 86400,
                                            "default": 86400}},
        "A one-time enrolment token for a device that enrols itself."),
    ("post", "/api/v1/enroll"): (
        ("token", "device_id", "public_key"),
        {"token": _STR, "device_id": _STR, "public_key": _STR},
        "A device enrols itself with a one-time token (no bearer token)."),
    ("put", "/api/v1/devices/{device_id}/tags"): (
        (), {}, "The device's tags, replacing the old ones: an object of key -> value."),
    ("post", "/api/v1/devices/{device_id}/revoke"): (
        ("reason",), {"reason": _STR}, "Revoke a lost, stolen or retired device."),
    ("post", "/api/v1/rollouts"): (
        ("model", "version"),
        {"model": _STR, "version": _STR,
         "stages": {"description": 'cumulative percentages, "1,10,50,100" or [1, 10, 50, 100]',
                    "oneOf": [_STR, {"type": "array", "items": _NUM}]},
         "cohort": _TAGS, "bake_seconds": {"type": "number", "minimum": 0, "default": 600},
         "max_per_minute": {"type": "integer", "minimum": 0, "default": 0, "description": "0: no limit"},
         "window": {"type": "string", "description": "daily UTC window HH:MM-HH:MM", "default": ""},
         "thresholds": {"type": "object", "additionalProperties": _NUM,
                        "description": "gate threshold overrides by name"},
         "approve_stages": {"type": "array", "items": {"type": "integer", "minimum": 1}}},
        "Start a staged rollout."),
    ("post", "/api/v1/rollbacks"): (
        ("model", "to"), {"model": _STR, "to": _STR, "cohort": _TAGS}, "Roll a cohort back to an earlier version."),
    ("put", "/api/v1/models/{name}/alert-rules"): (
        (), {}, "The model's alert rule overrides (replacing earlier ones); GET shows the effective rules."),
    ("post", "/api/v1/summaries"): (
        (), {}, "One signed summary envelope, or a JSON array of up to 500 (the agent's wire format, "
                "edgefleet_contracts.summary); the answer lists what was accepted, duplicated and rejected."),
}


_INGEST_RESULT: dict[str, Any] = {
    "type": "object", "required": ["accepted", "duplicates", "rejected"],
    "properties": {"accepted": {"type": "integer"}, "duplicates": {"type": "integer"},
                   "rejected": {"type": "array", "items": {"type": "object", "properties": {
                       "index": {"type": ["integer", "null"], "description": "null: the whole body"},
                       "reason": {"type": "string"}, "detail": {"type": "string"}}}}},
}

# Answers a route gives beyond the ones every route of its kind gets: (method, path) -> {status: (description,
# schema name or None for the Error schema, or "" for no JSON body)}.
EXTRA: dict[tuple[str, str], dict[str, tuple[str, str | None]]] = {
    ("post", "/api/v1/devices"): {"409": ("enrolled already with another key, or revoked: send replace=true "
                                          "with the new key", None)},
    ("post", "/api/v1/enroll"): {"401": ("the enrolment token is unknown, expired or used", None),
                                 "409": ("the device is enrolled already", None)},
    ("post", "/api/v1/rollouts"): {"409": ("another rollout of the model is still active", None)},
    ("post", "/api/v1/rollouts/{rid}/{action}"): {"409": ("the rollout's state does not allow this action", None)},
    ("post", "/api/v1/rollbacks"): {"409": ("devices of the cohort run a newer version and do not hold this "
                                            "one in standby: they would refuse it (the detail names them)", None)},
    ("post", "/api/v1/alerts/{alert_id}/ack"): {"409": ("the alert is resolved", None)},
    ("post", "/api/v1/summaries"): {
        "200": ("at least one envelope stored or already stored; rejections listed", "IngestResult"),
        "413": ("the body is over the message limit", "IngestResult"),
        "422": ("every envelope was rejected (reasons listed; kept in quarantine)", "IngestResult"),
        "429": ("every envelope was refused only for the device's rate: send again after Retry-After",
                "IngestResult"),
        "503": ("the store could not commit: nothing was stored, send again", None)},
    ("get", "/packages/{name}/{version}"): {
        "200": ("the whole package (application/octet-stream)", ""),
        "206": ("the requested byte range (Content-Range)", ""),
        "416": ("the byte range is malformed or outside the package", None),
        "503": ("the package is published but its file is missing on the server (Retry-After)", None)},
    ("head", "/packages/{name}/{version}"): {"206": ("headers of the requested byte range", "")},
}


def _response(description: str, schema: str | None) -> dict[str, Any]:
    if schema == "":
        return {"description": description}
    return {"description": description,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema or 'Error'}"}}}}


def _body_schema(required: tuple[str, ...], props: dict[str, Any]) -> dict[str, Any]:
    if not props:
        return {"type": "object"} if required == () else {"type": "object", "required": list(required)}
    schema: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        schema["required"] = list(required)
    return schema


def _error(description: str) -> dict[str, Any]:
    return _response(description, None)


def _complete(doc: dict[str, Any]) -> dict[str, Any]:
    components = doc.setdefault("components", {})
    components.setdefault("securitySchemes", {})["bearer"] = {
        "type": "http", "scheme": "bearer",
        "description": "a token from `fleet-server tokens create --role viewer|operator|admin`"}
    schemas = components.setdefault("schemas", {})
    schemas["Error"] = ERROR_SCHEMA
    schemas["IngestResult"] = _INGEST_RESULT
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            params = op.get("parameters", [])
            secured = any(p.get("in") == "header" and p.get("name", "").lower() == "authorization" for p in params)
            op["parameters"] = [p for p in params
                                if not (p.get("in") == "header" and p.get("name", "").lower() == "authorization")]
            if not op["parameters"]:
                del op["parameters"]
            responses = op.setdefault("responses", {})
            if "422" in responses:
                responses["422"] = _error("a parameter or body field is invalid (the detail names it)")
            if secured:
                op["security"] = [{"bearer": []}]
                responses["401"] = _error("missing, unknown, expired or revoked token")
                responses["403"] = _error("the token's role may not do this")
            if "{" in path:
                responses.setdefault("404", _error("no such item (the detail names it)"))
            body = BODIES.get((method, path))
            if body is not None:
                required, props, description = body
                op["requestBody"] = {"required": bool(required) or method == "put", "description": description,
                                     "content": {"application/json": {"schema": _body_schema(required, props)}}}
                responses.setdefault("413", _error("the body is over the server's limit"))
                responses.setdefault("422", _error("the body is not JSON, or a field is invalid or unknown "
                                                   "(the detail names it)"))
            for status, (description, schema) in EXTRA.get((method, path), {}).items():
                responses[status] = _response(description, schema)
            if path.startswith("/packages/"):
                responses.pop("422", None)  # its only parameters are the path's and optional headers
    return doc


def install(app: FastAPI) -> None:
    """Serve the completed document at ``/openapi.json`` (and ``/docs``)."""
    derive: Callable[[], dict[str, Any]] = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = _complete(derive())
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
