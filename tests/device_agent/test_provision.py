"""`device-agent provision` and `status`: a complete device folder or none, clear refusals, first model offline."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from device_agent.cli import main
from device_agent.config import DeviceDir
from device_agent.provision import AlreadyProvisionedError, ProvisionError
from device_agent.trust_store import TrustStore
from edgefleet_contracts.signing import key_id, load_private_key, load_public_key
from edgefleet_contracts.targets import default_targets_dir

from . import TARGET, new_device, packages, serve


def _args(built, d: Path, *extra: str) -> list[str]:
    return ["provision", "--dir", str(d), "--device-id", "ward3-01", "--target", TARGET,
            "--root-key", str(built.keys / "root.pub"), "--fleet-key", str(packages(built).fleet_pub), *extra]


def _siblings(d: Path) -> list[str]:
    return sorted(p.name for p in d.parent.iterdir() if p.name != d.name)


def test_provision_writes_the_whole_device_folder(built, tmp_path, capsys):
    d = tmp_path / "dev"
    assert main(_args(built, d, "--fleet", "north", "--broker", "mqtt://broker.local:1883",
                      "--tag", "site=ward-3", "ring=canary", "--tag", "owner=icu")) == 0
    dev = DeviceDir(d)
    cfg = dev.load_config()
    assert (cfg.device_id, cfg.fleet, cfg.target, cfg.broker) == ("ward3-01", "north", TARGET, "mqtt://broker.local:1883")
    assert cfg.tags == {"site": "ward-3", "ring": "canary", "owner": "icu"}
    assert dev.target_file.read_bytes() == (default_targets_dir() / f"{TARGET}.toml").read_bytes()
    assert stat.S_IMODE(dev.device_key.stat().st_mode) == 0o600
    assert stat.S_IMODE(dev.keys.stat().st_mode) == 0o700
    device_key = load_private_key(dev.device_key)
    assert key_id(load_public_key(dev.device_pub)) == key_id(device_key.public_key())
    assert key_id(load_public_key(dev.root_pub)) == key_id(load_public_key(built.keys / "root.pub"))
    assert key_id(load_public_key(dev.fleet_pub)) == key_id(load_public_key(packages(built).fleet_pub))
    trust = TrustStore(dev)
    assert trust.state.keyset_version == 0 and trust.trusted_keyset() is None
    assert dev.slots.is_dir() and not dev.active_file.exists()
    assert _siblings(d) == []  # no temporary folder left behind
    out = capsys.readouterr().out
    assert "provisioned device ward3-01" in out and key_id(device_key.public_key())[:16] in out


def test_existing_device_is_refused_without_force_and_force_replaces_it_cleanly(built, tmp_path, capsys):
    d = tmp_path / "dev"
    assert main(_args(built, d)) == 0
    first_key = DeviceDir(d).device_key.read_bytes()
    capsys.readouterr()

    assert main(_args(built, d)) == 1
    err = capsys.readouterr().err
    assert "error (already_provisioned)" in err and "--force" in err and "ward3-01" in err
    assert DeviceDir(d).device_key.read_bytes() == first_key

    assert main(_args(built, d, "--force", "--fleet", "south")) == 0
    assert DeviceDir(d).device_key.read_bytes() != first_key
    assert DeviceDir(d).load_config().fleet == "south"
    assert _siblings(d) == []


def test_failed_forced_reprovisioning_leaves_the_old_device_untouched(built, tmp_path):
    d = new_device(built, tmp_path / "dev", package=packages(built).v100)
    before = {p.relative_to(d.path): p.read_bytes() for p in d.path.rglob("*") if p.is_file()}
    # The package is for x86_64-avx2; a vnni device refuses it, so the new folder is never swapped in.
    with pytest.raises(ProvisionError) as exc:
        new_device(built, d.path, package=packages(built).v100, target="x86_64-vnni", force=True)
    assert exc.value.reason == "wrong_target"
    after = {p.relative_to(d.path): p.read_bytes() for p in d.path.rglob("*") if p.is_file()}
    assert after == before
    assert _siblings(d.path) == []


def test_failed_first_package_leaves_no_folder_at_all(built, tmp_path):
    d = tmp_path / "dev"
    with pytest.raises(ProvisionError, match="built for target 'x86_64-avx2', not 'x86_64-vnni'"):
        new_device(built, d, package=packages(built).v100, target="x86_64-vnni")
    assert not d.exists() and _siblings(d) == []


def test_force_never_replaces_a_folder_that_is_not_a_device(built, tmp_path, capsys):
    d = tmp_path / "home"
    d.mkdir()
    (d / "thesis.tex").write_text("precious")
    assert main(_args(built, d, "--force")) == 1
    assert "not a device folder" in capsys.readouterr().err
    assert (d / "thesis.tex").read_text() == "precious"


def test_empty_existing_folder_is_provisioned(built, tmp_path):
    d = tmp_path / "mnt"
    d.mkdir()
    new_device(built, d)
    assert DeviceDir(d).load_config().device_id == "dev-1"
    with pytest.raises(AlreadyProvisionedError):
        new_device(built, d)


def test_unknown_target_lists_the_known_ones(built, tmp_path, capsys):
    args = _args(built, tmp_path / "dev")
    args[args.index(TARGET)] = "pdp11"
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "error (unknown_target): unknown target 'pdp11'; known targets:" in err
    assert "rpi4-aarch64" in err and "x86_64-avx2" in err
    assert not (tmp_path / "dev").exists()


def test_armv7_is_refused_with_its_reason(built, tmp_path, capsys):
    args = _args(built, tmp_path / "dev")
    args[args.index(TARGET)] = "armv7-32bit"
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "error (unsupported_target)" in err and "no armv7" in err and "64-bit OS" in err


def test_bad_key_files_are_clear_errors(built, tmp_path, capsys):
    junk = tmp_path / "junk.pub"
    junk.write_text("-----BEGIN PUBLIC KEY-----\nnot a key\n-----END PUBLIC KEY-----\n")
    args = _args(built, tmp_path / "dev")
    args[args.index("--root-key") + 1] = str(junk)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "error (bad_key)" in err and "--root-key" in err and "is not an Ed25519 public key" in err

    args[args.index("--root-key") + 1] = str(tmp_path / "missing.pub")
    assert main(args) == 1
    assert "does not exist" in capsys.readouterr().err

    same = _args(built, tmp_path / "dev")
    same[same.index("--fleet-key") + 1] = str(built.keys / "root.pub")
    assert main(same) == 1
    assert "are the same key" in capsys.readouterr().err
    assert not (tmp_path / "dev").exists()


def test_tag_without_equals_is_a_usage_error(built, tmp_path, capsys):
    assert main(_args(built, tmp_path / "dev", "--tag", "canary")) == 2
    assert "tag 'canary' must look like key=value" in capsys.readouterr().err
    assert not (tmp_path / "dev").exists()


def test_package_is_installed_at_provisioning_and_status_shows_it_active(built, tmp_path, capsys):
    d = tmp_path / "dev"
    assert main(_args(built, d, "--package", str(packages(built).v100))) == 0
    assert "first model: clinical 1.0.0 active in slot a" in capsys.readouterr().out
    assert serve(DeviceDir(d)) == "1.0.0"

    assert main(["status", "--dir", str(d), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["device_id"] == "ward3-01" and st["target"] == TARGET and st["fleet"] == "default"
    assert st["active"]["name"] == "clinical" and st["active"]["version"] == "1.0.0" and st["active"]["slot"] == "a"
    assert st["standby"] is None
    assert st["update"]["state"] == "idle"
    assert st["last_result"]["status"] == "installed" and st["last_result"]["version"] == "1.0.0"
    assert st["outbox_depth"] == 0
    assert st["link"]["state"] == "offline" and st["link"]["detail"] == "no broker configured"

    assert main(["status", "--dir", str(d)]) == 0
    text = capsys.readouterr().out
    assert "active    clinical 1.0.0 (slot a)" in text and "offline (no broker configured)" in text


def test_status_reads_outbox_depth_and_link_state(built, tmp_path, capsys):
    d = new_device(built, tmp_path / "dev", broker="mqtt://127.0.0.1:1883")
    assert main(["status", "--dir", str(d.path), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["link"]["state"] == "unknown" and st["active"] is None

    con = sqlite3.connect(d.outbox)
    con.execute("CREATE TABLE unrelated (x)")  # an outbox file without the table yet: depth 0
    con.commit()
    assert main(["status", "--dir", str(d.path), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["outbox_depth"] == 0
    con.execute("CREATE TABLE outbox (id INTEGER PRIMARY KEY, body TEXT)")
    con.executemany("INSERT INTO outbox (body) VALUES (?)", [("a",), ("b",), ("c",)])
    con.commit()
    con.close()
    (d.path / "link.json").write_text(json.dumps({"state": "connected", "since": "2026-01-01T00:00:00Z",
                                                  "last_error": None}))
    assert main(["status", "--dir", str(d.path), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["outbox_depth"] == 3
    assert st["link"] == {"state": "connected", "since": "2026-01-01T00:00:00Z", "last_error": None}


def test_status_of_a_folder_that_is_not_a_device_says_so(tmp_path, capsys):
    assert main(["status", "--dir", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert "error (config)" in err and "run `device-agent provision`" in err


def test_usage_errors_exit_2(capsys):
    assert main([]) == 2
    assert main(["install", "--dir"]) == 2
    assert main(["frobnicate"]) == 2


# ---- status shows what GET /v1/status shows ------------------------------------------------------------------
def _below_the_floor(dev: DeviceDir) -> None:
    text = dev.config_file.read_text()
    dev.config_file.write_text(text.replace("min_window_samples = 20", "min_window_samples = 5"))


def test_status_shows_every_field_of_the_http_status_with_the_k_in_force(built, tmp_path, capsys):
    """README: with a config.toml below the privacy floor, "`status` shows "k": 10"; the CLI showed no k at all."""
    from device_agent.agent import Agent

    dev = new_device(built, tmp_path / "dev", package=built.package)
    _below_the_floor(dev)
    agent = Agent.open(dev.path, background=False)
    try:
        http = agent.status()  # what GET /v1/status answers
    finally:
        agent.close()
    assert main(["status", "--dir", str(dev.path), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert set(http) <= set(st), sorted(set(http) - set(st))
    assert (st["k"], http["k"]) == (10, 10)
    for name in ("device_id", "fleet", "target", "model", "dp_epsilon", "dp_epsilon_spent"):
        assert st[name] == http[name], name
    assert st["predictions"] is None and st["rejected"] is None  # counters of a running agent: none runs
    assert st["agent"]["state"] == "not_running"

    assert main(["status", "--dir", str(dev.path)]) == 0
    text = capsys.readouterr().out
    assert "privacy   k 10 (windows below k are held and merged forward); no noise (dp_epsilon 0)" in text
    assert "agent     not running: no `device-agent run`" in text

    import subprocess
    import sys

    from tests.brokers import free_port

    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dev.agent_file.write_text(json.dumps({"pid": int(gone.stdout), "http": "http://127.0.0.1:1"}))  # SIGKILLed
    assert main(["status", "--dir", str(dev.path), "--json"]) == 0
    agent_state = json.loads(capsys.readouterr().out)["agent"]
    assert agent_state["state"] == "not_running" and "which is not running" in agent_state["detail"]
    url = f"http://127.0.0.1:{free_port()}"  # a live pid whose API does not answer
    dev.agent_file.write_text(json.dumps({"pid": os.getpid(), "http": url}))
    assert main(["status", "--dir", str(dev.path), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["agent"]["state"] == "unreachable" and st["agent"]["url"] == url and st["predictions"] is None


def test_status_asks_the_running_agent_for_its_counters(built, tmp_path, capsys):
    import subprocess
    import sys
    import time

    import httpx
    import numpy as np

    from tests.brokers import free_port

    dev = new_device(built, tmp_path / "dev", package=built.package)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.Popen([sys.executable, "-m", "device_agent.cli", "run", "--dir", str(dev.path), "--http-port",
                             str(port)], env=env, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"{base}/v1/status", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline and proc.poll() is None, "the agent did not come up"
            time.sleep(0.05)
        with np.load(built.holdout) as z:
            rows = z["x"][:3]
        for row in rows:
            assert httpx.post(f"{base}/v1/predict", json={"inputs": [float(v) for v in row]}).status_code == 200
        assert httpx.post(f"{base}/v1/predict", json={"inputs": [1.0]}).status_code == 422
        http = httpx.get(f"{base}/v1/status").json()

        assert main(["status", "--dir", str(dev.path), "--json"]) == 0  # the agent on a non-default port: found
        st = json.loads(capsys.readouterr().out)
        assert st["agent"] == {"state": "running", "pid": proc.pid, "url": base, "detail": None}
        assert set(http) <= set(st)
        assert (st["predictions"], st["rejected"], st["k"]) == (3, {"wrong_shape": 1}, 20)
        assert main(["status", "--dir", str(dev.path)]) == 0
        assert f"agent     running (pid {proc.pid}, {base}): 3 predictions, 1 rejected" in capsys.readouterr().out
    finally:
        proc.terminate()
        proc.wait(30)
    assert not dev.agent_file.exists()  # a clean stop withdraws it
    assert main(["status", "--dir", str(dev.path), "--json"]) == 0
    st = json.loads(capsys.readouterr().out)
    assert st["agent"]["state"] == "not_running" and st["predictions"] is None


@pytest.mark.parametrize(("flags", "says"), [
    (["--device-id", "d9\n"], "device_id 'd9\\n' must be 1-64 characters"),
    (["--fleet", "north\n"], "fleet 'north\\n' must be 1-64 characters"),
    (["--broker", "mqtt://broker.local:99999"], "broker 'mqtt://broker.local:99999' must look like mqtt://host:port"),
    (["--broker", "mqtt://broker.local:port"], "(a port from 1 to 65535)"),
])
def test_provision_refuses_what_the_agent_could_not_start_with_and_writes_nothing(built, tmp_path, capsys, flags,
                                                                                   says):
    d = tmp_path / "dev"
    args = _args(built, d)
    if flags[0] == "--device-id":
        args[args.index("--device-id") + 1] = flags[1]
    else:
        args += flags
    assert main(args) != 0
    assert says in capsys.readouterr().err
    assert not d.exists() and _siblings(d) == []


def test_a_device_provisioned_under_umask_000_has_no_group_or_world_writable_file(built, tmp_path):
    d = tmp_path / "dev"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    cmd = [sys.executable, "-c", "import os, sys; os.umask(0); from device_agent.cli import main; "
           "sys.exit(main(sys.argv[1:]))", *_args(built, d, "--package", str(packages(built).v100))]
    assert subprocess.run(cmd, env=env, capture_output=True, timeout=120).returncode == 0
    writable = [str(p.relative_to(d)) for p in [d, *d.rglob("*")] if p.stat().st_mode & 0o022]
    assert writable == [], writable
    assert stat.S_IMODE(DeviceDir(d).device_key.stat().st_mode) == 0o600
