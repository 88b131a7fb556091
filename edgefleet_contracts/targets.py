"""Hardware target profiles (``hardware/targets/*.toml``): what a device can run and how to quantize for it.

The profiles ship in the repository's ``hardware/targets`` folder; a provisioned device keeps a copy of its own
profile in its device folder, so a device never needs the repository. ``EDGEFLEET_TARGETS`` overrides the
folder.
"""

from __future__ import annotations

import os
import platform
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ContractError, SchemaError

QUANT_MODES = ("none", "int8-dynamic", "int8-static")


class UnknownTargetError(ContractError):
    """The named target has no profile; the message lists the known ones."""

    reason = "unknown_target"


class UnsupportedTargetError(ContractError):
    """The target has a profile but cannot run edgefleet; the message says why."""

    reason = "unsupported_target"


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    arch: str
    isa: tuple[str, ...]
    runtimes: tuple[str, ...]
    supported: bool
    unsupported_reason: str
    prefer: tuple[str, ...]
    quant_format: str
    activation_type: str
    weight_type: str
    per_channel: bool
    max_latency_ratio: float | None
    threads: int
    graph_optimization: str
    memory_budget_mb: int
    # onnxruntime's intra-op threads spin-wait for work after each run (``[runtime] allow_spinning``). Off by
    # default: at 100 predictions a second spinning cost the clinical model 379 instead of 248 µs of CPU per
    # prediction, with no latency gain (README, inference); turn on for back-to-back batch inference.
    allow_spinning: bool = False

    @classmethod
    def from_dict(cls, d: dict[str, Any], source: str) -> Target:
        """Raises SchemaError naming the file and field."""
        try:
            q: dict[str, Any] = d["quantization"]
            r: dict[str, Any] = d["runtime"]
            prefer = tuple(str(p) for p in q["prefer"])
            bad = [p for p in prefer if p not in QUANT_MODES]
            if bad:
                raise SchemaError(f"{source}: quantization.prefer has unknown modes {bad}; known: {QUANT_MODES}")
            if q["format"] not in ("qdq", "qoperator"):
                raise SchemaError(f"{source}: quantization.format must be qdq or qoperator")
            for k in ("activation_type", "weight_type"):
                if q[k] not in ("int8", "uint8"):
                    raise SchemaError(f"{source}: quantization.{k} must be int8 or uint8")
            mlr = q.get("max_latency_ratio")
            return cls(
                name=str(d["name"]),
                description=str(d.get("description", "")),
                arch=str(d["arch"]),
                isa=tuple(str(x) for x in d.get("isa", [])),
                runtimes=tuple(str(x) for x in d["runtimes"]),
                supported=bool(d["supported"]),
                unsupported_reason=str(d.get("unsupported_reason", "")),
                prefer=prefer,
                quant_format=str(q["format"]),
                activation_type=str(q["activation_type"]),
                weight_type=str(q["weight_type"]),
                per_channel=bool(q.get("per_channel", False)),
                max_latency_ratio=float(mlr) if mlr is not None else None,
                threads=int(r["threads"]),
                graph_optimization=str(r.get("graph_optimization", "all")),
                memory_budget_mb=int(r["memory_budget_mb"]),
                allow_spinning=_flag(r.get("allow_spinning", False), "runtime.allow_spinning"),
            )
        except KeyError as exc:
            raise SchemaError(f"{source}: missing field {exc.args[0]!r}") from None
        except (TypeError, ValueError) as exc:
            raise SchemaError(f"{source}: {exc}") from None

    def host_matches(self) -> bool:
        """True when this machine has the target's architecture (so measured latency is meaningful)."""
        host = platform.machine().lower()
        return host == self.arch or (host == "arm64" and self.arch == "aarch64")


def _flag(value: Any, what: str) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{what} must be true or false, not {value!r}")
    return value


def default_targets_dir() -> Path:
    env = os.environ.get("EDGEFLEET_TARGETS")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / "hardware" / "targets"


def load_target_file(path: Path) -> Target:
    try:
        data = tomllib.loads(Path(path).read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SchemaError(f"cannot read target profile {path}: {exc}") from exc
    t = Target.from_dict(data, str(path))
    if t.name != Path(path).stem:
        raise SchemaError(f"{path}: name {t.name!r} does not match the file name")
    return t


def known_targets(directory: Path | None = None) -> dict[str, Target]:
    d = directory or default_targets_dir()
    return {p.stem: load_target_file(p) for p in sorted(d.glob("*.toml"))}


def get_target(name: str, directory: Path | None = None, *, require_supported: bool = True) -> Target:
    """Look a target up by name.

    Raises UnknownTargetError listing the known targets, or UnsupportedTargetError with the profile's reason.
    """
    targets = known_targets(directory)
    if name not in targets:
        raise UnknownTargetError(f"unknown target {name!r}; known targets: {', '.join(targets) or 'none'}")
    t = targets[name]
    if require_supported and not t.supported:
        raise UnsupportedTargetError(f"target {name!r} is not supported: {t.unsupported_reason}")
    return t
