"""Every command shown in README.md runs as shown (issue 6).

README.md's fenced blocks are parsed (tests/readme/parse.py); each command block is a scenario run in README
order in one workspace, against real parts: the installed CLIs from .venv/bin, a real Mosquitto, a real fleet
server process on free loopback ports, a real device agent process. The tables below are the whole contract:

- PLACEHOLDERS: README values that cannot be used literally here (a device folder under /srv, fixed ports, a
  pager URL, a token that only exists once it was created).
- SPECS: one entry per README command, keyed by its exact text (continuations joined, comment dropped): its own
  placeholders, the output it must print, and what runs in the background. A README command that has no entry
  here and is not in COVERED_ELSEWHERE makes test_every_readme_command_is_run_or_covered_elsewhere fail, so the
  README cannot gain (or change) a command that nobody ran.
- COVERED_ELSEWHERE: commands that cannot run inside this test, each with the test that exercises them instead
  (the test must exist).
- HOIST: a command the README shows later but an earlier block needs (run just before that block's command).

Set-up between commands (a second package version, traffic from the device's app, rows for the simulator) is
done by the hooks below and never counts as running a README command.
"""

from __future__ import annotations

import csv
import json
import shlex
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from fleet_server.simulator import Receiver
from tests.brokers import Mosquitto, free_port
from tests.readme.parse import ReadmeFormatError, blocks, commands, expand
from tests.readme.runner import ROOT, Background, Snippet, Spec, Workspace
from tests.readme.walk import Tables, coverage_problems, read_readme, report, run_walkthrough

BUILD = ("model-packager build examples/clinical/model.onnx --name clinical --version 1.0.0 --target rpi4-aarch64 "
         "--classes malignant,benign --calibration examples/clinical/calibration.csv --holdout "
         "examples/clinical/holdout.csv --keys keys --out clinical-1.0.0.efpkg --owner clinical-ml")
PUBLISH = ("fleet-server models publish clinical-1.0.0.efpkg --data srv --owner clinical-ml --oncall "
           "https://pager.example/hooks/clinical --retrain-every 30d [--retrain-hook CMD] [--retrain-on-drift]")
SERVE_EXTERNAL = "fleet-server serve --data srv --broker mqtt://127.0.0.1:1883 --http 127.0.0.1:8480"
DRIFT_ROWS = 1000  # the device's default window_count: one full window closes and is summarised
SHIFTED = ("mean_radius", "mean_texture", "worst_radius")
PAGE_TIMEOUT_S = 60.0
BATCH_ROWS = 25
APPROVE_TEST = "tests/fleet_server/test_rollouts.py::test_approval_pause_resume_abort_and_restart"

PLACEHOLDERS: dict[str, str] = {
    "/srv/dev-7": "{ws}/dev-7",  # device folder (path prefix)
    "mqtt://fleet.example:1883": "{mosquitto}",  # the fleet's broker: the test's Mosquitto
    "mqtt://127.0.0.1:1883": "{mosquitto}",
    "mqtt://127.0.0.1:1884": "{mosquitto}",  # simulate: the broker the running server ingests from
    "127.0.0.1:8480": "127.0.0.1:{http}",
    "http://127.0.0.1:8480": "http://127.0.0.1:{http}",
    "https://pager.example/hooks/clinical": "{pager}",  # the owner's on-call route: a local receiver
    "TOKEN": "{token}",
}


# ---- readiness probes ------------------------------------------------------------------------------------------
def http_ok(url: str) -> Callable[[Workspace], bool]:
    def probe(ws: Workspace) -> bool:
        try:
            return httpx.get(ws.fill(url), timeout=1).status_code == 200
        except httpx.HTTPError:
            return False
    return probe


def tcp_open(port: str) -> Callable[[Workspace], bool]:
    def probe(ws: Workspace) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", int(ws.fill(port))), timeout=0.5):
                return True
        except OSError:
            return False
    return probe


def link_connected(ws: Workspace) -> bool:
    try:
        return bool(json.loads((ws.root / "dev-7" / "link.json").read_text()).get("state") == "connected")
    except (OSError, ValueError):
        return False


def all_of(*probes: Callable[[Workspace], bool]) -> Callable[[Workspace], bool]:
    return lambda ws: all(p(ws) for p in probes)


# ---- set-up hooks (not README commands) ------------------------------------------------------------------------
def _holdout(ws: Workspace) -> tuple[list[str], np.ndarray, np.ndarray]:
    with (ws.root / "examples" / "clinical" / "holdout.csv").open() as fh:
        rows = list(csv.reader(fh))
    names = rows[0][:-1]
    data = np.array(rows[1:], dtype=np.float64)
    return names, data[:, :-1], data[:, -1].astype(np.int64)


def build_second_version(ws: Workspace) -> None:
    ws.run_derived(BUILD, {"1.0.0": "1.1.0", "clinical-1.0.0.efpkg": "clinical-1.1.0.efpkg"},
                   note="set-up: clinical 1.1.0 for the install and rollout walkthroughs")


def write_feature_row(ws: Workspace) -> None:
    names, x, _ = _holdout(ws)
    (ws.root / "row.json").write_text(json.dumps(dict(zip(names, x[0].tolist(), strict=True))))


def write_batch_input(ws: Workspace) -> None:
    names, x, _ = _holdout(ws)
    with (ws.root / "patients.csv").open("w", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["key", *names])
        out.writerows([f"patient-{i}", *row] for i, row in enumerate(x[:BATCH_ROWS].tolist()))


PROVISION = ("device-agent provision --dir /srv/dev-7 --device-id clinic-7 --target rpi4-aarch64 --root-key "
             "keys/root.pub --fleet-key srv/keys/fleet.pub --broker mqtt://fleet.example:1883 --tag site=north "
             "--tag hw=rpi4 --package clinical-1.0.0.efpkg")


def provision_serve_device(ws: Workspace) -> None:
    ws.run_derived(PROVISION, {"/srv/dev-7": "{ws}/dev-serve", "clinic-7": "clinic-serve",
                               "mqtt://fleet.example:1883": "{mosquitto}"},
                   note="set-up: a device folder of its own for `serve` (one run or serve per folder, and "
                        "`run` holds dev-7)")


def write_simulator_rows(ws: Workspace) -> None:
    _, x, y = _holdout(ws)
    np.savez(ws.root / "holdout.npz", x=x.astype(np.float32), y=y)


def enroll_spare_device(ws: Workspace) -> None:
    from edgefleet_contracts.signing import generate_key, public_b64
    from fleet_server.devices import enroll
    from fleet_server.store import Store

    store = Store(ws.root / "srv" / "fleet.sqlite")
    try:
        enroll(store, "default", "clinic-9", public_b64(generate_key().public_key()))
    finally:
        store.close()


def create_spare_token(ws: Workspace) -> None:
    from fleet_server.auth import create_token, token_id
    from fleet_server.store import Store

    store = Store(ws.root / "srv" / "fleet.sqlite")
    try:
        ws.vars["spare_token_id"] = str(token_id(store, create_token(store, "viewer", name="spare")))
    finally:
        store.close()


def write_storage_example(ws: Workspace) -> None:
    """srv/server.toml becomes the README's example (the file `init` wrote, plus a [storage] table), so the
    housekeeping command shows the bounds read from it."""
    (example,) = [b.text for b in blocks(read_readme()) if b.heading == "Storage and retention" and b.kind == "prose"
                  and "[storage]" in b.text.splitlines()]
    conf = ws.root / "srv" / "server.toml"
    written = [ln for ln in conf.read_text().splitlines() if ln.strip()]
    assert all(ln in example.splitlines() for ln in written), (
        f"the README's server.toml example is not the file `init` wrote ({written}) plus [storage]:\n{example}")
    conf.write_text(example + "\n")


def publish_second_version(ws: Workspace) -> None:
    ws.run_derived(PUBLISH, {"clinical-1.0.0.efpkg": "clinical-1.1.0.efpkg", "https://pager.example/hooks/clinical":
                             "{pager}", "CMD": "{hook}"}, note="set-up: publish 1.1.0 for the rollout walkthrough")


def shift_site_north_and_wait_for_the_page(ws: Workspace) -> None:
    """The app on clinic-7 (site north) sends one window of inputs with three features shifted by two standard
    deviations through the agent's local HTTP API; the running server must page the owner and run the retraining
    hook (``--retrain-on-drift``)."""
    names, x, _ = _holdout(ws)
    rng = np.random.default_rng(0)
    rows = x[rng.integers(0, len(x), DRIFT_ROWS)].copy()
    for name in SHIFTED:
        j = names.index(name)
        rows[:, j] += 2 * x[:, j].std()
    body = {"instances": [{"features": dict(zip(names, r.tolist(), strict=True))} for r in rows]}
    resp = httpx.post(ws.fill("http://127.0.0.1:{agent_http}/v1/predict"), json=body, timeout=60)
    assert resp.status_code == 200, resp.text[:2000]
    pager: Receiver = ws.objects["pager"]
    hook_ran = Path(ws.fill("{ws}/retrain-hook-ran"))
    deadline = time.monotonic() + PAGE_TIMEOUT_S
    while time.monotonic() < deadline:
        if any(p.get("kind") == "input_drift" for p in pager.received) and hook_ran.exists():
            return
        time.sleep(0.25)
    raise AssertionError(f"no input-drift page ({pager.received}) or no retraining hook run "
                         f"({hook_ran.exists()}) within {PAGE_TIMEOUT_S:.0f} s of {DRIFT_ROWS} shifted predictions; "
                         f"server log:\n{ws.log_of('fleet-server-serve')[-3000:]}")


SPECS: dict[str, Spec] = {
    # ---- Packaging a model -----------------------------------------------------------------------------------
    "model-packager examples --out examples": Spec(expect=("clinical_model", "vision_model")),
    "model-packager keys init --dir keys":
        Spec(expect=("keyset v1",), capture={"keyid": r"signing key ([0-9a-f]{16})"}),
    BUILD: Spec(expect=("built clinical-1.0.0.efpkg: clinical 1.0.0 for rpi4-aarch64",)),
    "model-packager verify clinical-1.0.0.efpkg --root keys/root.pub --target rpi4-aarch64":
        Spec(expect=("OK: clinical 1.0.0 for rpi4-aarch64",)),
    "model-packager inspect clinical-1.0.0.efpkg [--json]":
        Spec(variants=("bare", "full"), expect=("rpi4-aarch64", "clinical-ml")),
    "model-packager keys rotate --dir keys": Spec(expect=("keyset v2",)),
    "model-packager keys revoke KEYID --dir keys":
        Spec(subs={"KEYID": "{keyid}"}, expect=("keyset v3", "revoked: {keyid}"), after=build_second_version,
             why="KEYID: the first signing key (printed by `keys init`), retired after the rotation"),
    # ---- Provisioning a device -------------------------------------------------------------------------------
    PROVISION: Spec(expect=("provisioned device clinic-7", "first model: clinical 1.0.0")),
    "device-agent status --dir /srv/dev-7 [--json]":
        Spec(variants=("bare", "full"), expect=("clinic-7", "clinical", "1.0.0")),
    "device-agent install clinical-1.1.0.efpkg --dir /srv/dev-7": Spec(expect=("installed: clinical 1.1.0 active",)),
    "device-agent rollback --dir /srv/dev-7": Spec(expect=("rolled back from clinical 1.1.0 to clinical 1.0.0",)),
    "device-agent run --dir /srv/dev-7": Spec(
        extra=("--http-port", "{agent_http}"),
        background=Background(all_of(http_ok("http://127.0.0.1:{agent_http}/v1/status"), link_connected)),
        why="--http-port: the default 8470 may be taken on a shared host"),
    # ---- Using the agent from an app on the device (inline commands in the prose) -------------------------------
    "device-agent batch --dir D --input DATA --store KV.sqlite": Spec(
        subs={"D": "{ws}/dev-7", "DATA": "patients.csv"}, before=write_batch_input,
        expect=(f"stored {BATCH_ROWS} predictions in KV.sqlite (0 rejected",),
        why="DATA: a CSV with a key column and the example holdout's features"),
    "device-agent serve --dir D --workers 4": Spec(
        subs={"D": "{ws}/dev-serve", "4": "2"}, extra=("--port", "{agent_serve_http}"), before=provision_serve_device,
        background=Background(http_ok("http://127.0.0.1:{agent_serve_http}/v1/status"),
                              stop_when_ready="the device keeps serving through `device-agent run`"),
        why="D: a device folder of its own (`run` holds dev-7); 2 workers on a 2-core host; --port: the default "
            "8470 may be taken"),
    "device-agent predict --dir D INPUT [--json]": Spec(
        variants=("bare", "full"), subs={"D": "{ws}/dev-7", "INPUT": "row.json"}, expect=("1.0.0",)),
    # ---- Running the fleet server ----------------------------------------------------------------------------
    "fleet-server init --data srv --root-key keys/root.pub": Spec(expect=("initialised srv",)),
    PUBLISH: Spec(subs={"CMD": "{hook}"},
                  expect=("published clinical 1.0.0 for rpi4-aarch64", "owner clinical-ml, paging {pager}"),
                  why="CMD: a hook that leaves a file, so the walkthrough can see it run on drift"),
    "fleet-server tokens create --data srv --role operator": Spec(capture={"token": r"^(\S{20,})$"}),
    "fleet-server tokens list --data srv": Spec(expect=("operator", "active")),
    "fleet-server tokens revoke ID --data srv": Spec(
        subs={"ID": "{spare_token_id}"}, before=create_spare_token, expect=("is revoked",),
        why="ID: a spare viewer token made for this, as the walkthrough's operator token is used later"),
    "fleet-server alerts events --kind token --data srv": Spec(expect=('"action": "revoked"', '"action": "created"')),
    "fleet-server devices enroll --data srv --device-id clinic-7 --public-key /srv/dev-7/keys/device.pub "
    "--tag site=north --tag hw=rpi4": Spec(expect=("enrolled clinic-7",)),
    "fleet-server devices revoke clinic-9 --data srv --reason stolen from ward 3": Spec(
        before=enroll_spare_device, expect=("revoked clinic-9: stolen from ward 3",),
        why="clinic-9: a spare device enrolled for this (clinic-7 is the walkthrough's device)"),
    "fleet-server serve --data srv": Spec(
        extra=("--http", "127.0.0.1:{http_embedded}", "--mqtt-port", "{mqtt_embedded}"),
        background=Background(all_of(http_ok("http://127.0.0.1:{http_embedded}/healthz"), tcp_open("{mqtt_embedded}")),
                              stop_when_ready="the same server with an external Mosquitto (next line) takes over the "
                                              "data folder"),
        why="--http/--mqtt-port: the defaults 8480/1884 may be taken on a shared host"),
    SERVE_EXTERNAL: Spec(extra=("--drift-interval", "1"), background=Background(http_ok("http://127.0.0.1:{http}/healthz")),
                         after=shift_site_north_and_wait_for_the_page,
                         why="--drift-interval 1: the page arrives within seconds instead of 30 s"),
    "fleet-server models show clinical --data srv":
        Spec(expect=("owner: clinical-ml", "paged at: {pager}", "retraining: every 30 days", "due ")),
    "fleet-server drift clinical --data srv --by site --by hw": Spec(
        exit=3, expect=("site=north", "hw=rpi4", "DRIFT on", "output drift", "operations", "accuracy"),
        why="exit 3 means drift found (as the README says): site north's inputs were shifted"),
    "fleet-server alerts list --data srv": Spec(expect=("input_drift",), capture={"alert_id": r"^\s*(\d+)\s+open\s"}),
    "fleet-server alerts ack ID --data srv": Spec(subs={"ID": "{alert_id}"}, expect=("acknowledged",)),
    "fleet-server backup --data srv --to srv-backup":
        Spec(expect=("backed up srv to srv-backup: 2 devices", "1 packages")),
    "fleet-server simulate --server http://127.0.0.1:8480 --broker mqtt://127.0.0.1:1884 --token TOKEN --root-key "
    "keys/root.pub --fleet-key srv/keys/fleet.pub --rows holdout.npz --dir sim --devices 200 --package "
    "clinical-1.0.0.efpkg --target rpi4-aarch64 --duration 60": Spec(
        subs={"200": "3", "60": "2"}, expect=("3 devices, ",), before=write_simulator_rows,
        why="3 devices for 2 s instead of 200 for 60 s; holdout.npz is written from the example holdout CSV"),
    "fleet-server housekeeping --data srv": Spec(
        before=write_storage_example,
        expect=("quarantine_max_rows = 100000 (default)", "quarantine_max_payload_mb = 64 (file srv/server.toml)",
                "summary_retention_days = 0 (file srv/server.toml)", "pruned 0 summaries (kept forever)"),
        why="srv/server.toml is first given the README's [storage] example"),
    # ---- Rollouts and rollbacks ------------------------------------------------------------------------------
    "fleet-server rollout start clinical 1.1.0 --data srv --cohort site=north --stages 1,10,50,100 --bake 10m "
    "[--max-per-minute 20] [--window 02:00-04:00] [--gate max_p95_latency_ratio=1.5] [--approve 3]":
        Spec(capture={"rollout_id": r"^(r-[0-9a-f]+)$"}, before=publish_second_version),
    "fleet-server rollout status ID --data srv":
        Spec(subs={"ID": "{rollout_id}"}, expect=("rollout {rollout_id}", "clinical 1.1.0 (previous 1.0.0)")),
    "fleet-server rollout pause|resume|abort|approve ID --data srv": Spec(
        subs={"ID": "{rollout_id}"}, expect=("{rollout_id}: ",),
        # approve needs a stage that passed its gates and waits for approval (a 10 min bake with real traffic)
        covered_elsewhere={"approve": APPROVE_TEST}),
    "fleet-server rollback clinical --to 1.0.0 --data srv [--cohort site=north]":
        Spec(expect=("rolled back to 1.0.0",)),
}

SNIPPETS: dict[str, Snippet] = {
    "python: from device_agent.agent import Agent": Snippet(
        replace={'"/srv/dev-7"': '"{ws}/dev-7"',
                 '{"mean_radius": 14.2, ...}': '__import__("json").load(open("row.json"))'},
        check='assert p.version == "1.0.0" and p.label in ("malignant", "benign") and p.prediction_id, p\n'
              "agent.close()",
        before=write_feature_row),
}

COVERED_ELSEWHERE: dict[str, str] = {
    "make demo": "tests/e2e/test_demo.py::test_demo_story_with_six_devices",
    # `make test` is this suite (ruff, mypy, pytest): running it from a test would recurse. Its recipe is checked:
    "make test": "tests/test_readme_commands.py::test_make_targets_run_what_the_readme_says",
    "make demo-packages": "tests/model_packager/test_demo.py::test_demo_builds_and_verifies_every_example",
    # The benchmarks take minutes and their figures are written down by hand; only the recipe is checked:
    "make bench": "tests/test_readme_commands.py::test_make_targets_run_what_the_readme_says",
    # Runs tests/arm under aarch64 emulation (root, minutes the first time): its own step in .ci/run.
    "make test-arm": "tests/arm/test_agent_on_arm.py::test_predictions_match_the_x86_run_on_the_same_inputs",
}

HOIST: dict[str, tuple[str, str]] = {
    "fleet-server init --data srv --root-key keys/root.pub":
        ("device-agent provision", "a device pins the fleet key that `fleet-server init` creates"),
}

TABLES = Tables(PLACEHOLDERS, SPECS, SNIPPETS, COVERED_ELSEWHERE, HOIST)


# ---- tests -----------------------------------------------------------------------------------------------------
def test_every_readme_command_is_run_or_covered_elsewhere() -> None:
    problems = coverage_problems(read_readme(), TABLES)
    assert not problems, "\n".join(problems)


def test_a_new_readme_command_or_block_language_fails_the_coverage_check() -> None:
    readme = read_readme()
    extra = readme + "\n## Dashboard\n\n```\nfleet-server dashboard --data srv\n```\n"
    assert any("'fleet-server dashboard --data srv' is neither run nor allow-listed" in p
               for p in coverage_problems(extra, TABLES))
    changed = readme.replace("--by site", "--by ward")
    assert any("is neither run nor allow-listed" in p for p in coverage_problems(changed, TABLES))
    odd = readme + "\n```yaml\nkey: value\n```\n"
    assert any("language 'yaml'" in p for p in coverage_problems(odd, TABLES))


def test_notation_is_expanded_into_the_invocations_it_stands_for() -> None:
    (block,) = blocks("## H\n```\na x \\\n  [--json] # c; d\nb pause|resume ID ; c [--k V] [--f]\n```\n")
    cmds = commands(block)
    assert [c.key for c in cmds] == ["a x [--json]", "b pause|resume ID", "c [--k V] [--f]"]
    assert [i.argv for i in expand(cmds[0].tokens, with_optional=False)] == [("a", "x")]
    assert [(i.alternative, i.argv) for i in expand(cmds[1].tokens, with_optional=True)] == [
        ("pause", ("b", "pause", "ID")), ("resume", ("b", "resume", "ID"))]
    assert [i.argv for i in expand(cmds[2].tokens, with_optional=True)] == [("c", "--k", "V", "--f")]
    with pytest.raises(ReadmeFormatError, match="never closed"):
        blocks("```\na\n")
    with pytest.raises(ReadmeFormatError, match="unclosed"):
        expand(("a", "[--b"), with_optional=True)


def test_make_targets_run_what_the_readme_says() -> None:
    """`make -n` prints each recipe without running it: `make test` is lint + typecheck + every test, `make demo`
    runs the demo package (exercised by tests/e2e/test_demo.py), and the targets the README names exist."""
    def recipe(target: str) -> str:
        proc = subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True, timeout=30,
                              check=False)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    test = recipe("test")
    assert "ruff check ." in test and "/mypy" in test and "/pytest -q" in test
    assert "-m edgefleet_demo --out demo-out" in recipe("demo")
    assert "-m model_packager.demo" in recipe("demo-packages")
    assert "bench/ingest.py" in recipe("bench")


@pytest.fixture()
def workspace(tmp_path: Path) -> Iterator[Workspace]:
    pager = Receiver()
    broker = Mosquitto(tmp_path / "mosquitto").start()
    ws = Workspace(tmp_path / "ws", {
        "mosquitto": broker.url, "pager": pager.url, "http": str(free_port()), "http_embedded": str(free_port()),
        "mqtt_embedded": str(free_port()), "agent_http": str(free_port()), "agent_serve_http": str(free_port()),
        "hook": f"touch {shlex.quote(str(tmp_path / 'ws' / 'retrain-hook-ran'))}"})
    ws.root.mkdir()
    ws.objects["pager"] = pager
    try:
        yield ws
    finally:
        problems = ws.stop_all()
        broker.close()
        pager.close()
        print(report(ws))
        assert not problems, "\n".join(problems)


def test_readme_walkthrough_runs_every_command_as_shown(workspace: Workspace) -> None:
    run_walkthrough(read_readme(), workspace, TABLES)
    ran = {r.key for r in workspace.ran if r.status is not None or "background" in r.note}
    assert ran >= set(SPECS), f"not run: {sorted(set(SPECS) - ran)}"
