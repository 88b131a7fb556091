"""Fixtures for the tests that run on the emulated Pi 4: what the x86 side prepared, and devices made from it.

``EDGEFLEET_ARM_WORK`` names the work folder hardware/arm/x86_side.py prepared (``device/``: public keys,
signed packages, inputs, the x86 run's outputs) and where these tests leave what x86 checks afterwards (``out/``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from device_agent.config import DeviceDir
from device_agent.provision import ProvisionRequest, provision

TARGET = "rpi4-aarch64"
MODELS = ("clinical", "vision", "digits-lite")


@dataclass(frozen=True)
class Work:
    device: Path  # read-only inputs from the x86 side
    out: Path  # written here, checked by x86 afterwards
    expected: dict[str, np.ndarray]
    meta: dict[str, Any]

    def package(self, name: str, version: str = "1.0.0") -> Path:
        return self.device / "packages" / f"{name}-{version}.efpkg"

    def inputs(self, name: str) -> list[Any]:
        """The inputs the x86 run predicted, in the same order: feature rows, or encoded PNG bytes."""
        if name == "vision":
            return [p.read_bytes() for p in sorted((self.device / "inputs" / "vision").glob("*.png"))]
        return list(self.expected[f"{name}_x"])


@pytest.fixture(scope="session")
def work() -> Work:
    env = os.environ.get("EDGEFLEET_ARM_WORK")
    if not env:
        raise pytest.UsageError("tests/arm run only inside the emulated root filesystem: use `make test-arm`")
    root = Path(env)
    out = root / "out"
    out.mkdir(exist_ok=True)
    with np.load(root / "device" / "expected.npz") as z:
        expected = {k: z[k] for k in z.files}
    return Work(root / "device", out, expected, json.loads((root / "device" / "expected.json").read_text()))


def new_device(work: Work, path: Path, name: str, version: str = "1.0.0") -> DeviceDir:
    """Provision a device for the Pi 4 target with ``name``'s package (verify, unpack, smoke test, activate)."""
    res = provision(ProvisionRequest(directory=path, device_id=f"pi-{name}", target=TARGET,
                                     root_key=work.device / "root.pub", fleet_key=work.device / "fleet.pub",
                                     package=work.package(name, version)))
    assert res.install is not None and res.install.ok, res.install
    return res.device


@pytest.fixture(scope="session")
def devices(work: Work, tmp_path_factory: pytest.TempPathFactory) -> dict[str, DeviceDir]:
    """One provisioned device per example package, shared by the tests that only read from them."""
    root = tmp_path_factory.mktemp("devices")
    return {name: new_device(work, root / name, name) for name in MODELS}
