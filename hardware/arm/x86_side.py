"""The x86 half of `make test-arm`: make what the emulated Pi 4 is tested with, then check what it sent back.

``prepare WORK``: example models and data, a key folder, and signed packages for the ``rpi4-aarch64`` target
(clinical 1.0.0 and 1.1.0, vision 1.0.0, digits-lite 1.0.0 on LiteRT; quantization chosen by ``auto`` as for a
real Pi 4), the inputs the ARM side will predict, and ``expected.npz``: the probabilities this x86 host's agent
gives for them (each package installed on an x86 device folder, then ``Agent.predict`` row by row, the same
calls the ARM side makes). Only public keys and packages go into WORK/device (what the ARM side sees).

``check WORK``: the summary the ARM agent signed (``WORK/out/summary.json``) verifies with the ARM device's
public key, parses with the wire contract and counts the classes the x86 run predicted.

Run with the project's x86 venv: ``.venv/bin/python hardware/arm/x86_side.py prepare|check WORK``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from device_agent.agent import Agent  # noqa: E402
from device_agent.provision import ProvisionRequest, provision  # noqa: E402
from edgefleet_contracts.signing import generate_key, key_id, load_public_key, save_public_key, verify_envelope  # noqa: E402
from edgefleet_contracts.summary import Summary  # noqa: E402

TARGET = "rpi4-aarch64"
ROWS = 100  # inputs per model: enough to exercise every class, cheap under emulation
SUMMARY_ROWS = 60  # clinical rows the ARM side summarises (>= k = 20, below window_count)
LITERT_FIXTURE = REPO / "model_packager" / "fixtures" / "digits_int8.tflite"


def prepare(work: Path) -> None:
    from model_packager.build import BuildRequest, build_package
    from model_packager.examples import write_examples
    from model_packager.keys import init_keys

    if work.exists():
        shutil.rmtree(work)
    dev = work / "device"  # everything the ARM side may read
    (dev / "packages").mkdir(parents=True)
    (dev / "inputs" / "vision").mkdir(parents=True)
    with tempfile.TemporaryDirectory(prefix="test-arm-x86-") as tmp_name:
        tmp = Path(tmp_name)
        ex = write_examples(tmp / "examples")
        init_keys(tmp / "keys")
        shutil.copy(tmp / "keys" / "root.pub", dev / "root.pub")
        save_public_key(generate_key().public_key(), dev / "fleet.pub")

        jobs = {  # package name -> (model, calibration, holdout, preprocess)
            "clinical": (ex["clinical_model"], ex["clinical_calibration"], ex["clinical_holdout"], None),
            "vision": (ex["vision_model"], ex["vision_calibration"], ex["vision_holdout"], ex["vision_preprocess"]),
            "digits-lite": (LITERT_FIXTURE, ex["digits_lite_calibration"], ex["digits_lite_holdout"], None),
        }
        meta: dict[str, dict[str, object]] = {}
        for name, (model, cal, hold, pre) in jobs.items():
            versions = ["1.0.0", "1.1.0"] if name == "clinical" else ["1.0.0"]
            for version in versions:
                out = dev / "packages" / f"{name}-{version}.efpkg"
                r = build_package(BuildRequest(model=model, name=name, version=version, target=TARGET,
                                               calibration=cal, holdout=hold, keys=tmp / "keys", out=out,
                                               owner="test-arm", preprocess=pre, latency_runs=20))
                meta[f"{name}-{version}"] = {"quantization": r.report["chosen"]["mode"],
                                             "runtime": r.manifest.runtime, "file": out.name}

        expected: dict[str, np.ndarray] = {}
        x_clinical = np.load(ex["clinical_holdout"].with_suffix(".npz"))["x"][:ROWS].astype(np.float32)
        x_lite = np.load(ex["digits_lite_holdout"])["x"][:ROWS].astype(np.float32)
        pngs = sorted(Path(ex["vision_holdout"]).glob("*/*.png"))[:ROWS]
        images = []
        for i, png in enumerate(pngs):
            dest = dev / "inputs" / "vision" / f"{i:03d}.png"
            shutil.copy(png, dest)
            images.append(png.read_bytes())
        inputs = {"clinical": list(x_clinical), "vision": images, "digits-lite": list(x_lite)}
        expected["clinical_x"], expected["digits-lite_x"] = x_clinical, x_lite
        for name, rows in inputs.items():
            expected[f"{name}_p"] = _predict_on_x86(tmp / f"x86-{name}", dev, name, rows)
        np.savez(dev / "expected.npz", **expected)
        meta["_"] = {"rows": ROWS, "summary_rows": SUMMARY_ROWS,
                     "summary_class_counts": np.bincount(expected["clinical_p"][:SUMMARY_ROWS].argmax(axis=1),
                                                         minlength=2).tolist()}
        (dev / "expected.json").write_text(json.dumps(meta, indent=2))
    for key, m in meta.items():
        if key != "_":
            print(f"  {key}: {m['runtime']}, quantization {m['quantization']}")


def _predict_on_x86(folder: Path, dev: Path, name: str, rows: list) -> np.ndarray:
    """Install the package on an x86 device folder (same updater and smoke test) and predict row by row."""
    provision(ProvisionRequest(directory=folder, device_id=f"x86-{name}", target=TARGET, root_key=dev / "root.pub",
                               fleet_key=dev / "fleet.pub", package=dev / "packages" / f"{name}-1.0.0.efpkg"))
    agent = Agent.open(folder, background=False)
    try:
        return np.stack([agent.predict(x).probabilities for x in rows]).astype(np.float32)
    finally:
        agent.close()


def check(work: Path) -> None:
    dev, out = work / "device", work / "out"
    meta = json.loads((dev / "expected.json").read_text())["_"]
    envelope = json.loads((out / "summary.json").read_text())
    pub = load_public_key(out / "device.pub")
    signed, _ = verify_envelope(envelope, {key_id(pub): pub}, "summary from the ARM device")
    s = Summary.from_dict(signed)
    if s.count != meta["summary_rows"] or s.class_counts != meta["summary_class_counts"]:
        sys.exit(f"test-arm: the ARM summary counts {s.count} rows with classes {s.class_counts}; the x86 run "
                 f"predicted {meta['summary_class_counts']} on the same {meta['summary_rows']} rows")
    print(f"test-arm: x86 verified the summary signed on ARM (device {s.device_id}, {s.count} rows, "
          f"classes {s.class_counts}, {len(s.features)} features)")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("step", choices=["prepare", "check"])
    ap.add_argument("work", type=Path)
    args = ap.parse_args(argv)
    (prepare if args.step == "prepare" else check)(args.work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
