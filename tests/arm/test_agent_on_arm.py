"""The agent on an emulated Raspberry Pi 4: install signed packages, predict as x86 does, sign a summary, survive
a killed install. Run by `make test-arm` inside the arm64 root filesystem (see hardware/arm/run-tests.sh).

Tolerance against the x86 run (same packages, same inputs, same agent code and library releases): every
probability within ``ATOL`` = 1e-5 and every predicted class identical. All three example packages are int8
(ONNX int8-dynamic; ONNX QDQ int8-static after OpenCV image preprocessing; LiteRT int8), run by different
kernels on each architecture (x86 AVX2, Arm NEON); measured: at most 1.2e-7 apart (one float32 rounding step
near 1.0), LiteRT bit-identical. 1e-5 leaves room for float32 summation order; anything more (such as an int8
kernel rounding differently on Arm) fails the test and deserves a look before shipping to a Pi.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
from conftest import MODELS, TARGET, Work, new_device

from device_agent.agent import Agent
from device_agent.cli import status_doc
from device_agent.config import DeviceDir
from device_agent.provision import ProvisionError, ProvisionRequest, provision
from device_agent.runtime import open_runtime
from device_agent.slots import Slots
from device_agent.updater import FAILPOINT_ENV, Updater
from edgefleet_contracts.signing import key_id, load_public_key, verify_envelope
from edgefleet_contracts.summary import Summary
from edgefleet_contracts.targets import get_target

ATOL = 1e-5


def serving(device: DeviceDir) -> str:
    """The active slot's version, after its golden inputs pass through the runtime on this machine."""
    active = Slots(device).active()
    assert active is not None, "the device has no active model"
    folder, m = active
    rt = open_runtime(m.runtime, folder / m.model_file, m.output.probabilities, threads=1)
    with np.load(folder / "golden.npz") as z:
        got, want, tol = rt.run(z["x"]), z["probabilities"], float(z["tolerance"])
    assert np.max(np.abs(got - want)) <= tol and (got.argmax(axis=1) == want.argmax(axis=1)).all()
    return m.version


def test_this_is_an_arm_pi4_cpu_and_the_runtimes_load():
    import onnxruntime
    from ai_edge_litert.interpreter import Interpreter  # noqa: F401 - importing is the check
    from numpy._core._multiarray_umath import __cpu_features__ as features

    assert platform.machine() == "aarch64"
    # A Cortex-A72 (QEMU_CPU): NEON, but no dot product, fp16 arithmetic or SVE, which qemu's default "max" has.
    assert features["ASIMD"] and not (features["ASIMDDP"] or features["ASIMDHP"] or features["SVE"])
    assert get_target(TARGET).host_matches()
    cpuinfo = Path("/proc/cpuinfo").read_text()
    assert "CPU implementer\t: 0x41" in cpuinfo and "CPU part\t: 0xd08" in cpuinfo
    assert "CPUExecutionProvider" in onnxruntime.get_available_providers()


def test_signed_packages_install_on_the_pi4_target_and_pass_their_smoke_test(work: Work, devices):
    for name in MODELS:
        st = status_doc(devices[name])
        assert (st["active"]["name"], st["active"]["version"], st["target"]) == (name, "1.0.0", TARGET)
        assert st["last_result"]["status"] == "installed"
        smoke = json.loads((devices[name].slot(st["active"]["slot"]) / ".smoke.json").read_text())
        assert smoke["passed"] is True, smoke  # golden outputs computed on x86, reproduced here
        assert serving(devices[name]) == "1.0.0"


def test_a_tampered_package_is_refused_on_arm(work: Work, tmp_path):
    src = work.package("clinical")
    with tarfile.open(src, "r:") as tar:
        model = tar.getmember("model.onnx")
    data = bytearray(src.read_bytes())
    data[model.offset_data + model.size // 2] ^= 0xFF  # one model byte: its sha256 no longer matches the manifest
    bad = tmp_path / "clinical-1.0.0.efpkg"
    bad.write_bytes(bytes(data))
    with pytest.raises(ProvisionError) as err:
        provision(ProvisionRequest(directory=tmp_path / "dev", device_id="pi-bad", target=TARGET,
                                   root_key=work.device / "root.pub", fleet_key=work.device / "fleet.pub",
                                   package=bad))
    assert err.value.reason == "file_mismatch", err.value


@pytest.mark.parametrize("name", MODELS)
def test_predictions_match_the_x86_run_on_the_same_inputs(work: Work, devices, name):
    agent = Agent.open(devices[name].path, background=False)
    try:
        assert agent.model is not None and agent.model.manifest.target == TARGET
        got = np.stack([agent.predict(x).probabilities for x in work.inputs(name)])
    finally:
        agent.close()
    want = work.expected[f"{name}_p"]
    assert got.shape == want.shape == (work.meta["_"]["rows"], len(agent.model.classes))
    diff = float(np.max(np.abs(got - want)))
    same = int((got.argmax(axis=1) == want.argmax(axis=1)).sum())
    (work.out / f"diff-{name}.json").write_text(json.dumps({"max_abs_diff": diff, "same_class": same,
                                                            "rows": len(want)}))
    print(f"{name}: max |p_arm - p_x86| = {diff:.3g}, same class on {same}/{len(want)} rows")
    assert diff <= ATOL, f"{name}: probabilities differ from x86 by up to {diff}"
    assert same == len(want), f"{name}: {len(want) - same} rows got another class than on x86"


def test_a_window_summary_is_produced_signed_and_queued(work: Work, tmp_path):
    dev = new_device(work, tmp_path / "dev", "clinical")
    n = work.meta["_"]["summary_rows"]
    agent = Agent.open(dev.path, background=False)
    try:
        for x in work.inputs("clinical")[:n]:
            agent.predict(x)
        agent.close_window(wait=True)
        rows = agent.sink.peek(10)  # type: ignore[attr-defined]  # the SQLite outbox
        assert len(rows) == 1 and rows[0].kind == "summary"
        envelope = agent.sign(rows[0].document())  # what the MQTT link sends
    finally:
        agent.close()
    pub = load_public_key(dev.device_pub)
    signed, _ = verify_envelope(envelope, {key_id(pub): pub}, "summary")
    s = Summary.from_dict(signed)
    assert (s.device_id, s.model, s.version, s.count, s.seq) == ("pi-clinical", "clinical", "1.0.0", n, 1)
    assert s.class_counts == work.meta["_"]["summary_class_counts"]  # the classes x86 predicted
    assert all(sum(f.counts) == f.n == n for f in s.features)
    raw = {repr(float(v)) for v in np.ravel(work.inputs("clinical")[:n]) if len(repr(float(v))) > 6}
    assert not [r for r in raw if r in json.dumps(signed)]  # no raw input value leaves the device
    (work.out / "summary.json").write_text(json.dumps(envelope))  # verified again on x86 by x86_side.py check
    shutil.copy(dev.device_pub, work.out / "device.pub")


@pytest.mark.parametrize("state", ["smoke_test", "activating"])
def test_an_install_killed_midway_recovers_to_the_old_version_then_updates(work: Work, tmp_path, state):
    """SIGKILL right after entering ``state`` (the updater's failpoint), in a separate emulated process."""
    dev = new_device(work, tmp_path / "dev", "clinical")
    env = {**os.environ, FAILPOINT_ENV: state}
    proc = subprocess.run([sys.executable, "-m", "device_agent.cli", "install", str(work.package("clinical", "1.1.0")),
                           "--dir", str(dev.path)], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr

    st = status_doc(dev)  # start-up recovery
    assert st["update"]["state"] == "idle" and st["active"]["version"] == "1.0.0"
    assert (st["last_result"]["status"], st["last_result"]["reason"]) == ("failed", "interrupted")
    assert serving(dev) == "1.0.0"
    assert sorted(p.name for p in dev.slots.iterdir()) == [st["active"]["slot"]]  # no half-written slot left

    again = Updater(dev).install(work.package("clinical", "1.1.0"))
    assert again.status == "installed", again.message
    assert serving(dev) == "1.1.0"
