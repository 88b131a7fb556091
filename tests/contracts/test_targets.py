import pytest

from edgefleet_contracts.targets import UnknownTargetError, UnsupportedTargetError, get_target, known_targets


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
