"""`model-packager` command line: keys, examples, build, verify, inspect."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from edgefleet_contracts.errors import ContractError
from edgefleet_contracts.timeutil import parse_duration

from . import keys as keysmod
from .errors import PackagerError


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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (PackagerError, ContractError, FileExistsError) as exc:
        print(f"model-packager: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
