"""Device-agent tests, and the helpers they share: real packages built once per session, re-signed variants,
provisioned device folders and "does the device serve this model" checks. No mocks anywhere."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np

from device_agent.config import DeviceDir
from device_agent.provision import ProvisionRequest, provision
from device_agent.runtime import open_runtime
from device_agent.slots import SLOT_NAMES, Slots
from edgefleet_contracts.signing import Ed25519PrivateKey, generate_key, save_public_key, sign_envelope
from edgefleet_contracts.timeutil import utcnow

TARGET = "x86_64-avx2"
Members = list[tuple[tarfile.TarInfo, bytes]]


@dataclass(frozen=True)
class Packages:
    v100: Path
    v110: Path
    v200: Path
    fleet_pub: Path


_CACHE: dict[Path, Packages] = {}


def build(built: Any, version: str, out: Path, **kw: Any) -> Path:
    """A real package of the session's tiny clinical model (quantize none: fastest)."""
    from model_packager.build import BuildRequest, build_package

    req = BuildRequest(model=built.model, name=kw.pop("name", "clinical"), version=version, target=TARGET,
                       calibration=built.calibration, holdout=built.holdout, keys=kw.pop("keys", built.keys), out=out,
                       quantize="none", owner="clinical-ml", latency_runs=10, **kw)
    build_package(req)
    return out


def packages(built: Any) -> Packages:
    """clinical 1.0.0 (the session's package), 1.1.0 and 2.0.0, built once per session; a fleet public key."""
    if built.root not in _CACHE:
        folder = built.root / "agent-packages"
        folder.mkdir(exist_ok=True)
        fleet_pub = folder / "fleet.pub"
        save_public_key(generate_key().public_key(), fleet_pub)
        _CACHE[built.root] = Packages(built.package, build(built, "1.1.0", folder / "clinical-1.1.0.efpkg"),
                                      build(built, "2.0.0", folder / "clinical-2.0.0.efpkg"), fleet_pub)
    return _CACHE[built.root]


def signing_key(keys: Path) -> Ed25519PrivateKey:
    from model_packager.keys import KeyFolder

    return KeyFolder(keys).signing_key()[0]


# ---- re-packing real packages into bad (or differently signed) ones ---------------------------------------
def members(pkg: Path) -> Members:
    with tarfile.open(pkg, "r:") as tar:
        out = []
        for m in tar:
            fh = tar.extractfile(m)
            out.append((m, fh.read() if fh is not None else b""))
        return out


def write(out: Path, items: Members) -> Path:
    with tarfile.open(out, "w:", format=tarfile.PAX_FORMAT) as tar:
        for m, data in items:
            ti = tarfile.TarInfo(m.name)
            ti.size = len(data)
            tar.addfile(ti, io.BytesIO(data))
    return out


def doc(items: Members, name: str) -> Any:
    return json.loads(next(d for m, d in items if m.name == name))


def repack(src: Path, out: Path, signer: Ed25519PrivateKey | None, *, mutate: Any = None,
           files: dict[str, bytes] | None = None, keyset_env: dict[str, Any] | None = None) -> Path:
    """Copy a package, replacing payload ``files`` (re-hashed into the manifest), applying ``mutate`` to the
    manifest's signed part, re-signing it with ``signer`` (None: leave the old signature, i.e. tampered) and
    optionally swapping the keyset."""
    items = members(src)
    env = doc(items, "manifest.json")
    signed = env["signed"]
    for name, data in (files or {}).items():
        signed["files"][name] = {"sha256": hashlib.sha256(data).hexdigest(), "length": len(data)}
    if mutate is not None:
        mutate(signed)
    new_env = sign_envelope(signed, signer) if signer is not None else env
    replaced = {"manifest.json": json.dumps(new_env).encode(), **(files or {})}
    if keyset_env is not None:
        replaced["keyset.json"] = json.dumps(keyset_env).encode()
    return write(out, [(m, replaced.get(m.name, d)) for m, d in items])


def with_version(built: Any, src: Path, out: Path, version: str, **kw: Any) -> Path:
    return repack(src, out, kw.pop("signer", None) or signing_key(built.keys),
                  mutate=lambda s: s.update(version=version), **kw)


def with_expiry(built: Any, src: Path, out: Path, expires: datetime) -> Path:
    from edgefleet_contracts.timeutil import fmt

    return repack(src, out, signing_key(built.keys), mutate=lambda s: s.update(expires=fmt(expires)))


def corrupt_golden(built: Any, src: Path, out: Path, version: str) -> Path:
    """A correctly signed package whose golden expectations the model cannot reproduce (1 - p)."""
    golden = next(d for m, d in members(src) if m.name == "golden.npz")
    with np.load(io.BytesIO(golden)) as z:
        x, p, tol = z["x"], z["probabilities"], z["tolerance"]
    buf = io.BytesIO()
    np.savez(buf, x=x, probabilities=(1.0 - p).astype(np.float32), tolerance=tol)
    return repack(src, out, signing_key(built.keys), files={"golden.npz": buf.getvalue()},
                  mutate=lambda s: s.update(version=version))


# ---- devices ------------------------------------------------------------------------------------------
def new_device(built: Any, path: Path, *, package: Path | None = None, target: str = TARGET, **kw: Any) -> DeviceDir:
    pk = packages(built)
    res = provision(ProvisionRequest(directory=path, device_id=kw.pop("device_id", "dev-1"), target=target,
                                     root_key=built.keys / "root.pub", fleet_key=pk.fleet_pub, package=package, **kw),
                    clock=kw.pop("clock", utcnow))
    return res.device


def serve(device: DeviceDir) -> str:
    """Load the active slot through the runtime, run its golden inputs, check them; return the served version."""
    active = Slots(device).active()
    assert active is not None, "the device has no active model"
    folder, m = active
    rt = open_runtime(m.runtime, folder / m.model_file, m.output.probabilities, threads=1)
    with np.load(folder / "golden.npz") as z:
        x, expected, tol = z["x"], z["probabilities"], float(z["tolerance"])
    got = rt.run(x)
    assert np.max(np.abs(got - expected)) <= tol
    assert (got.argmax(axis=1) == expected.argmax(axis=1)).all()
    return m.version


def only_slots_left(device: DeviceDir) -> bool:
    """Nothing but ready slots under slots/ (no staging or trash folders, no half-written slot)."""
    s = Slots(device)
    names = sorted(p.name for p in device.slots.iterdir())
    return set(names) <= set(SLOT_NAMES) and all(s.is_ready(n) for n in names)


def copy_device(src: DeviceDir, dest: Path) -> DeviceDir:
    shutil.copytree(src.path, dest, symlinks=True)
    return DeviceDir(dest)
