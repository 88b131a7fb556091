"""`make demo` (packager stage): example models -> keys -> signed packages per target -> verified.

Run: ``python -m model_packager.demo --out demo-out``. A later stage turns this into the whole fleet story.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from rich.console import Console
from rich.table import Table

from .build import BuildRequest, build_package
from .examples import write_examples
from .inspect_verify import verify
from .keys import init_keys

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "digits_int8.tflite"


def run(out: Path, seed: int = 0, console: Console | None = None) -> list[dict[str, str]]:
    if console is None:
        console = Console()
        if not console.is_terminal:
            console = Console(width=130)
    if out.exists():
        shutil.rmtree(out)
    console.rule("edgefleet packager demo")
    ex = write_examples(out / "examples", seed=seed)
    console.print(f"[bold]1.[/] example models and data written under {out / 'examples'} (scikit-learn's bundled data)")
    init_keys(out / "keys")
    console.print(f"[bold]2.[/] root key, signing key and keyset v1 in {out / 'keys'} (private keys 0600)")
    jobs = [
        ("clinical", "x86_64-avx2", ex["clinical_model"], ex["clinical_calibration"], ex["clinical_holdout"], None),
        ("clinical", "rpi4-aarch64", ex["clinical_model"], ex["clinical_calibration"], ex["clinical_holdout"], None),
        ("vision", "rpi5-aarch64", ex["vision_model"], ex["vision_calibration"], ex["vision_holdout"],
         ex["vision_preprocess"]),
        ("digits-lite", "rpi4-aarch64", FIXTURE, ex["digits_lite_calibration"], ex["digits_lite_holdout"], None),
    ]
    rows = []
    for name, target, model, cal, hold, pre in jobs:
        pkg = out / "packages" / f"{name}-1.0.0-{target}.efpkg"
        console.print(f"[bold]3.[/] building {name} for {target} …")
        r = build_package(BuildRequest(model=model, name=name, version="1.0.0", target=target, calibration=cal,
                                       holdout=hold, keys=out / "keys", out=pkg, owner="demo-ml-team",
                                       preprocess=pre), console)
        vp = verify(pkg, out / "keys" / "root.pub", target=target)
        ch = r.report["chosen"]
        rows.append({
            "package": pkg.name, "target": target, "quantization": ch["mode"],
            "accuracy": f"{ch['accuracy']:.4f}" if ch["accuracy"] is not None else "-",
            "delta": f"{ch['accuracy_delta_points']:+.2f}" if ch["accuracy_delta_points"] is not None else "-",
            "size": f"{ch['size_ratio']:.2f}x", "verified": f"OK key {vp.signer[:8]}",
        })
    table = Table(title="signed packages")
    for col in rows[0]:
        table.add_column(col, no_wrap=True)
    for row in rows:
        table.add_row(*row.values())
    console.print(table)
    console.print(f"verify any of them: model-packager verify {out}/packages/<file> --root {out}/keys/root.pub")
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m model_packager.demo")
    p.add_argument("--out", default="demo-out")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    run(Path(args.out), args.seed)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
