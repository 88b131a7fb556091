"""The updater: A/B install, rollback, every rejection recorded with its reason, smoke test, clock and keyset."""

from __future__ import annotations

import io
import json
import logging
import shutil
from datetime import timedelta
from pathlib import Path

import cv2
import numpy as np
import pytest

from device_agent.cli import main
from device_agent.config import DeviceDir
from device_agent.desired_handler import RETRYABLE
from device_agent.slots import BusyError, Slots
from device_agent.trust_store import TrustStore, TrustStoreError
from device_agent.updater import (
    TRANSITIONS,
    IllegalTransitionError,
    Updater,
    UpdateRecord,
    UpdateState,
    check_transition,
    compare_golden,
)
from edgefleet_contracts.signing import generate_key, key_id, short
from edgefleet_contracts.timeutil import utcnow

from . import (
    TARGET,
    corrupt_golden,
    members,
    new_device,
    only_slots_left,
    packages,
    repack,
    serve,
    signing_key,
    with_expiry,
    with_version,
    write,
)


@pytest.fixture
def dev(built, tmp_path) -> DeviceDir:
    return new_device(built, tmp_path / "dev")


@pytest.fixture
def upgraded(built, dev) -> DeviceDir:
    """A device that installed 1.0.0 and then 1.1.0 (standby: 1.0.0)."""
    pk = packages(built)
    assert Updater(dev).install(pk.v100).status == "installed"
    assert Updater(dev).install(pk.v110).status == "installed"
    return dev


def _last(dev: DeviceDir) -> dict:
    return json.loads(dev.update_file.read_text())["last_result"]


def _versions(dev: DeviceDir) -> tuple[str | None, str | None]:
    s = Slots(dev)
    a, b = s.active(), s.standby()
    return (a[1].version if a else None, b[1].version if b else None)


# ---- install and rollback ---------------------------------------------------------------------------------
def test_install_then_upgrade_keeps_the_previous_version_in_standby(built, dev):
    pk = packages(built)
    r1 = Updater(dev).install(pk.v100)
    assert (r1.status, r1.reason, r1.slot, r1.version) == ("installed", "installed", "a", "1.0.0")
    assert _versions(dev) == ("1.0.0", None) and serve(dev) == "1.0.0"

    r2 = Updater(dev).install(pk.v110)
    assert (r2.status, r2.slot) == ("installed", "b")
    assert "standby clinical 1.0.0 in slot a" in r2.message
    assert _versions(dev) == ("1.1.0", "1.0.0") and serve(dev) == "1.1.0"
    pointer = json.loads(dev.active_file.read_text())
    assert set(pointer) == {"slot", "name", "version", "activated"}
    assert (pointer["slot"], pointer["name"], pointer["version"]) == ("b", "clinical", "1.1.0")
    rec = UpdateRecord.load(dev.update_file)
    assert rec.state == UpdateState.IDLE and rec.last_result == r2.to_dict()
    # every state was entered, in order, each with a reason
    steps = [(h["from"], h["to"]) for h in rec.history[-5:]]
    assert steps == [("idle", "verifying"), ("verifying", "staging"), ("staging", "smoke_test"),
                     ("smoke_test", "activating"), ("activating", "idle")]
    assert all(h["reason"] for h in rec.history)
    assert only_slots_left(dev)


def test_rollback_switches_to_the_standby_without_the_package_file(built, tmp_path, dev, capsys):
    pk = packages(built)
    for src in (pk.v100, pk.v110):
        copy = tmp_path / src.name
        shutil.copy(src, copy)
        assert Updater(dev).install(copy).ok
        copy.unlink()  # the device keeps nothing but its slots

    assert main(["rollback", "--dir", str(dev.path)]) == 0
    assert "rolled_back: rolled back from clinical 1.1.0 to clinical 1.0.0 (slot a)" in capsys.readouterr().out
    assert _versions(dev) == ("1.0.0", "1.1.0") and serve(dev) == "1.0.0"
    last = _last(dev)
    assert (last["status"], last["reason"], last["version"]) == ("rolled_back", "operator_request", "1.0.0")

    assert Slots(dev).is_ready("b")  # both slots stay ready: 1.1.0 can be switched to again by a rollout


def test_a_second_rollback_does_not_switch_forward_to_the_version_rolled_back_from(built, upgraded, capsys):
    """After a rollback the standby holds the newer version. Switching to it would be no rollback (the old agent
    reported `rolled back from clinical 1.0.0 to clinical 1.1.0`): it is refused and nothing changes."""
    assert Updater(upgraded).rollback().status == "rolled_back"
    assert _versions(upgraded) == ("1.0.0", "1.1.0")
    pointer = upgraded.active_file.read_bytes()

    assert main(["rollback", "--dir", str(upgraded.path)]) == 1
    err = capsys.readouterr().err
    assert "device-agent: failed (standby_not_older): no rollback to do: the standby slot b holds clinical " \
           "1.1.0, newer than the active clinical 1.0.0" in err
    assert "install its package (`device-agent install`) or roll it out from the fleet server" in err
    assert "rolled back from clinical 1.0.0 to clinical 1.1.0" not in err
    assert upgraded.active_file.read_bytes() == pointer and serve(upgraded) == "1.0.0"
    last = _last(upgraded)
    assert (last["status"], last["reason"], last["version"]) == ("failed", "standby_not_older", None)
    assert UpdateRecord.load(upgraded.update_file).state == UpdateState.IDLE

    r = Updater(upgraded).install(packages(built).v110)  # what the refusal says to do works
    assert (r.status, r.version) == ("installed", "1.1.0") and serve(upgraded) == "1.1.0"


def test_a_rollback_to_another_model_goes_to_the_one_installed_before_the_active_one(built, dev, tmp_path):
    """Two model names have no version order: the standby is older when it was installed first."""
    pk = packages(built)
    other = with_version(built, pk.v100, tmp_path / "triage-1.0.0.efpkg", "1.0.0")
    other = repack(other, tmp_path / "triage.efpkg", signing_key(built.keys), mutate=lambda s: s.update(name="triage"))
    assert Updater(dev, clock=lambda: utcnow() - timedelta(minutes=5)).install(pk.v100).ok
    assert Updater(dev).install(other).ok  # triage active (installed later), clinical in standby
    slots = Slots(dev)
    assert slots.installed_at("a") is not None and slots.installed_at("b") is not None
    r = Updater(dev).rollback()
    assert (r.status, r.name) == ("rolled_back", "clinical")
    r = Updater(dev).rollback()  # back again would be forward, to the model installed later
    assert (r.status, r.reason) == ("failed", "standby_not_older")
    assert "installed after the active clinical 1.0.0" in r.message and serve(dev) == "1.0.0"


def test_rollback_without_a_ready_standby_fails_and_changes_nothing(built, dev, capsys):
    assert Updater(dev).install(packages(built).v100).ok
    assert main(["rollback", "--dir", str(dev.path)]) == 1
    assert "device-agent: failed (no_standby): no model to roll back to" in capsys.readouterr().err
    assert _versions(dev) == ("1.0.0", None) and _last(dev)["reason"] == "no_standby"


def test_rollback_refuses_a_standby_damaged_on_disk(built, upgraded):
    standby = upgraded.slot("a")
    (standby / "model.onnx").write_bytes(b"bit rot")
    r = Updater(upgraded).rollback()
    assert (r.status, r.reason) == ("failed", "file_mismatch") and "model.onnx changed on disk" in r.message
    assert serve(upgraded) == "1.1.0"


def test_a_standby_that_was_never_smoke_tested_is_not_offered_for_rollback(built, upgraded):
    (upgraded.slot("a") / ".smoke.json").unlink()
    assert Slots(upgraded).standby() is None
    r = Updater(upgraded).rollback()
    assert (r.status, r.reason) == ("failed", "no_standby") and serve(upgraded) == "1.1.0"


def test_reinstalling_an_older_or_the_same_version_is_rejected_not_newer(built, upgraded, capsys):
    pk = packages(built)
    r = Updater(upgraded).install(pk.v100)
    assert (r.status, r.reason) == ("rejected", "not_newer")
    assert r.message.startswith("1.0.0 is not newer than the active 1.1.0")
    assert main(["install", str(pk.v110), "--dir", str(upgraded.path)]) == 1
    err = capsys.readouterr().err
    assert "device-agent: rejected (not_newer): 1.1.0 is not newer than the active 1.1.0" in err
    # both slots untouched: the standby survives a rejected package
    assert _versions(upgraded) == ("1.1.0", "1.0.0") and only_slots_left(upgraded)


def test_a_different_model_name_may_replace_the_active_one(built, tmp_path, upgraded):
    other = repack(packages(built).v100, tmp_path / "triage.efpkg", signing_key(built.keys),
                   mutate=lambda s: s.update(name="triage", version="0.1.0"))
    r = Updater(upgraded).install(other)
    assert (r.status, r.name, r.version) == ("installed", "triage", "0.1.0")
    active, standby = Slots(upgraded).active(), Slots(upgraded).standby()
    assert active is not None and standby is not None
    assert (active[1].name, standby[1].name, standby[1].version) == ("triage", "clinical", "1.1.0")


# ---- every contract rejection, recorded with its reason ---------------------------------------------------
def _flip_model_byte(built, out: Path) -> Path:
    items = [(m, d[:100] + bytes([d[100] ^ 1]) + d[101:] if m.name == "model.onnx" else d)
             for m, d in members(packages(built).v110)]
    return write(out, items)


def _altered_after_signing(built, out: Path) -> Path:
    return repack(packages(built).v110, out, None, mutate=lambda s: s.update(version="9.9.9"))


def _untrusted_signer(built, out: Path) -> Path:
    return with_version(built, packages(built).v110, out, "1.2.0", signer=generate_key())


def _unsigned(built, out: Path) -> Path:
    items = members(packages(built).v110)
    env = json.loads(next(d for m, d in items if m.name == "manifest.json"))
    env["signatures"] = []
    return write(out, [(m, json.dumps(env).encode() if m.name == "manifest.json" else d) for m, d in items])


def _wrong_target(built, out: Path) -> Path:
    return repack(packages(built).v110, out, signing_key(built.keys), mutate=lambda s: s.update(target="rpi5-aarch64"))


def _expired(built, out: Path) -> Path:
    return with_expiry(built, packages(built).v110, out, utcnow() - timedelta(hours=1))


def _extra_file(built, out: Path) -> Path:
    import tarfile

    return write(out, members(packages(built).v110) + [(tarfile.TarInfo("payload.sh"), b"rm -rf /\n")])


def _not_a_package(built, out: Path) -> Path:
    out.write_bytes(b"\x89PNG definitely not a tar" * 40)
    return out


@pytest.mark.parametrize(("make", "reason", "message"), [
    (_flip_model_byte, "file_mismatch", "file 'model.onnx' has sha256"),
    (_altered_after_signing, "bad_signature", "does not verify"),
    (_untrusted_signer, "untrusted_key", "not trusted; trusted keys"),
    (_unsigned, "unsigned", "manifest is unsigned"),
    (_wrong_target, "wrong_target", f"built for target 'rpi5-aarch64', not '{TARGET}'"),
    (_expired, "expired", "package clinical 1.1.0 expired"),
    (_extra_file, "file_mismatch", "which the signed manifest does not list"),
    (_not_a_package, "package", "not a readable package archive"),
])
def test_each_contract_rejection_is_recorded_with_its_reason(built, tmp_path, dev, make, reason, message, capsys):
    assert Updater(dev).install(packages(built).v100).ok
    bad = make(built, tmp_path / "bad.efpkg")
    assert main(["install", str(bad), "--dir", str(dev.path)]) == 1
    assert f"device-agent: rejected ({reason}):" in capsys.readouterr().err
    last = _last(dev)
    assert (last["status"], last["reason"]) == ("rejected", reason) and message in last["message"]
    assert UpdateRecord.load(dev.update_file).state == UpdateState.IDLE
    assert serve(dev) == "1.0.0" and only_slots_left(dev) and not dev.slot("b").exists()


@pytest.mark.parametrize("make", [_wrong_target, _untrusted_signer, _not_a_package])
def test_a_rollout_install_refused_before_its_manifest_is_read_names_the_version_asked_for(built, tmp_path, dev,
                                                                                        make):
    # The fleet server counts a failed install against a rollout by its version: a result without one left the
    # rollout waiting for ever (found by a README walkthrough audit, with a package for the wrong target).
    assert Updater(dev).install(packages(built).v100).ok
    bad = make(built, tmp_path / "bad.efpkg")
    r = Updater(dev).deploy(lambda: bad, {"name": "clinical", "version": "1.1.0", "seq": 7})
    assert r.status == "rejected" and (r.name, r.version) == ("clinical", "1.1.0")
    assert (_last(dev)["name"], _last(dev)["version"]) == ("clinical", "1.1.0") and serve(dev) == "1.0.0"


# ---- smoke test -----------------------------------------------------------------------------------------------
def test_a_failing_smoke_test_leaves_the_active_and_standby_slots_untouched(built, tmp_path, upgraded):
    bad = corrupt_golden(built, packages(built).v200, tmp_path / "bad-2.0.0.efpkg", "2.0.0")
    r = Updater(upgraded).install(bad)
    assert (r.status, r.reason, r.version) == ("failed", "smoke_test_failed", "2.0.0")
    assert "golden outputs not reproduced: max |Δ|" in r.message and "vs tolerance 0.0001" in r.message
    assert r.details["max_abs_diff"] > r.details["tolerance"] and r.details["argmax_mismatches"] > 0
    assert _last(upgraded)["details"]["max_abs_diff"] == r.details["max_abs_diff"]
    assert _versions(upgraded) == ("1.1.0", "1.0.0") and serve(upgraded) == "1.1.0"
    assert only_slots_left(upgraded)


def _image_package(built, folder: Path) -> Path:
    """A real image package: 8x8 gray PNGs, a logistic regression on the preprocessed pixels."""
    from skl2onnx import to_onnx
    from sklearn.linear_model import LogisticRegression

    from model_packager.build import BuildRequest, build_package

    rng = np.random.default_rng(0)
    xs, ys = [], []
    for c in (0, 1):
        (folder / "img" / str(c)).mkdir(parents=True)
        for i in range(12):
            px = (rng.random((16, 16)) * 120 + 120 * c).astype(np.uint8)
            cv2.imwrite(str(folder / "img" / str(c) / f"{i}.png"), px)
            xs.append(cv2.resize(px, (8, 8), interpolation=cv2.INTER_AREA).astype(np.float32).reshape(-1) / 255)
            ys.append(c)
    x = np.array(xs, dtype=np.float32)
    clf = LogisticRegression().fit(x, ys)
    onx = to_onnx(clf, x[:1], options={id(clf): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
    (folder / "vision.onnx").write_bytes(onx.SerializeToString())
    (folder / "pre.json").write_text(json.dumps({"width": 8, "height": 8, "color": "gray", "resize": "area",
                                                 "scale": 1 / 255, "mean": 0.0, "std": 1.0, "layout": "flat"}))
    out = folder / "vision-1.0.0.efpkg"
    build_package(BuildRequest(model=folder / "vision.onnx", name="vision", version="1.0.0", target=TARGET,
                               calibration=folder / "img", keys=built.keys, out=out, quantize="none",
                               preprocess=folder / "pre.json", latency_runs=10))
    return out


def test_image_packages_check_that_golden_images_preprocess_to_golden_rows(built, tmp_path, dev):
    pkg = _image_package(built, tmp_path / "vision")
    assert any(m.name == "golden/0.img" for m, _ in members(pkg))
    flipped = cv2.imencode(".png", np.full((16, 16), 255, dtype=np.uint8))[1].tobytes()
    bad = repack(pkg, tmp_path / "bad.efpkg", signing_key(built.keys), files={"golden/0.img": flipped})
    r = Updater(dev).install(bad)
    assert (r.status, r.reason) == ("failed", "smoke_test_failed")
    assert "golden image 0 preprocesses to a row that differs from golden x[0]" in r.message
    assert r.details["image"] == 0 and r.details["image_max_abs_diff"] > 1e-5
    assert Slots(dev).active() is None and only_slots_left(dev)

    good = Updater(dev).install(pkg)
    assert good.status == "installed" and good.details["images_max_abs_diff"] <= 1e-5
    assert serve(dev) == "1.0.0"


# ---- time and trust -----------------------------------------------------------------------------------------
def test_a_clock_set_back_cannot_revive_an_expired_package(built, tmp_path):
    pk = packages(built)
    now = utcnow()
    short_lived = with_expiry(built, pk.v110, tmp_path / "short.efpkg", now + timedelta(hours=2))
    # A device whose clock said "now + 3 h" when it installed 1.0.0 has seen that time for real ...
    dev = new_device(built, tmp_path / "dev")
    assert Updater(dev, clock=lambda: now + timedelta(hours=3)).install(pk.v100).ok
    assert TrustStore(dev).state.high_water >= now + timedelta(hours=3)
    # ... so with its clock set back to "now", the package that expired at now + 2 h stays expired.
    r = Updater(dev, clock=lambda: now).install(short_lived)
    assert (r.status, r.reason) == ("rejected", "expired") and "expired" in r.message
    assert serve(dev) == "1.0.0"
    # The same package on a device that never saw that time is fine: the high-water mark made the difference.
    fresh = new_device(built, tmp_path / "fresh", package=pk.v100)
    assert Updater(fresh, clock=lambda: now).install(short_lived).status == "installed"


def test_a_newer_keyset_is_persisted_and_an_older_one_never_lowers_it(built, tmp_path, dev):
    from model_packager.keys import KeyFolder, revoke_key, rotate_keys

    pk = packages(built)
    keys = tmp_path / "keys"
    shutil.copytree(built.keys, keys)
    old_signer = signing_key(keys)
    rotate_keys(keys)  # v2: a new signing key
    revoke_key(keys, key_id(old_signer.public_key())[:12])  # v3: the old key revoked
    v3 = KeyFolder(keys).keyset_envelope()
    new_signer = signing_key(keys)

    assert Updater(dev).install(pk.v100).ok
    assert TrustStore(dev).state.keyset_version == 1

    carrying_v3 = with_version(built, pk.v110, tmp_path / "v3.efpkg", "1.1.0", signer=new_signer, keyset_env=v3)
    assert Updater(dev).install(carrying_v3).status == "installed"
    assert TrustStore(dev).state.keyset_version == 3
    assert TrustStore(dev).trusted_keyset().version == 3  # re-verified against the pinned root

    # An old package (keyset v1, signed by the now revoked key): judged by v3, refused; v3 stays.
    replayed = with_version(built, pk.v200, tmp_path / "old.efpkg", "2.0.0", signer=old_signer)
    r = Updater(dev).install(replayed)
    assert (r.status, r.reason) == ("rejected", "revoked_key")
    assert TrustStore(dev).state.keyset_version == 3
    # Signed by the live key but still carrying keyset v1: accepted (v3 decides) and v3 is kept.
    live_old_keyset = with_version(built, pk.v200, tmp_path / "live.efpkg", "2.0.0", signer=new_signer)
    assert Updater(dev).install(live_old_keyset).status == "installed"
    assert TrustStore(dev).state.keyset_version == 3


def test_a_rollback_to_a_standby_signed_by_a_now_revoked_key_warns_and_says_which_key(built, tmp_path, dev,
                                                                                       caplog):
    from model_packager.keys import KeyFolder, revoke_key, rotate_keys

    pk = packages(built)
    keys = tmp_path / "keys"
    shutil.copytree(built.keys, keys)
    old_signer = signing_key(keys)
    old_id = key_id(old_signer.public_key())
    rotate_keys(keys)
    revoke_key(keys, old_id[:12])  # keyset v3: the key that signed 1.0.0 revoked
    new_signer = signing_key(keys)
    assert Updater(dev).install(pk.v100).ok  # signed by the old key, then live
    assert Slots(dev).signer("a") == old_id
    carrying_v3 = with_version(built, pk.v110, tmp_path / "v3.efpkg", "1.1.0", signer=new_signer,
                               keyset_env=KeyFolder(keys).keyset_envelope())
    assert Updater(dev).install(carrying_v3).status == "installed"
    assert Slots(dev).signer("b") == key_id(new_signer.public_key())

    with caplog.at_level(logging.WARNING, logger="device_agent.updater"):
        r = Updater(dev).rollback()
    assert r.status == "rolled_back" and serve(dev) == "1.0.0"  # not refused: it is the last-known-good model
    assert f"warning: it was signed by key {short(old_id)}, which the device's keyset (version 3) now revokes" \
        in r.message
    assert r.details["standby_signer_revoked"] == old_id
    assert any("now revokes" in rec.getMessage() for rec in caplog.records)

    # Back to 1.1.0 (signed by the live key) through the standby: no warning.
    switched = Updater(dev).activate_standby({"name": "clinical", "version": "1.1.0"})
    assert switched.status == "switched" and "warning" not in switched.message
    assert "standby_signer_revoked" not in switched.details


def test_a_slot_installed_without_a_signer_record_rolls_back_without_a_check(built, tmp_path, dev):
    from model_packager.keys import KeyFolder, revoke_key, rotate_keys

    pk = packages(built)
    keys = tmp_path / "keys"
    shutil.copytree(built.keys, keys)
    old_id = key_id(signing_key(keys).public_key())
    rotate_keys(keys)
    revoke_key(keys, old_id[:12])  # 1.0.0's signer revoked, as in the test above
    assert Updater(dev).install(pk.v100).ok
    carrying_v3 = with_version(built, pk.v110, tmp_path / "v3.efpkg", "1.1.0", signer=signing_key(keys),
                               keyset_env=KeyFolder(keys).keyset_envelope())
    assert Updater(dev).install(carrying_v3).status == "installed"
    manifest = dev.slot("a") / "manifest.json"
    doc = json.loads(manifest.read_text())
    del doc["signer"]  # as an agent older than the signer record wrote it
    manifest.write_text(json.dumps(doc))
    assert Slots(dev).signer("a") is None
    r = Updater(dev).rollback()  # the same revoked signer, but nothing says so: no warning, no refusal
    assert r.status == "rolled_back" and "warning" not in r.message and serve(dev) == "1.0.0"
    assert "standby_signer_revoked" not in r.details


def test_a_hand_edited_trust_store_is_refused(built, dev):
    assert Updater(dev).install(packages(built).v110).ok
    doc = json.loads(dev.trust_file.read_text())
    doc["keyset"]["signed"]["version"] = 99
    doc["keyset_version"] = 99
    dev.trust_file.write_text(json.dumps(doc))
    with pytest.raises(TrustStoreError, match="does not verify against the pinned root"):
        TrustStore(dev).trusted_keyset()
    r = Updater(dev).install(packages(built).v200)
    assert (r.status, r.reason) == ("failed", "trust_store") and serve(dev) == "1.1.0"


# ---- recovery, locking and the state machine ------------------------------------------------------------------
def test_recover_discards_half_written_slots_and_repairs_the_pointer(built, upgraded):
    (upgraded.slots / "a.tmp").mkdir()
    (upgraded.slots / "a.tmp" / "model.onnx").write_bytes(b"half")
    (upgraded.slot("b") / ".complete").unlink()  # the active slot is no longer complete
    actions = Updater(upgraded).recover()
    assert any("a.tmp" in a for a in actions) and any("fell back to slot a" in a for a in actions)
    assert _versions(upgraded) == ("1.0.0", None) and serve(upgraded) == "1.0.0"
    assert not upgraded.slot("b").exists() and only_slots_left(upgraded)

    (upgraded.slot("a") / "model.onnx").unlink()
    Updater(upgraded).recover()
    assert Slots(upgraded).active() is None and not upgraded.active_file.exists()
    # a device with no model installs again normally
    assert Updater(upgraded).install(packages(built).v200).status == "installed" and serve(upgraded) == "2.0.0"


def test_a_second_updater_is_refused_while_one_holds_the_lock(built, dev):
    with Slots(dev).lock():
        with pytest.raises(BusyError, match="another device-agent process"):
            Updater(dev).install(packages(built).v100)
        (dev.slots / "b.tmp").mkdir()  # someone else's staging folder
        assert Updater(dev).recover() == []  # recovery leaves a running update alone
        assert (dev.slots / "b.tmp").exists()


def test_the_transition_table_is_the_only_way_between_states():
    assert set(TRANSITIONS) == set(UpdateState)
    check_transition(UpdateState.IDLE, UpdateState.VERIFYING)
    check_transition(UpdateState.IDLE, UpdateState.ACTIVATING)  # activate_standby: nothing to verify or unpack
    for bad in [(UpdateState.IDLE, UpdateState.PROBATION), (UpdateState.VERIFYING, UpdateState.ACTIVATING),
                (UpdateState.ACTIVATING, UpdateState.STAGING)]:
        with pytest.raises(IllegalTransitionError):
            check_transition(*bad)


def test_golden_comparison_needs_tolerance_and_the_same_argmax():
    e = np.array([[0.50004, 0.49996], [0.1, 0.9]], dtype=np.float32)
    assert compare_golden(e, e, 1e-4).ok
    swapped = np.array([[0.49996, 0.50004], [0.1, 0.9]], dtype=np.float32)  # within 1e-4, argmax flips
    v = compare_golden(e, swapped, 1e-4)
    assert not v.ok and v.argmax_mismatches == 1 and v.max_abs_diff <= 1e-4
    assert not compare_golden(e, e + 0.01, 1e-4).ok
    assert not compare_golden(e, e[:1], 1e-4).ok
    assert not compare_golden(e, np.full_like(e, np.nan), 1e-4).ok


def test_last_result_survives_in_update_json_for_status(built, tmp_path, dev, capsys):
    assert Updater(dev).install(packages(built).v100).ok
    Updater(dev).install(_wrong_target(built, tmp_path / "wt.efpkg"))
    assert main(["status", "--dir", str(dev.path)]) == 0
    out = capsys.readouterr().out
    assert "last      rejected (wrong_target) wt.efpkg at" in out and "active    clinical 1.0.0 (slot a)" in out
    last = _last(dev)
    # never-verified contents are not recorded as fact: no name or version, only the file
    assert last["name"] is None and last["package"] == str(tmp_path / "wt.efpkg")


@pytest.mark.parametrize(("golden", "reason"), [
    (b"PK\x03\x04 a torn zip archive", "smoke_test_failed"),  # zipfile.BadZipFile got past the except
    ("wrong-shape", None),  # golden rows the model cannot take: onnxruntime's own error from the smoke run
    # golden x as a 0-d array: an IndexError that no typed check catches, so the install's last resort
    # (``package_broken``) ends it
    ("zero-d", "package_broken"),
])
def test_a_signed_but_malformed_package_ends_as_a_final_failure_not_a_half_way_state(built, tmp_path, upgraded,
                                                                                      golden, reason):
    if golden == "wrong-shape":
        buf = io.BytesIO()
        np.savez(buf, x=np.zeros((3,), np.float32), probabilities=np.zeros((3,), np.float32), tolerance=1e-4)
        golden = buf.getvalue()
    elif golden == "zero-d":
        buf = io.BytesIO()
        np.savez(buf, x=np.float32(0), probabilities=np.zeros((1, 2), np.float32), tolerance=1e-4)
        golden = buf.getvalue()
    bad = repack(packages(built).v200, tmp_path / "bad.efpkg", signing_key(built.keys), files={"golden.npz": golden})
    r = Updater(upgraded).install(bad)
    assert r.status == "failed" and r.reason not in RETRYABLE, r
    if reason is not None:
        assert r.reason == reason
    assert Updater(upgraded).record().state == "idle"  # not stuck in smoke_test, retried for ever
    assert _versions(upgraded) == ("1.1.0", "1.0.0") and serve(upgraded) == "1.1.0"
    assert only_slots_left(upgraded)


@pytest.mark.parametrize("field", ["candidate", "last_result", "package", "history"])
def test_a_hand_edited_update_record_is_recovered_to_idle_not_a_crash_at_start(built, upgraded, field):
    doc = json.loads(upgraded.update_file.read_text())
    doc.update(state="probation", **{field: [1] if field != "package" else {"x": 1}})
    if field == "history":
        doc["history"] = [1, 2]
    upgraded.update_file.write_text(json.dumps(doc))
    actions = Updater(upgraded).recover()  # the agent's start runs this; it raised AttributeError
    assert any("interrupted" in a for a in actions), actions
    rec = Updater(upgraded).record()
    assert rec.state == "idle" and rec.last_result is not None and rec.last_result["reason"] == "interrupted"
    assert serve(upgraded) == "1.1.0"


def test_installing_a_missing_file_or_a_folder_says_so_in_one_line(built, tmp_path, dev, capsys):
    assert main(["install", str(tmp_path / "nope.efpkg"), "--dir", str(dev.path)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"device-agent: rejected (package): package {tmp_path / 'nope.efpkg'} does not exist")
    assert main(["install", str(tmp_path), "--dir", str(dev.path)]) == 1
    assert f"{tmp_path} is a folder, not a package file" in capsys.readouterr().err
