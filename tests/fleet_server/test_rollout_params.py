"""What a rollout is started with (fleet_server/rollouts/params.py): `fleet-server rollout start` and
`POST /api/v1/rollouts` refuse the same values with the same words, each naming its own flag or field, and create
nothing; the body's unknown fields are refused; `rollout status` and `GET /api/v1/rollouts/ID` show the
maintenance window and the rate limit (and say when the rollout waits for its window); an action that is none of
pause, resume, abort, approve is a 404 listing them. Real data folder (made by the CLI), real app, real CLI."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
from fastapi.testclient import TestClient

from fleet_server.auth import create_token
from fleet_server.rollouts import params, service
from fleet_server.server import build
from tests.fleet_server.conftest import run_cli
from tests.fleet_server.test_rollouts import fleet, v110  # noqa: F401 - the fixtures: 20 devices on 1.0.0


@pytest.fixture()
def api(fleet: Any) -> Iterator[tuple[TestClient, dict[str, str]]]:  # noqa: F811 - the imported fixture
    settings, _, _ = fleet
    app, ctx = build(settings)
    operator = {"Authorization": f"Bearer {create_token(ctx.store, 'operator')}"}
    with TestClient(app) as client:
        yield client, operator


def rollouts(fleet: Any) -> int:  # noqa: F811
    return int(fleet[1].one("SELECT COUNT(*) FROM rollouts")[0])


GATES = ", ".join(sorted(params.DEFAULT_THRESHOLDS))
# (flags of `rollout start`, the same values in a POST body, the refusal with {the name} of the parameter)
REFUSED = [
    (["--stages", "1,10,50,100", "--approve", "9"], {"stages": "1,10,50,100", "approve_stages": [9]},
     "{approve_stages} 9: this rollout has 4 stages, numbered 1 to 4"),
    (["--stages", "1,10,50,100", "--approve", "0"], {"stages": "1,10,50,100", "approve_stages": [0]},
     "{approve_stages} 0: this rollout has 4 stages, numbered 1 to 4"),
    (["--max-per-minute", "-5"], {"max_per_minute": -5},
     "{max_per_minute} must be a whole number of devices from 0 (no limit) to 1,000,000,000, not -5"),
    (["--bake", "400d"], {"bake_seconds": 400 * 86400},
     "{bake_seconds} must be from 0 s to 365 days (31,536,000 s), not 34,560,000 s (400 days)"),
    (["--window", "2-4"], {"window": "2-4"},
     "{window} '2-4' must be a daily UTC window HH:MM-HH:MM with different ends, such as 02:00-04:00"),
    (["--window", "02:00-02:00"], {"window": "02:00-02:00"},
     "{window} '02:00-02:00' must be a daily UTC window HH:MM-HH:MM with different ends, such as 02:00-04:00"),
    (["--gate", "max_error=0.1"], {"thresholds": {"max_error": 0.1}},
     "{thresholds}: unknown gate threshold max_error (did you mean max_error_rate?); the thresholds are " + GATES),
    (["--gate", "max_error_rate=nan"], {"thresholds": {"max_error_rate": "nan"}},
     "{thresholds} max_error_rate must be a rate from 0 to 1, not {nan}"),
    (["--gate", "max_error_rate=-0.1"], {"thresholds": {"max_error_rate": -0.1}},
     "{thresholds} max_error_rate must be a rate from 0 to 1, not -0.1"),
    (["--gate", "max_install_failure_rate=5"], {"thresholds": {"max_install_failure_rate": 5}},
     "{thresholds} max_install_failure_rate must be a rate from 0 to 1, not 5{int}"),
    (["--gate", "max_p95_latency_ratio=0"], {"thresholds": {"max_p95_latency_ratio": 0}},
     "{thresholds} max_p95_latency_ratio must be a ratio over 0 (new p95 / control p95), not 0{int}"),
    (["--gate", "min_devices=0"], {"thresholds": {"min_devices": 0}},
     "{thresholds} min_devices must be a number of devices, 1 or more, not 0{int}"),
    (["--gate", "min_p95_increase_ms=-1"], {"thresholds": {"min_p95_increase_ms": -1}},
     "{thresholds} min_p95_increase_ms must be a finite number, 0 or more, not -1{int}"),
    (["--stages", "50,10"], {"stages": "50,10"},
     "{stages} '50,10' must be increasing percentages in (0, 100], e.g. 1,10,50,100"),
    (["--stages", "a,b"], {"stages": "a,b"},
     "{stages} 'a,b' must be increasing percentages in (0, 100], e.g. 1,10,50,100"),
    (["--cohort", "site= north"], {"cohort": {"site": " north"}},
     "{cohort} 'site= north' has whitespace at the start or end of its value; remove it (nothing is stripped)"),
]


@pytest.mark.parametrize(("flags", "body", "says"), REFUSED, ids=[" ".join(r[0]) for r in REFUSED])
def test_the_cli_and_the_api_refuse_the_same_rollout_values_naming_the_flag_or_the_field(
        fleet: Any, api: Any, flags: list[str], body: dict[str, Any], says: str) -> None:  # noqa: F811
    settings, _, _ = fleet
    client, operator = api

    rc, out, err = run_cli(["rollout", "start", "clinical", "1.1.0", "--data", str(settings.data_dir), *flags])
    r = client.post("/api/v1/rollouts", json={"model": "clinical", "version": "1.1.0", **body}, headers=operator)

    # a flag's text is a float by then; JSON's "nan" stays a string, its whole numbers ints
    flag = dict(params.FLAGS, nan="nan", int=".0")
    field = dict(params.BODY, nan="'nan'", int="")
    assert (rc, out) == (1, "") and err == f"fleet-server: error: {says.format(**flag)}\n"
    assert r.status_code == 422 and r.json()["detail"] == says.format(**field), r.text
    assert rollouts(fleet) == 0  # nothing created


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--gate", "max_error_rate", "--gate 'max_error_rate' must be NAME=NUMBER, e.g. max_p95_latency_ratio=1.5"),
    ("--gate", "max_error_rate=x", "--gate 'max_error_rate=x' must be NAME=NUMBER, e.g. max_p95_latency_ratio=1.5"),
    ("--approve", "3,x", "--approve '3,x' must be stage numbers separated by commas, e.g. 3,4"),
    ("--bake", "10x", "--bake '10x' must be a whole number followed by d, h, m or s, e.g. 10m"),
    ("--cohort", "site", "--cohort 'site' must look like key=value"),
])
def test_a_rollout_flag_that_is_not_its_syntax_is_one_line_naming_the_flag(
        fleet: Any, flag: str, value: str, says: str) -> None:  # noqa: F811
    rc, out, err = run_cli(["rollout", "start", "clinical", "1.1.0", "--data", str(fleet[0].data_dir), flag, value])

    assert (rc, out, err) == (1, "", f"fleet-server: error: {says}\n")
    assert rollouts(fleet) == 0


def test_rollback_names_its_cohort_flag(fleet: Any) -> None:  # noqa: F811
    rc, _, err = run_cli(["rollback", "clinical", "--to", "1.0.0", "--data", str(fleet[0].data_dir), "--cohort",
                          "site"])

    assert (rc, err) == (1, "fleet-server: error: --cohort 'site' must look like key=value\n")
    assert rollouts(fleet) == 0


def test_a_body_field_the_api_does_not_read_is_a_422_naming_it_and_the_fields(fleet: Any, api: Any) -> None:  # noqa: F811
    client, operator = api
    fields = ", ".join(params.START_FIELDS)

    r = client.post("/api/v1/rollouts", json={"model": "clinical", "version": "1.1.0", "bake": "1m"},
                    headers=operator)
    assert r.status_code == 422 and r.json()["detail"] == (
        f"unknown field bake (did you mean bake_seconds?); the fields are {fields}")
    r = client.post("/api/v1/rollouts", json={"model": "clinical", "version": "1.1.0", "max-per-minute": 5,
                                              "priority": 1}, headers=operator)
    assert r.status_code == 422 and r.json()["detail"] == (
        f"unknown fields max-per-minute (did you mean max_per_minute?), priority; the fields are {fields}")
    r = client.post("/api/v1/rollbacks", json={"model": "clinical", "to": "1.0.0", "cohorts": {}}, headers=operator)
    assert r.status_code == 422 and r.json()["detail"] == (
        "unknown field cohorts (did you mean cohort?); the fields are model, to, cohort")
    assert rollouts(fleet) == 0


def test_an_unknown_rollout_action_is_a_404_listing_the_actions_whatever_the_state(fleet: Any, api: Any) -> None:  # noqa: F811
    _, store, _ = fleet
    client, operator = api
    rid = client.post("/api/v1/rollouts", json={"model": "clinical", "version": "1.1.0"}, headers=operator).json()["id"]
    decided = len(service.status(store, rid)["decisions"])

    for state in ("running", "aborted"):  # aborted: was a 409 "nothing to explode"
        r = client.post(f"/api/v1/rollouts/{rid}/explode", headers=operator)
        assert r.status_code == 404 and r.json()["detail"] == (
            "no rollout action 'explode'; the actions are pause, resume, abort, approve"), r.text
        st = service.status(store, rid)
        assert st["state"] == state and len(st["decisions"]) == decided  # nothing changed, nothing logged
        if state == "running":
            assert client.post(f"/api/v1/rollouts/{rid}/abort", headers=operator).status_code == 200
            decided += 1


def _window_from_now(start_h: int, end_h: int) -> str:
    """A daily UTC window from ``start_h`` to ``end_h`` hours from now (whole minutes)."""
    now = time.time()
    return "-".join(time.strftime("%H:%M", time.gmtime(now + h * 3600)) for h in (start_h, end_h))


def test_status_shows_the_window_and_the_rate_and_says_when_the_rollout_waits_for_its_window(
        fleet: Any, api: Any) -> None:  # noqa: F811
    settings, store, svc = fleet
    client, _ = api
    window = _window_from_now(2, 3)  # closed now: opens in about two hours
    d = str(settings.data_dir)
    rc, out, err = run_cli(["rollout", "start", "clinical", "1.1.0", "--data", d, "--stages", "50,100", "--window",
                            window, "--max-per-minute", "5"])
    assert rc == 0, err
    rid = out.strip()
    svc.tick()  # outside the window: nobody is asked to move

    rc, out, _ = run_cli(["rollout", "status", rid, "--data", d, "--json"])
    st = json.loads(out)
    assert (st["window"], st["max_per_minute"], st["waiting_for_window"], st["targeted"]) == (window, 5, True, 0)
    assert 7080 <= st["window_opens_in_seconds"] <= 7200
    rc, out, _ = run_cli(["rollout", "status", rid, "--data", d])
    assert rc == 0 and f"  pace: maintenance window {window} UTC, at most 5 device(s) a minute; WAITING for the " \
                       "window (opens in 1h5" in out
    got = client.get(f"/api/v1/rollouts/{rid}", headers={"Authorization": f"Bearer {create_token(store, 'viewer')}"})
    assert {k: got.json()[k] for k in ("window", "max_per_minute", "waiting_for_window")} == {
        "window": window, "max_per_minute": 5, "waiting_for_window": True}

    inside = time.time() + 2.5 * 3600
    assert service.status(store, rid, now=inside)["waiting_for_window"] is False  # inside it: not waiting
    svc.tick(now=inside)
    assert service.status(store, rid, now=inside)["targeted"] == 5  # the rate limit holds inside the window


def test_status_of_a_rollout_without_a_window_or_a_limit_says_so(fleet: Any) -> None:  # noqa: F811
    d = str(fleet[0].data_dir)
    rid = run_cli(["rollout", "start", "clinical", "1.1.0", "--data", d])[1].strip()

    rc, out, _ = run_cli(["rollout", "status", rid, "--data", d])

    assert rc == 0 and "  pace: any time (no maintenance window), no rate limit\n" in out
    st = json.loads(run_cli(["rollout", "status", rid, "--data", d, "--json"])[1])
    # the gates each stage must pass, as the README says status shows (found by a README walkthrough audit)
    gates = ", ".join(f"{k} {v:g}" for k, v in sorted(st["thresholds"].items()))
    assert f"  gates (each stage, after a bake of 600 s): {gates}\n" in out and "max_p95_latency_ratio" in gates
    assert (st["window"], st["max_per_minute"], st["waiting_for_window"]) == ("", 0, False)


def test_approving_stage_1_holds_the_rollout_until_an_operator_approves_it(fleet: Any) -> None:  # noqa: F811
    settings, store, svc = fleet
    d = str(settings.data_dir)
    rid = run_cli(["rollout", "start", "clinical", "1.1.0", "--data", d, "--stages", "50,100", "--approve", "1"])[1]
    rid = rid.strip()

    svc.tick()
    st = service.status(store, rid)
    assert (st["state"], st["targeted"], st["approve_stages"]) == ("awaiting_approval", 0, [1])
    assert run_cli(["rollout", "approve", rid, "--data", d])[0] == 0
    svc.tick()
    st = service.status(store, rid)
    assert st["state"] == "running" and st["targeted"] > 0


def test_a_cohort_that_matches_no_enrolled_device_is_refused_listing_the_values_in_use(fleet: Any,  # noqa: F811
                                                                                      api: Any) -> None:
    """A mistyped tag value started a rollout that waited for ever, and a rollback "completed" on no device
    (found by a README walkthrough audit)."""
    data = str(fleet[0].data_dir)
    rc, _, err = run_cli(["rollout", "start", "clinical", "1.1.0", "--data", data, "--cohort", "site=nowhere"])
    assert rc == 1 and err.startswith("fleet-server: error: --cohort site=nowhere matches none of the 20 enrolled "
                                      "devices; the values in use are site: "), err
    assert err.rstrip().endswith("(enrol or tag the devices first)")
    rc, _, err = run_cli(["rollback", "clinical", "--to", "1.0.0", "--data", data, "--cohort", "hw=rpi9"])
    assert rc == 1 and "--cohort hw=rpi9 matches none of the 20 enrolled devices" in err, err
    client, operator = api
    r = client.post("/api/v1/rollouts", json={"model": "clinical", "version": "1.1.0", "cohort": {"site": "x"}},
                    headers=operator)
    assert r.status_code == 422 and r.json()["detail"].startswith("cohort site=x matches none of the 20"), r.text
    assert rollouts(fleet) == 0


def test_a_rollback_that_would_move_every_device_forward_is_refused_pointing_to_a_rollout(fleet: Any,  # noqa: F811
                                                                                         api: Any) -> None:
    """The fleet runs 1.0.0: a 'rollback' to 1.1.0 installed it everywhere at once, without stages or gates
    (found by a README walkthrough audit)."""
    client, operator = api
    r = client.post("/api/v1/rollbacks", json={"model": "clinical", "to": "1.1.0"}, headers=operator)
    assert r.status_code == 409 and r.json()["detail"] == (
        "nothing to roll back: no device runs a clinical newer than 1.1.0 (20 would install it as a newer version); "
        "a rollback only goes back. To move devices forward, start a rollout of 1.1.0 (`fleet-server rollout start "
        "clinical 1.1.0`), with its stages and gates"), r.text
    rc, _, err = run_cli(["rollback", "clinical", "--to", "1.1.0", "--data", str(fleet[0].data_dir), "--cohort",
                          "site=a"])
    assert rc == 1 and "nothing to roll back: no device of the cohort runs a clinical newer than 1.1.0 (12 would" \
        in err, err
    assert rollouts(fleet) == 0


def _report_target(store: Any, devices: list[str], target: str) -> None:
    with store.write() as c:
        for d in devices:
            c.execute("UPDATE devices SET reported = json_set(reported, '$.target', ?) WHERE device_id = ?",
                      (target, d))


def test_devices_reporting_another_target_are_refused_a_rollout_or_rollback_naming_them(fleet: Any,  # noqa: F811
                                                                                       api: Any) -> None:
    """A device installs only packages built for its own target (``wrong_target``): a rollout to a cohort with
    such devices failed each of them, and the install-failure gate then rolled back the devices it fits. The
    packages here are built for x86_64-avx2; devices 18 and 19 (site b) report rpi4-aarch64, 00-05 report
    x86_64-avx2 and the rest report no target (older agents): only 18 and 19 are judged, and refused."""
    settings, store, svc = fleet
    _report_target(store, ["dev-18", "dev-19"], "rpi4-aarch64")
    _report_target(store, [f"dev-{i:02d}" for i in range(6)], "x86_64-avx2")
    client, operator = api
    r = client.post("/api/v1/rollouts", json={"model": "clinical", "version": "1.1.0"}, headers=operator)
    assert r.status_code == 409 and r.json()["detail"] == (
        "cannot start a rollout: clinical 1.1.0 is built for target x86_64-avx2, and 2 of the 20 device(s) of the "
        "cohort run another target, so they would refuse it (rpi4-aarch64: dev-18, dev-19). Narrow cohort with a "
        "tag that leaves them out, or publish a version built for their target"), r.text
    data = str(settings.data_dir)
    rc, _, err = run_cli(["rollout", "start", "clinical", "1.1.0", "--data", data, "--cohort", "site=b"])
    assert rc == 1 and "2 of the 8 device(s) of the --cohort run another target" in err, err
    rc, _, err = run_cli(["rollback", "clinical", "--to", "1.0.0", "--data", data])
    assert rc == 1 and "cannot roll clinical back to 1.0.0: clinical 1.0.0 is built for target x86_64-avx2, and 2 " \
        "of the 20" in err, err
    assert rollouts(fleet) == 0
    rc, out, err = run_cli(["rollout", "start", "clinical", "1.1.0", "--data", data, "--cohort", "site=a", "--stages",
                            "100", "--bake", "1h"])
    assert rc == 0 and rollouts(fleet) == 1, err  # the twelve of site a: six x86_64-avx2, six not reported
    rid = out.split()[0]
    _report_target(store, ["dev-07"], "rpi4-aarch64")  # reports its target only after the start
    svc.tick()
    st = service.status(store, rid)
    assert st["targeted"] == 11 and st["other_target"] == ["dev-07"], st  # never asked to install it
    assert "dev-07" not in service.get(store, rid).targeted
    rc, text, _ = run_cli(["rollout", "status", rid, "--data", data])
    assert "left out, they report another target than the package's: dev-07" in text, text
    rc, out, _ = run_cli(["devices", "list", "--data", data])
    lines = {line.split()[0]: line.split() for line in out.splitlines()}
    assert (lines["dev-18"][3], lines["dev-00"][3], lines["dev-10"][3]) == ("rpi4-aarch64", "x86_64-avx2", "-")


def test_a_report_carries_the_devices_target_and_refuses_a_malformed_one() -> None:
    from edgefleet_contracts.errors import SchemaError
    from edgefleet_contracts.report import Report

    doc = Report("dev-1", "2026-01-01T00:00:00Z", None, None, "idle", None, target="rpi4-aarch64").to_dict()
    assert Report.from_dict(doc).target == "rpi4-aarch64"
    assert Report.from_dict({k: v for k, v in doc.items() if k != "target"}).target == ""  # an older agent
    assert Report.from_dict({**doc, "target": "rpi4-aarch64+coral"}).target == "rpi4-aarch64+coral"  # any file stem
    for bad in (42, "x" * 129, "a\nb"):
        with pytest.raises(SchemaError, match="report.target must be a target name"):
            Report.from_dict({**doc, "target": bad})
