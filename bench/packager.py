"""Packager benchmark: per example model and quantization candidate, measured in one run on this machine.

    .venv/bin/python bench/packager.py [--out /tmp/edgefleet-bench] [--runs 2000]

Prints size ratio, accuracy delta (points), agreement with the float model and single-sample p50 latency
ratio vs float (one thread), for the clinical and vision examples (x86_64-avx2 quantization settings: QDQ
U8S8) and the committed LiteRT int8 fixture (as provided).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model_packager.build import BuildRequest, build_package  # noqa: E402
from model_packager.demo import FIXTURE  # noqa: E402
from model_packager.examples import write_examples  # noqa: E402
from model_packager.keys import init_keys  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--out", default="/tmp/edgefleet-bench")
    p.add_argument("--runs", type=int, default=2000)
    args = p.parse_args()
    out = Path(args.out)
    shutil.rmtree(out, ignore_errors=True)
    ex = write_examples(out / "examples")
    init_keys(out / "keys")
    jobs = [
        ("clinical (MLP 30 features)", ex["clinical_model"], ex["clinical_calibration"], ex["clinical_holdout"], None),
        ("vision (digits MLP, 64 px)", ex["vision_model"], ex["vision_calibration"], ex["vision_holdout"],
         ex["vision_preprocess"]),
        ("litert int8 fixture", FIXTURE, ex["digits_lite_calibration"], ex["digits_lite_holdout"], None),
    ]
    print("| model | candidate | size ratio | accuracy | accuracy delta (points) | agreement | p50 µs | p50 ratio |")
    print("|---|---|---|---|---|---|---|---|")
    for label, model, cal, hold, pre in jobs:
        r = build_package(BuildRequest(model=model, name="bench", version="1.0.0", target="x86_64-avx2",
                                       calibration=cal, holdout=hold, keys=out / "keys", out=out / "b.efpkg",
                                       preprocess=pre, max_accuracy_drop=100.0, force=True,
                                       latency_runs=args.runs))
        for c in r.report["candidates"]:
            acc = f"{c['accuracy']:.4f}" if c["accuracy"] is not None else "-"
            delta = f"{c['accuracy_delta_points']:+.2f}" if c["accuracy_delta_points"] is not None else "0.00"
            print(f"| {label} | {c['mode']} | {c['size_ratio']:.2f} | {acc} | {delta} | {c['agreement']:.4f} | "
                  f"{c['p50_ms'] * 1000:.1f} | {c['latency_ratio']:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
