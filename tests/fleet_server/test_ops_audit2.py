"""What an audit with real agents and an external Mosquitto found, as specifications: CLI commands sign package
URLs devices can reach (server.toml's public_url); the server shows when its MQTT broker is down (log, gauge,
/healthz); `drift` reports the version the fleet runs, prints `-` for no data, shows the DP fields and stays
quiet when its reader goes; a device's own PEM key enrolls it; an enrollment token is never born expired."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from edgefleet_contracts.signing import generate_key, public_b64, save_public_key
from fleet_server.app import create_app
from fleet_server.auth import create_token
from fleet_server.cli_drift import _report_text
from fleet_server.devices import create_enrollment_token
from fleet_server.errors import RequestError
from fleet_server.routes_ingest import attach_ingest
from fleet_server.settings import ServerSettings
from fleet_server.store import Store
from tests.brokers import Mosquitto
from tests.fleet_server.conftest import Fleet, FleetFactory, run_cli
from tests.fleet_server.test_health import DriftFleet, clinical, drift_fleet  # noqa: F401  (fixtures)
from tests.support import wait_until

ROOT = Path(__file__).resolve().parents[2]
PUBLIC = "http://127.0.0.1:28481"


def _desired_urls(data: Path) -> list[str]:
    store = Store(data / "fleet.sqlite")
    try:
        return [u for r in store.query("SELECT envelope FROM desired")
                for u in re.findall(r'"(https?://[^"]*/packages/[^"]*)"', r["envelope"])]
    finally:
        store.close()


def _new_folder(built: Any, data: Path, *init_flags: str) -> None:
    rc, _, err = run_cli(["init", "--data", str(data), "--root-key", str(built.keys / "root.pub"), *init_flags])
    assert rc == 0, err
    assert run_cli(["models", "publish", str(built.package), "--data", str(data), "--owner", "ml", "--oncall",
                    "http://127.0.0.1:9/x"])[0] == 0
    assert run_cli(["devices", "enroll", "--data", str(data), "--device-id", "dev-1", "--public-key",
                    str(built.keys / "root.pub")])[0] == 0


# ---- 1. the public URL is a server.toml setting every command reads ----------------------------------------------
def test_rollback_from_the_cli_signs_the_public_url_init_wrote(built: Any, tmp_path: Path) -> None:
    data = tmp_path / "srv"
    _new_folder(built, data, "--http", "127.0.0.1:28480", "--public-url", PUBLIC)
    assert f'public_url = "{PUBLIC}"' in (data / "server.toml").read_text()

    rc, out, err = run_cli(["rollback", "clinical", "--to", "1.0.0", "--data", str(data)])

    assert rc == 0, err
    assert _desired_urls(data) == [f"{PUBLIC}/packages/clinical/1.0.0"]


def test_serve_and_the_cli_read_http_and_public_url_from_server_toml_and_a_flag_override_warns(
        built: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    served: list[ServerSettings] = []
    monkeypatch.setattr("fleet_server.server.serve", lambda s: served.append(s) or 0)
    data = tmp_path / "srv"
    _new_folder(built, data)
    conf = data / "server.toml"
    conf.write_text(f'fleet = "default"\nhttp = "127.0.0.1:28480"\npublic_url = "{PUBLIC}/"\n')

    assert run_cli(["serve", "--data", str(data), "--broker", "none"])[0] == 0
    assert (served[0].http_host, served[0].http_port, served[0].base_url()) == ("127.0.0.1", 28480, PUBLIC)
    assert run_cli(["rollback", "clinical", "--to", "1.0.0", "--data", str(data)])[0] == 0
    assert _desired_urls(data) == [f"{PUBLIC}/packages/clinical/1.0.0"]

    rc, _, err = run_cli(["serve", "--data", str(data), "--broker", "none", "--public-url", "http://10.0.0.9:80"])
    assert rc == 0 and served[1].base_url() == "http://10.0.0.9:80"
    assert "WARNING edgefleet.server: devices download packages from http://10.0.0.9:80 for this run" in err
    assert f'set public_url = "http://10.0.0.9:80" (and http) in {conf}' in err

    conf.write_text('fleet = "default"\npublic_url = "fleet.example"\n')
    rc, _, err = run_cli(["rollback", "clinical", "--to", "1.0.0", "--data", str(data)])
    assert rc == 1 and err.startswith(f"fleet-server: error: {conf}: public_url must be a quoted http:// or https://")


# ---- 2. the MQTT broker's loss shows: log, gauge, /healthz -------------------------------------------------------
def test_a_lost_broker_is_logged_at_warning_shown_by_healthz_and_the_connected_gauge_and_so_is_its_return(
        make_fleet: FleetFactory, start_app: Any, mosquitto: Mosquitto, caplog: pytest.LogCaptureFixture) -> None:
    fleet: Fleet = make_fleet(broker=mosquitto.url)
    client, svc = start_app(fleet, lambda app, ctx: attach_ingest(app, ctx, validator_processes=0,
                                                                  backoff_initial=0.05, backoff_max=0.2))

    def gauge() -> str:
        return next(line for line in client.get("/metrics").text.splitlines()
                    if line.startswith("edgefleet_mqtt_connected "))

    assert wait_until(lambda: gauge() == "edgefleet_mqtt_connected 1", 10)
    assert client.get("/healthz").json() == {"status": "ok", "checks": {
        "http": {"status": "ok"}, "mqtt": {"status": "ok", "broker": f"127.0.0.1:{mosquitto.port}"},
        "store": {"status": "ok"}}}

    with caplog.at_level(logging.INFO, logger="fleet_server.mqtt_ingest"):
        mosquitto.stop()
        assert wait_until(lambda: gauge() == "edgefleet_mqtt_connected 0", 10)
        health = client.get("/healthz")
        assert health.status_code == 200  # the HTTP API still works; restarting would not bring the broker back
        assert health.json()["status"] == "degraded" and health.json()["checks"]["mqtt"]["status"] == "down"
        assert health.json()["checks"]["mqtt"]["down_since"]
        assert client.get("/healthz?strict=true").status_code == 503
        mosquitto.start()
        assert wait_until(lambda: gauge() == "edgefleet_mqtt_connected 1", 10)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith(f"mqtt ingest: lost the broker {mosquitto.url}") for m in warnings), warnings
    assert any(m.startswith(f"mqtt ingest: connected to the broker {mosquitto.url} again") for m in warnings), warnings
    assert client.get("/healthz").json()["status"] == "ok"


def test_healthz_says_mqtt_is_disabled_without_a_broker(make_fleet: FleetFactory) -> None:
    fleet = make_fleet()  # broker none
    with TestClient(create_app(fleet.settings, fleet.store)) as client:
        assert client.get("/healthz?strict=true").json() == {"status": "ok", "checks": {
            "http": {"status": "ok"}, "mqtt": {"status": "disabled"}, "store": {"status": "ok"}}}


def test_healthz_says_the_store_is_down_while_ingest_cannot_commit(make_fleet: FleetFactory) -> None:
    fleet = make_fleet()  # broker none: HTTP ingest
    app = create_app(fleet.settings, fleet.store)
    svc = attach_ingest(app, app.state.ctx, validator_processes=0)
    with TestClient(app) as client:
        assert client.get("/healthz?strict=true").json() == {"status": "ok", "checks": {
            "http": {"status": "ok"}, "mqtt": {"status": "disabled"}, "store": {"status": "ok"}}}
        svc.writer.retries = 0
        with fleet.store.write() as c:  # every insert fails, as on a full disk
            c.execute("CREATE TRIGGER broken BEFORE INSERT ON summaries BEGIN SELECT RAISE(ABORT, 'database or "
                      "disk is full'); END")
        r = client.post("/api/v1/summaries", content=fleet["dev-1"].message([1]))
        assert r.status_code == 503 and "database or disk is full" in r.json()["detail"]
        health = client.get("/healthz?strict=true")
        assert health.status_code == 503 and health.json()["status"] == "degraded"
        store = health.json()["checks"]["store"]
        assert store["status"] == "down" and "database or disk is full" in store["error"] and store["down_since"]
        with fleet.store.write() as c:
            c.execute("DROP TRIGGER broken")
        assert client.post("/api/v1/summaries", content=fleet["dev-1"].message([1])).json()["accepted"] == 1
        assert client.get("/healthz?strict=true").json()["checks"]["store"] == {"status": "ok"}


def test_a_second_serve_on_the_same_data_folder_or_a_taken_port_stops_before_starting_anything(
        cli_data: Path, tmp_path: Path) -> None:
    from tests.brokers import free_port

    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    first = subprocess.Popen([sys.executable, "-m", "fleet_server.cli", "serve", "--data", str(cli_data),
                              "--broker", "none", "--http", f"127.0.0.1:{port}"], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: _answers(port), 30), first.stderr.read() if first.poll() is not None else ""
        rc, out, err = run_cli(["serve", "--data", str(cli_data), "--broker", "none", "--http",
                                f"127.0.0.1:{free_port()}"])
        assert (rc, out) == (1, "")
        assert err.endswith(f"fleet-server: error: another fleet-server serve (pid {first.pid}) is running on "
                            f"{cli_data}; stop it first (one server per data folder)\n"), err
        # another data folder, the same HTTP port: refused before its ingest, alerts or rollouts start
        other = tmp_path / "other"
        assert run_cli(["init", "--data", str(other), "--root-key", str(cli_data / "keys" / "root.pub")])[0] == 0
        rc, _, err = run_cli(["serve", "--data", str(other), "--broker", "none", "--http", f"127.0.0.1:{port}"])
        assert rc == 1 and f"fleet-server: error: cannot listen for HTTP on 127.0.0.1:{port}: " in err, err
    finally:
        first.terminate()
        assert first.wait(30) == 0
    # the lock went with the process: the folder serves again
    assert wait_until(lambda: not _answers(port), 10)


def test_serve_with_its_broker_down_at_start_answers_healthz_degraded_without_waiting_out_the_timeout(
        cli_data: Path) -> None:
    """uvicorn binds after the app's startup, which waited up to 10 s for the MQTT subscription: with the broker
    down, /healthz refused connections all that time (found by a README walkthrough audit). It waits 2 s now."""
    import httpx

    from tests.brokers import free_port

    port, dead = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "fleet_server.cli", "serve", "--data", str(cli_data),
                             "--broker", f"mqtt://127.0.0.1:{dead}", "--http", f"127.0.0.1:{port}"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_until(lambda: _answers(port), 30), proc.stderr.read() if proc.poll() is not None else ""
        health = httpx.get(f"http://127.0.0.1:{port}/healthz").json()
        assert health["status"] == "degraded" and health["checks"]["mqtt"]["status"] == "down"
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert f"mqtt ingest: not subscribed to mqtt://127.0.0.1:{dead} within 2.0 s" in err, err


def _answers(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_serve_with_the_embedded_broker_warns_that_a_crash_loses_its_queue(
        cli_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    class Stopped:  # uvicorn asked to stop at once: the real embedded broker starts and stops around it
        def run(self) -> None:
            return None

    monkeypatch.setattr("fleet_server.server.graceful_server", lambda config: Stopped())
    rc, _, err = run_cli(["serve", "--data", str(cli_data), "--mqtt-port", "0"])
    assert rc == 0, err
    assert "WARNING edgefleet.server: embedded MQTT broker: it acknowledges devices' summaries on receipt" in err
    assert "run Mosquitto with persistence and serve --broker mqtt://HOST:PORT" in err
    rc, _, err = run_cli(["serve", "--data", str(cli_data), "--broker", "none"])
    assert rc == 0 and "embedded MQTT broker" not in err


def test_serve_logs_the_servers_warnings_to_stderr(cli_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def serve(_: ServerSettings) -> int:
        logging.getLogger("fleet_server.mqtt_ingest").warning("mqtt ingest: lost the broker (a test)")
        return 0

    monkeypatch.setattr("fleet_server.server.serve", serve)
    rc, _, err = run_cli(["serve", "--data", str(cli_data), "--broker", "none"])
    assert rc == 0 and "WARNING fleet_server.mqtt_ingest: mqtt ingest: lost the broker (a test)" in err
    assert not logging.getLogger("fleet_server").handlers  # only while serve runs


# ---- 3. drift: the version the fleet runs, `-` for no data, DP fields, a closed pipe ------------------------------
def _publish_unused_newer_version(df: DriftFleet) -> None:
    with df.store.write() as c:
        c.execute("INSERT INTO model_versions SELECT name, '1.1.0', target, sha256, length, path, manifest, profile,"
                  " calibration, published + 60 FROM model_versions WHERE name = 'clinical' AND version = '1.0.0'")


def test_drift_defaults_to_the_version_with_the_most_summaries_and_says_so(
        drift_fleet: DriftFleet) -> None:  # noqa: F811
    drift_fleet.cohorts(per_cohort=2, windows=1, rows=100)
    _publish_unused_newer_version(drift_fleet)

    rc, out, err = run_cli(["drift", "clinical", "--data", str(drift_fleet.settings.data_dir), "--by", "site"])

    assert rc in (0, 3), err
    assert out.splitlines()[0].startswith("clinical 1.0.0 ")
    assert "version 1.0.0: most summaries in the range (4 of 4) (--version to choose another)" in out
    assert "fleet: 4 device(s), 4 summaries" in out and "None" not in out


def test_the_dashboards_signals_choose_the_version_as_drift_does(drift_fleet: DriftFleet) -> None:  # noqa: F811
    from fleet_server.dashboard.data import signals

    drift_fleet.cohorts(per_cohort=2, windows=1, rows=100)
    _publish_unused_newer_version(drift_fleet)

    s = signals(drift_fleet.store, "clinical")  # a model page without a version (an alert about the model)
    assert (s["version"], s["version_chosen"]) == ("1.0.0", "most summaries in the range (4 of 4)")
    assert s["summaries"] == 4
    given = signals(drift_fleet.store, "clinical", "1.1.0")
    assert (given["version"], given["version_chosen"], given["summaries"]) == ("1.1.0", "given", 0)


def test_drift_prints_a_dash_for_no_data_and_shows_the_dp_fields(drift_fleet: DriftFleet) -> None:  # noqa: F811
    rc, out, _ = run_cli(["drift", "clinical", "--data", str(drift_fleet.settings.data_dir), "--version", "1.0.0"])
    assert rc == 0 and "fleet: 0 device(s)" in out
    assert "None" not in out and "p50 - ms  p95 - ms  p99 - ms" in out

    drift_fleet.cohorts(per_cohort=1, windows=1, rows=100)
    rc, out, _ = run_cli(["drift", "clinical", "--data", str(drift_fleet.settings.data_dir), "--json"])
    r = json.loads(out)
    r["fleet"]["input_drift"]["noise_variance"] = 4.5  # as a report over DP summaries holds them
    for f in r["fleet"]["input_drift"]["features"]:
        f["n_effective"] = 12.5
    text = _report_text(r)
    assert "; DP noise variance 4.5 per count)" in text
    assert "n_effective 12.5" in text


def test_drift_piped_to_a_reader_that_leaves_exits_quietly(drift_fleet: DriftFleet) -> None:  # noqa: F811
    drift_fleet.cohorts(per_cohort=1, windows=1, rows=50)
    proc = subprocess.Popen([sys.executable, "-m", "fleet_server.cli", "drift", "clinical", "--data",
                             str(drift_fleet.settings.data_dir)], cwd=ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # `| head` that has read its lines: gone before the report is printed
    err = proc.stderr.read().decode()
    assert proc.wait(60) == 141, err
    assert "Broken pipe" not in err and "Traceback" not in err


# ---- 4. enrollment: the device's PEM key; a token that is usable ------------------------------------------------
def test_a_device_enrolls_itself_with_its_own_pem_public_key(fleet: Fleet, tmp_path: Path) -> None:
    key = generate_key()
    save_public_key(key.public_key(), tmp_path / "device.pub")  # as the agent writes keys/device.pub
    token = create_enrollment_token(fleet.store, {"site": "north"})
    with TestClient(create_app(fleet.settings, fleet.store)) as client:
        r = client.post("/api/v1/enroll", json={"token": token, "device_id": "dev-pem",
                                                "public_key": (tmp_path / "device.pub").read_text()})
    assert r.status_code == 200, r.text
    assert r.json()["public_key"] == public_b64(key.public_key())


def test_devices_enroll_takes_the_key_itself_as_base64_or_pem(cli_data: Path) -> None:
    b64 = public_b64(generate_key().public_key())
    rc, out, err = run_cli(["devices", "enroll", "--data", str(cli_data), "--device-id", "dev-b64", "--public-key",
                            b64])
    assert rc == 0, err
    rc, _, err = run_cli(["devices", "enroll", "--data", str(cli_data), "--device-id", "dev-x", "--public-key",
                          "nope"])
    assert rc == 1 and err.startswith("fleet-server: error: --public-key 'nope' (no such file, nor a key): ")


def test_enrolling_a_device_again_says_its_tags_were_replaced(cli_data: Path) -> None:
    b64 = public_b64(generate_key().public_key())
    enroll = ["devices", "enroll", "--data", str(cli_data), "--device-id", "clinic-7", "--public-key", b64]
    rc, out, _ = run_cli([*enroll, "--tag", "site=north", "--tag", "hw=rpi4"])
    assert rc == 0 and out.strip() == "enrolled clinic-7 (tags {'hw': 'rpi4', 'site': 'north'})"
    rc, out, _ = run_cli([*enroll, "--tag", "site=north"])  # the same key again: hw is dropped, and it says so
    assert rc == 0 and out.strip() == ("enrolled clinic-7 again: tags {'site': 'north'} replace {'hw': 'rpi4', "
                                       "'site': 'north'} (enroll sets the tags it is given)")
    rc, out, _ = run_cli([*enroll, "--tag", "site=north"])
    assert rc == 0 and out.strip() == "enrolled clinic-7 (tags {'site': 'north'})"


@pytest.mark.parametrize(("ttl", "says"), [
    ("0s", "--ttl '0s' must be at least 1s (omit --ttl for a token that never expires)"),
    ("99999999999d", "--ttl: duration '99999999999d' is longer than a century (36,600d)"),
    ("1.5h", "--ttl: duration '1.5h' must be a whole number followed by d, h, m or s (e.g. 30d)"),
])
def test_an_api_token_of_no_lifetime_is_refused_not_made_eternal(cli_data: Path, ttl: str, says: str) -> None:
    rc, out, err = run_cli(["tokens", "create", "--data", str(cli_data), "--role", "viewer", "--ttl", ttl])
    assert (rc, out, err) == (1, "", f"fleet-server: error: {says}\n")
    rc, out, _ = run_cli(["tokens", "list", "--data", str(cli_data)])
    assert rc == 0 and "viewer" not in out  # nothing made
    with pytest.raises(RequestError, match="at least 1 s"):
        create_token(Store(cli_data / "fleet.sqlite"), "viewer", ttl_seconds=0)


def test_an_enrollment_token_that_would_be_born_expired_is_refused_and_a_good_one_says_when_and_how(
        cli_data: Path) -> None:
    for ttl in ("0s", "367d"):
        rc, out, err = run_cli(["devices", "enrollment-token", "--data", str(cli_data), "--ttl", ttl])
        assert (rc, out) == (1, ""), ttl
        assert err == (f"fleet-server: error: --ttl {ttl!r} must be at least 1s and at most 366d: a token must be "
                       "usable\n")
    before = time.time()
    rc, out, err = run_cli(["devices", "enrollment-token", "--data", str(cli_data), "--ttl", "1h"])
    assert rc == 0 and out.startswith("efe_") and len(out.splitlines()) == 1
    expires = time.strftime("%Y-%m-%d %H:%M", time.gmtime(before + 3600))
    assert f"expires {expires}" in err
    assert "POST http://127.0.0.1:8480/api/v1/enroll {token, device_id, public_key}" in err
