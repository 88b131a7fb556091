"""A model loaded from a verified slot: manifest, runtime (warmed up), validator, reference profile."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgefleet_contracts.canonical import parse_json
from edgefleet_contracts.errors import ContractError
from edgefleet_contracts.manifest import MANIFEST_NAME, Manifest
from edgefleet_contracts.profile import CalibrationMap, Profile
from edgefleet_contracts.targets import Target

from .errors import ModelLoadError
from .runtime import Runtime, open_runtime
from .validation import Validator


@dataclass
class LoadedModel:
    slot: Path
    manifest: Manifest
    runtime: Runtime
    validator: Validator
    profile: Profile
    calibration: CalibrationMap

    @property
    def name(self) -> str:
        return self.manifest.name

    @property
    def version(self) -> str:
        return self.manifest.version

    @property
    def classes(self) -> tuple[str, ...]:
        return self.manifest.output.classes


def load_model(slot: Path, target: Target, threads: int | None = None) -> LoadedModel:
    """Load a slot written by the updater (``threads`` overrides the target's intra-op threads).

    Raises ModelLoadError naming the file that is wrong."""
    try:
        env = parse_json((slot / MANIFEST_NAME).read_bytes(), what=f"{slot}/{MANIFEST_NAME}")
        manifest = Manifest.from_signed(env["signed"])
        profile = Profile.from_dict(json.loads((slot / "profile.json").read_text()))
        calibration = CalibrationMap.from_dict(json.loads((slot / "calibration.json").read_text()))
    except (OSError, KeyError, TypeError, ValueError, ContractError) as exc:
        raise ModelLoadError(f"slot {slot} is not a complete model: {exc}") from exc
    runtime = open_runtime(manifest.runtime, slot / manifest.model_file, manifest.output.probabilities,
                           threads=threads or target.threads, graph_optimization=target.graph_optimization,
                           allow_spinning=target.allow_spinning)
    try:
        with np.load(slot / "golden.npz", allow_pickle=False) as g:
            warm = np.asarray(g["x"][:1], dtype=np.float32)
    except (OSError, KeyError, ValueError) as exc:
        raise ModelLoadError(f"slot {slot} has no usable golden.npz: {exc}") from exc
    for _ in range(3):  # warm-up: first runs allocate and pick kernels
        runtime.run(warm)
    return LoadedModel(slot, manifest, runtime, Validator(manifest.input), profile, calibration)
