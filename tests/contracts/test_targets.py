import tomllib
from dataclasses import replace
from pathlib import Path

import pytest

from device_agent.model import load_model
from edgefleet_contracts.errors import SchemaError
from edgefleet_contracts.targets import (
    Target,
    UnknownTargetError,
    UnsupportedTargetError,
    default_targets_dir,
    get_target,
    known_targets,
)
from tests.conftest import extract


def test_required_targets_exist_with_quantization_preferences():
    targets = known_targets()
    for name in ("x86_64-avx2", "x86_64-vnni", "rpi4-aarch64", "rpi5-aarch64", "jetson-orin-nano-cpu"):
        t = targets[name]
        assert t.supported and t.threads >= 1 and t.memory_budget_mb > 0
        assert t.prefer and t.quant_format == "qdq"
    assert targets["x86_64-avx2"].activation_type == "uint8" and targets["x86_64-avx2"].weight_type == "int8"


def test_unknown_target_lists_known_ones():
    with pytest.raises(UnknownTargetError, match="known targets: .*rpi4-aarch64.*x86_64-avx2"):
        get_target("pdp11")


def test_armv7_is_refused_with_the_reason():
    with pytest.raises(UnsupportedTargetError, match="no armv7 .*wheels of onnxruntime, ai-edge-litert or numpy"):
        get_target("armv7-32bit")


def test_runtime_spinning_is_off_unless_a_target_asks_for_it():
    base = tomllib.loads((Path(default_targets_dir()) / "x86_64-avx2.toml").read_text())
    assert Target.from_dict(base, "x86_64-avx2.toml").allow_spinning is False
    on = {**base, "runtime": {**base["runtime"], "allow_spinning": True}}
    assert Target.from_dict(on, "on.toml").allow_spinning is True
    bad = {**base, "runtime": {**base["runtime"], "allow_spinning": "yes"}}
    with pytest.raises(SchemaError, match="runtime.allow_spinning must be true or false"):
        Target.from_dict(bad, "bad.toml")
    assert replace(get_target("x86_64-avx2"), allow_spinning=True).allow_spinning


def test_the_onnxruntime_session_spins_only_when_the_target_allows_it(built, tmp_path):
    slot = extract(built.package, tmp_path / "slot", built.keys / "root.pub")
    quiet = load_model(slot, get_target("x86_64-avx2"))
    spinning = load_model(slot, replace(get_target("x86_64-avx2"), allow_spinning=True))

    def entry(model):
        return model.runtime.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning")

    assert entry(quiet) == "0" and entry(spinning) == "1"
