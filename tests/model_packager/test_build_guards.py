"""What the packager refuses before doing any work, and how it says so: an existing --out, flag values the
manifest would refuse, a negative accuracy bound, an unknown verify target, a missing package file, a key that
is already revoked."""

from __future__ import annotations

import shutil
from datetime import timedelta
from pathlib import Path

import pytest

from edgefleet_contracts.signing import key_id
from model_packager.build import BuildRequest, build_package
from model_packager.cli import main
from model_packager.errors import FlagError, OutputExistsError
from model_packager.keys import KeyFolder, revoke_key, rotate_keys
from model_packager.writer import write_archive


def _args(built, out: Path, *extra: str, name: str = "clinical") -> list[str]:
    return ["build", str(built.model), "--name", name, "--version", "2.0.0", "--target", "x86_64-avx2",
            "--calibration", str(built.calibration), "--holdout", str(built.holdout), "--keys", str(built.keys),
            "--out", str(out), "--quantize", "none", "--quiet", *extra]


def _req(built, out: Path, **over) -> BuildRequest:
    kw = dict(model=built.model, name="clinical", version="2.0.0", target="x86_64-avx2", calibration=built.calibration,
              holdout=built.holdout, keys=built.keys, out=out, quantize="none", latency_runs=10)
    kw.update(over)
    return BuildRequest(**kw)


def _unreadable_inputs(built, tmp_path: Path) -> dict[str, Path]:
    """Inputs whose first use would fail: a refusal that names a flag despite them came before any work."""
    return {"calibration": tmp_path / "no-such.csv", "holdout": tmp_path / "no-such.csv", "keys": tmp_path / "nokeys"}


# ---- --out -------------------------------------------------------------------------------------------------
def test_build_refuses_to_overwrite_an_existing_out_file_unless_forced(built, tmp_path, capsys):
    out = tmp_path / "clinical.efpkg"
    out.write_bytes(b"someone else's package")
    assert main(_args(built, out)) == 1
    err = capsys.readouterr().err
    assert f"{out} already exists" in err and "--force" in err
    assert out.read_bytes() == b"someone else's package"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["clinical.efpkg"]  # no temporary left behind
    assert main(_args(built, out, "--force")) == 0
    assert main(["verify", str(out), "--root", str(built.keys / "root.pub")]) == 0


def test_the_out_check_comes_before_any_work(built, tmp_path):
    out = tmp_path / "clinical.efpkg"
    out.write_bytes(b"x")
    with pytest.raises(OutputExistsError, match="already exists"):
        build_package(_req(built, out, **_unreadable_inputs(built, tmp_path)))
    with pytest.raises(OutputExistsError, match="is a folder"):
        build_package(_req(built, tmp_path, force=True))


def test_an_out_file_that_appears_while_building_is_not_overwritten(built, tmp_path):
    out = tmp_path / "p.efpkg"
    payload = tmp_path / "a.bin"
    payload.write_bytes(b"payload")
    out.write_bytes(b"arrived meanwhile")
    with pytest.raises(OutputExistsError):
        write_archive(out, {}, {}, {"a.bin": payload})
    assert out.read_bytes() == b"arrived meanwhile"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "p.efpkg"]
    write_archive(out, {}, {}, {"a.bin": payload}, overwrite=True)
    assert out.read_bytes() != b"arrived meanwhile"


# ---- flag values the manifest would refuse -----------------------------------------------------------------
def test_a_name_the_manifest_refuses_is_refused_by_build_and_nothing_is_written(built, tmp_path, capsys):
    out = tmp_path / "clinical.efpkg"
    assert main(_args(built, out, name="clin ical")) == 1
    err = capsys.readouterr().err
    assert "--name 'clin ical'" in err and "lowercase letters, digits" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"name": "Clinical"}, "--name 'Clinical'"),
        ({"name": "-clinical"}, "--name '-clinical'"),
        ({"name": "c" * 65}, "--name 'ccc"),
        ({"version": "1.0-beta"}, "--version '1.0-beta'"),
        ({"classes": ["malignant"]}, "--classes 'malignant'.*at least two class names"),
        ({"classes": ["a", "a"]}, "--classes 'a,a' must be distinct"),
        ({"classes": ["a", ""]}, "--classes 'a,' must be distinct, non-empty"),
        ({"expires_in": timedelta(0)}, "--expires-in must be longer than 0"),
        ({"max_accuracy_drop": -1.0}, "--max-accuracy-drop -1.0 must be 0 or more"),
        ({"max_accuracy_drop": float("nan")}, "--max-accuracy-drop nan must be 0 or more"),
        ({"quantize": "int4"}, "--quantize 'int4' is not one of"),
    ],
)
def test_flag_values_are_checked_before_any_work(built, tmp_path, over, message):
    with pytest.raises(FlagError, match=message):
        build_package(_req(built, tmp_path / "p.efpkg", **_unreadable_inputs(built, tmp_path), **over))


def test_a_negative_accuracy_bound_is_refused_on_the_command_line(built, tmp_path, capsys):
    out = tmp_path / "p.efpkg"
    assert main(_args(built, out, "--max-accuracy-drop", "-1")) == 1
    assert "--max-accuracy-drop -1.0 must be 0 or more" in capsys.readouterr().err
    assert not out.exists()


# ---- verify, inspect, keys revoke --------------------------------------------------------------------------
def test_verify_with_an_unknown_target_says_it_is_unknown_and_lists_the_known_ones(built, capsys):
    assert main(["verify", str(built.package), "--root", str(built.keys / "root.pub"), "--target", "foo"]) == 1
    err = capsys.readouterr().err
    assert "unknown target 'foo'; known targets: " in err and "x86_64-avx2" in err
    assert "wrong_target" not in err and "build it with" not in err


def test_verify_for_a_known_but_unsupported_target_is_still_a_target_verdict(built, capsys):
    assert main(["verify", str(built.package), "--root", str(built.keys / "root.pub"), "--target",
                 "armv7-32bit"]) == 1
    assert "REJECTED (wrong_target)" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", ["inspect", "verify"])
def test_a_missing_package_file_is_said_to_be_missing(built, tmp_path, capsys, cmd):
    missing = tmp_path / "nope.efpkg"
    args = [cmd, str(missing)] + (["--root", str(built.keys / "root.pub")] if cmd == "verify" else [])
    assert main(args) == 1
    err = capsys.readouterr().err
    assert f"package file {missing} does not exist" in err and "REJECTED" not in err


def test_verify_with_a_missing_root_key_names_it(built, tmp_path, capsys):
    assert main(["verify", str(built.package), "--root", str(tmp_path / "root.pub")]) == 1
    assert f"root key {tmp_path / 'root.pub'} does not exist" in capsys.readouterr().err


def test_revoking_a_key_again_says_it_is_already_revoked_and_since_which_keyset(built, tmp_path, capsys):
    keys = tmp_path / "keys"
    shutil.copytree(built.keys, keys)
    first = key_id(KeyFolder(keys).signing_key()[0].public_key())
    rotate_keys(keys)  # v2
    revoke_key(keys, first[:12])  # v3
    rotate_keys(keys)  # v4: still lists it revoked
    assert main(["keys", "revoke", first[:12], "--dir", str(keys)]) == 1
    err = capsys.readouterr().err
    assert f"key {first[:16]} is already revoked, since keyset v3 (the current keyset is v4)" in err
    assert KeyFolder(keys).keyset().version == 4  # nothing published


# ---- --label-column ----------------------------------------------------------------------------------------
def test_a_label_column_that_is_not_in_the_csv_is_named_with_the_columns(built, tmp_path, capsys):
    """It used to be read as one more feature: 'model input has shape [-1, 30] but the data rows have [31]'."""
    import numpy as np

    with np.load(built.calibration) as z:
        x, y = z["x"], z["y"]
    csv = tmp_path / "cal.csv"
    header = ",".join([f"f{i}" for i in range(x.shape[1])] + ["label"])
    np.savetxt(csv, np.column_stack([x, y]), delimiter=",", header=header, comments="", fmt="%.6g")
    out = tmp_path / "clinical.efpkg"
    args = _args(built, out, "--label-column", "nope")
    args[args.index(str(built.calibration))] = args[args.index(str(built.holdout))] = str(csv)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "--label-column 'nope' is not a column of this CSV" in err and "columns are: f0, f1" in err
    assert not out.exists()
    args[args.index("nope")] = "label"  # the column the examples use, named
    assert main(args) == 0
