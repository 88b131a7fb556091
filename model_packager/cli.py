"""`model-packager` command line: keys, examples, build, verify, inspect."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgefleet_contracts.errors import ContractError
from edgefleet_contracts.timeutil import parse_duration

from . import keys as keysmod
from .errors import FlagError, PackagerError


def _keys(args: argparse.Namespace) -> int:
    if args.keys_cmd == "init":
        folder = keysmod.init_keys(Path(args.dir), key_lifetime=parse_duration(args.key_lifetime),
                                   keyset_lifetime=parse_duration(args.keyset_lifetime))
        ks = folder.keyset()
        kid = next(iter(ks.keys))
        print(f"created root key {folder.root_pub} and signing key {kid[:16]}; keyset v{ks.version}")
        print(f"provision devices with the root public key: {folder.root_pub}")
    elif args.keys_cmd == "rotate":
        ks = keysmod.rotate_keys(Path(args.dir), key_lifetime=parse_duration(args.key_lifetime))
        print(f"published keyset v{ks.version} with {len(ks.keys)} live signing keys")
    elif args.keys_cmd == "revoke":
        ks = keysmod.revoke_key(Path(args.dir), args.keyid)
        print(f"published keyset v{ks.version}; revoked: {', '.join(k[:16] for k in sorted(ks.revoked))}")
    return 0


def _build(args: argparse.Namespace) -> int:
    from .build import BuildRequest, build_package

    if args.out.endswith(("/", "\\")) or Path(args.out).name in ("", ".", ".."):
        raise FlagError(f"--out {args.out!r} names a folder; give the path of the package file to write "
                        "(e.g. out/clinical-1.0.0.efpkg)")
    req = BuildRequest(
        model=Path(args.model), name=args.name, version=args.version, target=args.target,
        calibration=Path(args.calibration), holdout=Path(args.holdout) if args.holdout else None,
        quantize=args.quantize, keys=Path(args.keys), out=Path(args.out), owner=args.owner or "",
        expires_in=parse_duration(args.expires_in), label_column=args.label_column or None,
        preprocess=Path(args.preprocess) if args.preprocess else None, probabilities=args.probabilities,
        classes=args.classes.split(",") if args.classes else None, max_accuracy_drop=args.max_accuracy_drop,
        mlflow_run=args.mlflow_run, progress=not args.quiet, force=args.force,
    )
    result = build_package(req)
    ch = result.report["chosen"]
    acc = f"{ch['accuracy']:.4f}" if ch["accuracy"] is not None else "n/a (no labels)"
    print(f"built {result.path}: {result.manifest.name} {result.manifest.version} for {result.manifest.target}, "
          f"quantization {ch['mode']}, accuracy {acc}, agreement {ch['agreement']:.4f}, "
          f"size {ch['size_ratio']:.2f}x float")
    rows = result.report["rows"]
    for what in ("calibration", "holdout"):
        if rows.get(f"{what}_incomplete_left_out"):
            print(f"  note: {rows[f'{what}_incomplete_left_out']} {what} rows with an empty, NaN or infinite value "
                  f"were left out (evaluated and calibrated on the {rows[what]} complete rows)")
    for warning in result.report.get("warnings", []):
        print(f"  warning: {warning}")
    for c in result.report["candidates"]:
        note = "chosen" if c["chosen"] else (f"rejected: {c['rejected']}" if c["rejected"] else "")
        print(f"  {c['mode']:<13} size {c['size_ratio']:.2f}x  agreement {c['agreement']:.4f}  "
              f"p50 {c['p50_ms'] * 1000:.1f} us ({c['latency_ratio']:.2f}x)  {note}")
    return 0


def _verify(args: argparse.Namespace) -> int:
    from .inspect_verify import verify

    vp = verify(Path(args.package), Path(args.root), target=args.target,
                keyset=Path(args.keyset) if args.keyset else None)
    m = vp.manifest
    print(f"OK: {m.name} {m.version} for {m.target}, signed by key {vp.signer[:16]} "
          f"(keyset v{vp.keyset.version}), {len(m.files)} files verified")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from .inspect_verify import describe, read_manifest_unverified, to_json

    signed = read_manifest_unverified(Path(args.package))
    print(to_json(signed) if args.json else describe(signed) + "\n(not verified: use `model-packager verify`)")
    return 0


def _examples(args: argparse.Namespace) -> int:
    from .examples import write_examples

    paths = write_examples(Path(args.out), seed=args.seed)
    for k, v in sorted(paths.items()):
        print(f"{k:<22} {v}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="model-packager", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    k = sub.add_parser("keys", help="manage the root key, signing keys and keyset")
    ksub = k.add_subparsers(dest="keys_cmd", required=True)
    ki = ksub.add_parser("init", help="create an offline root key, a signing key and keyset v1")
    ki.add_argument("--dir", required=True)
    ki.add_argument("--key-lifetime", default="365d")
    ki.add_argument("--keyset-lifetime", default="365d")
    kr = ksub.add_parser("rotate", help="add a new signing key and publish a new keyset version")
    kr.add_argument("--dir", required=True)
    kr.add_argument("--key-lifetime", default="365d")
    kv = ksub.add_parser("revoke", help="revoke a signing key in a new keyset version")
    kv.add_argument("keyid")
    kv.add_argument("--dir", required=True)
    k.set_defaults(func=_keys)

    b = sub.add_parser("build", help="quantize, evaluate, profile and sign a model into a package")
    b.add_argument("model", help="ONNX (.onnx) or LiteRT (.tflite) model")
    b.add_argument("--name", required=True)
    b.add_argument("--version", required=True)
    b.add_argument("--target", required=True, help="hardware target (hardware/targets/*.toml)")
    b.add_argument("--calibration", required=True, help=".npz, .csv or image folder")
    b.add_argument("--holdout", help=".npz, .csv or image folder (labels enable accuracy and calibration)")
    b.add_argument("--quantize", default="auto", choices=["auto", "none", "int8-dynamic", "int8-static"])
    b.add_argument("--keys", required=True, help="key folder from `keys init`")
    b.add_argument("--out", required=True, help="the package file to write (refused if it exists, unless --force)")
    b.add_argument("--force", action="store_true", help="replace the --out file if it exists")
    b.add_argument("--owner", help="model owner (team or person)")
    b.add_argument("--expires-in", default="365d")
    b.add_argument("--label-column", help="CSV column holding the class index (default: the column named 'label', "
                                         "when the CSV has one)")
    b.add_argument("--preprocess", help="JSON image preprocessing spec (required for image folders)")
    b.add_argument("--probabilities", help="name of the model output holding class probabilities")
    b.add_argument("--classes", help="comma-separated class names")
    b.add_argument("--max-accuracy-drop", type=float, default=0.5,
                   help="percentage points a quantized variant may lose, 0 or more (default 0.5)")
    b.add_argument("--mlflow-run", help="MLflow run id, recorded in the lineage")
    b.add_argument("--quiet", action="store_true", help="no progress display")
    b.set_defaults(func=_build)

    v = sub.add_parser("verify", help="verify a package as a device would")
    v.add_argument("package")
    v.add_argument("--root", required=True, help="root public key (root.pub)")
    v.add_argument("--target", help="refuse packages built for another target (a known target name)")
    v.add_argument("--keyset", help="the newest keyset you hold (revocations take effect)")
    v.set_defaults(func=_verify)

    i = sub.add_parser("inspect", help="show a package's manifest (without verifying it)")
    i.add_argument("package")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=_inspect)

    e = sub.add_parser("examples", help="write the example models and data (from scikit-learn's bundled data)")
    e.add_argument("--out", required=True)
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=_examples)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ContractError as exc:
        print(f"model-packager: REJECTED ({exc.reason}): {exc}", file=sys.stderr)
        return 1
    except (PackagerError, FileExistsError, FileNotFoundError) as exc:
        print(f"model-packager: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # a file system refusal no layer translated: one line, not a traceback
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"model-packager: error: {where}{exc.strerror or exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
