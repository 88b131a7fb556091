"""Quantization candidates through onnxruntime.quantization, configured from the target profile.

``int8-dynamic``: weights int8, activations quantized at run time (MatMulInteger / DynamicQuantizeLinear).
``int8-static``: QDQ (QuantizeLinear/DequantizeLinear pairs) calibrated on the calibration set, activation and
weight types from the target (U8S8 on x86, where S8S8 QOperator is ~9x slower). Only MatMul/Gemm/Conv are
quantized; scikit-learn's ``ai.onnx.ml`` operators (Scaler, ZipMap, …) stay in float.
"""

from __future__ import annotations

import logging
import tempfile
from pathlib import Path

import numpy as np

from edgefleet_contracts.targets import Target

from .errors import QuantizationError

OPS = ["MatMul", "Gemm", "Conv"]


class _Reader:
    """CalibrationDataReader over an in-memory array, one sample per call."""

    def __init__(self, input_name: str, x: np.ndarray, limit: int = 512) -> None:
        self._rows = iter(np.asarray(x[:limit], dtype=np.float32))
        self.input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        row = next(self._rows, None)
        return None if row is None else {self.input_name: row[None, ...]}


def _qtype(name: str) -> object:
    from onnxruntime.quantization import QuantType

    return QuantType.QInt8 if name == "int8" else QuantType.QUInt8


def quantize(mode: str, model: Path, out: Path, target: Target, calibration: np.ndarray, input_name: str) -> Path:
    """Write the ``mode`` variant of ``model`` to ``out``. Raises QuantizationError with onnxruntime's reason."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, quantize_dynamic, quantize_static

    ort.set_default_logger_severity(3)
    logging.getLogger("onnxruntime").setLevel(logging.ERROR)
    logging.getLogger("root").setLevel(logging.ERROR)
    try:
        if mode == "int8-dynamic":
            quantize_dynamic(str(model), str(out), weight_type=_qtype(target.weight_type),
                             op_types_to_quantize=OPS, per_channel=target.per_channel)
        elif mode == "int8-static":
            with tempfile.TemporaryDirectory() as tmp:
                src = model
                try:
                    from onnxruntime.quantization.shape_inference import quant_pre_process

                    pre = Path(tmp) / "pre.onnx"
                    quant_pre_process(str(model), str(pre), skip_symbolic_shape=True)
                    src = pre
                except Exception:  # noqa: BLE001 - pre-processing is an optimisation; quantize the raw graph
                    src = model
                quantize_static(
                    str(src), str(out), _Reader(input_name, calibration),
                    quant_format=QuantFormat.QDQ if target.quant_format == "qdq" else QuantFormat.QOperator,
                    activation_type=_qtype(target.activation_type),
                    weight_type=_qtype(target.weight_type),
                    per_channel=target.per_channel,
                    op_types_to_quantize=OPS,
                    calibrate_method=CalibrationMethod.MinMax,
                    # onnxruntime 1.32's per-channel int32-bias weight-scale adjustment fails on MatMul+Add
                    # biases ("truth value of an array ... is ambiguous"); the adjustment only matters for
                    # tiny weight scales, so it is turned off.
                    extra_options={"QDQDisableWeightAdjustForInt32Bias": True},
                )
        else:
            raise QuantizationError(f"unknown quantization mode {mode!r}")
    except QuantizationError:
        raise
    except Exception as exc:  # onnxruntime.quantization raises bare Exceptions: translate here
        raise QuantizationError(f"{mode} quantization of {model.name} failed: {exc}") from exc
    return out


def op_types(model: Path) -> list[str]:
    import onnx

    return sorted({n.op_type for n in onnx.load(str(model), load_external_data=False).graph.node})
