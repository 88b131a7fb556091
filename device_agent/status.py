"""What a device reports about itself: one set of fields for ``GET /v1/status`` (``Agent.status``) and
``device-agent status`` (``status_doc``), so the two views cannot drift apart.

* ``device_status_fields``: identity, the model served, ``k`` (the k in force: 10 for a config.toml below the
  privacy floor) and the privacy budget (``dp_epsilon``, ``dp_epsilon_spent``). Both views compute them the same
  way, from the config and the outbox.
* ``RUNTIME_STATUS_FIELDS``: counters only the running agent holds (predictions, rejections, windows, …, since it
  started). ``device-agent status`` asks the running ``device-agent run`` for them over its local API, at the
  address it recorded in ``agent.json``; they are null when no agent runs (or it cannot be reached), and
  ``agent`` says which.
* ``device-agent status`` adds what only the folder tells: active and standby slots, the update state machine,
  the last install result, the outbox depth and the MQTT link.

Everything here reads; nothing but ``status_doc``'s start-up recovery (``Updater.recover``) writes.
"""

from __future__ import annotations

import json
import os
import sqlite3
from pathlib import Path
from typing import Any

from .config import DeviceConfig, DeviceDir

__all__ = ["RUNTIME_STATUS_FIELDS", "device_status_fields", "epsilon_spent", "link_state", "live_agent",
           "outbox_depth", "status_doc"]

RUNTIME_STATUS_FIELDS = (
    "predictions", "rejected", "feedback", "feedback_unmatched", "windows_closed", "summaries_emitted",
    "windows_held_for_k", "windows_held_disk_full", "windows_recovered", "windows_lost", "summarizer_failures",
    "outbox", "reload_failures", "tick_failures", "prediction_log",
    "workers",  # under `serve` only (null otherwise): the counters are the service's, summed (worker_stats)
)


def device_status_fields(cfg: DeviceConfig, target: str, model: dict[str, str] | None,
                         epsilon_spent: float) -> dict[str, Any]:
    """The status fields that follow from the configuration and the folder (see the module docstring);
    ``epsilon_spent`` is -1.0 when the outbox could not be read."""
    return {"device_id": cfg.device_id, "fleet": cfg.fleet, "target": target, "model": model,
            "k": cfg.min_window_samples, "dp_epsilon": cfg.dp_epsilon, "dp_epsilon_spent": epsilon_spent}


# ---- the folder, read only ---------------------------------------------------------------------------------
def _read_outbox(path: Path, sql: str, args: tuple[Any, ...] = ()) -> Any:
    """The first row of a read-only query on the outbox; () when there is no outbox or no such table yet.
    Raises sqlite3.Error when it cannot be read."""
    if not path.exists():
        return ()
    con = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True)
    try:
        return con.execute(sql, args).fetchone() or ()
    except sqlite3.OperationalError as exc:
        if "no such table" in str(exc):
            return ()
        raise
    finally:
        con.close()


def outbox_depth(path: Path) -> int | None:
    """Rows queued in the outbox (read-only; 0 when there is no outbox yet; None when it cannot be read)."""
    try:
        row = _read_outbox(path, "SELECT COUNT(*) FROM outbox")
    except sqlite3.Error:
        return None
    return int(row[0]) if row else 0


def epsilon_spent(path: Path) -> float:
    """The privacy budget spent so far, as the outbox records it (0.0 without one; -1.0 when unreadable)."""
    try:
        row = _read_outbox(path, "SELECT value FROM meta WHERE key = ?", ("epsilon_spent",))
        return float(row[0]) if row else 0.0
    except (sqlite3.Error, ValueError):
        return -1.0


def link_state(device: DeviceDir, broker: str) -> dict[str, Any]:
    """``link.json`` as the agent wrote it; without one, offline (no broker) or unknown (never connected)."""
    path = device.link_file
    try:
        doc = json.loads(path.read_text())
        if isinstance(doc, dict):
            return {"state": str(doc.get("state", "unknown")), "since": doc.get("since"),
                    "last_error": doc.get("last_error")}
        return {"state": "unknown", "since": None, "last_error": f"{path} is not a JSON object"}
    except FileNotFoundError:
        if not broker:
            return {"state": "offline", "since": None, "last_error": None, "detail": "no broker configured"}
        return {"state": "unknown", "since": None, "last_error": None, "detail": "the agent has not reported"}
    except (OSError, ValueError) as exc:
        return {"state": "unknown", "since": None, "last_error": f"{path} unreadable: {exc}"}


# ---- the running agent ---------------------------------------------------------------------------------------
def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, as another user
        return True
    return True


def live_agent(device: DeviceDir, device_id: str, *, timeout: float = 1.0) -> tuple[dict[str, Any] | None,
                                                                                  dict[str, Any]]:
    """(the running agent's own status, how it was found): ``GET /v1/status`` at the address the running
    ``device-agent run`` recorded in ``agent.json``. The second value is ``{"state": "running" | "not_running" |
    "unreachable", "pid", "url", "detail"}``; the first is None unless the agent answered for ``device_id``."""
    path = device.agent_file
    try:
        doc = json.loads(path.read_text())
        pid, url = doc.get("pid"), doc.get("http")
    except FileNotFoundError:
        return None, {"state": "not_running", "pid": None, "url": None,
                      "detail": "no `device-agent run` with its local API is running for this folder"}
    except (OSError, ValueError, AttributeError) as exc:
        return None, {"state": "unreachable", "pid": None, "url": None, "detail": f"{path} unreadable: {exc}"}
    if not isinstance(pid, int) or not _alive(pid):
        return None, {"state": "not_running", "pid": pid, "url": url,
                      "detail": f"{path.name} names pid {pid}, which is not running (the agent was killed)"}
    if not isinstance(url, str) or not url:
        return None, {"state": "unreachable", "pid": pid, "url": None,
                      "detail": "the agent's local API port was chosen when it started (--http-port 0) and is not "
                                "recorded"}
    import httpx

    try:
        r = httpx.get(f"{url}/v1/status", timeout=timeout)
        r.raise_for_status()
        live = r.json()
    except (httpx.HTTPError, ValueError) as exc:
        return None, {"state": "unreachable", "pid": pid, "url": url, "detail": f"{url}/v1/status: {exc}"}
    if not isinstance(live, dict) or live.get("device_id") != device_id:
        other = live.get("device_id") if isinstance(live, dict) else None
        return None, {"state": "unreachable", "pid": pid, "url": url,
                      "detail": f"{url} answers for device {other!r}, not {device_id!r}"}
    return live, {"state": "running", "pid": pid, "url": url, "detail": None}


# ---- device-agent status ---------------------------------------------------------------------------------------
def status_doc(device: DeviceDir) -> dict[str, Any]:
    """Everything ``device-agent status`` shows: every field of ``GET /v1/status`` (the runtime ones from the
    running agent, null without one) and the folder's slots, update state, last result, outbox and link. Runs
    start-up recovery first. Raises AgentError / ContractError."""
    from .updater import Updater

    up = Updater(device)
    recovered = up.recover()
    rec = up.record()
    active, standby = up.slots.active(), up.slots.standby()
    pointer = up.slots.pointer() if active else None
    cfg = up.config
    live, agent = live_agent(device, cfg.device_id)
    model = None if active is None else {"name": active[1].name, "version": active[1].version}
    return {
        **device_status_fields(cfg, up.target.name, model, epsilon_spent(device.outbox)),
        **{name: None if live is None else live.get(name) for name in RUNTIME_STATUS_FIELDS},
        "agent": agent,
        "active": None if active is None else {
            "name": active[1].name, "version": active[1].version, "slot": active[0].name,
            "activated": pointer.activated if pointer else None},
        "standby": None if standby is None else {
            "name": standby[1].name, "version": standby[1].version, "slot": standby[0].name},
        "update": {"state": str(rec.state), "entered": rec.entered, "reason": rec.reason},
        "last_result": rec.last_result,
        "outbox_depth": outbox_depth(device.outbox),
        "link": link_state(device, cfg.broker),
        "recovered": recovered,
    }
