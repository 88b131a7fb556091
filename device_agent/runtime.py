"""One inference interface, two backends: onnxruntime and LiteRT.

``run(x)`` takes float32 ``[N, ...]`` in the model's float domain and returns class probabilities float32
``[N, C]``. Quantized int8/uint8 LiteRT tensors are (de)quantized here with the model's own scale and zero point,
so callers never see the integer domain.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import InferenceError, ModelLoadError

_GRAPH_OPT = {"disable": 0, "basic": 1, "extended": 2, "all": 99}


class Runtime(Protocol):
    name: str

    def run(self, x: np.ndarray) -> np.ndarray: ...

    def run_checked(self, x: np.ndarray) -> np.ndarray: ...


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, path: Path, probabilities: str, *, threads: int = 1, graph_optimization: str = "all") -> None:
        """Raises ModelLoadError when onnxruntime cannot load the file or it lacks the output."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel(_GRAPH_OPT.get(graph_optimization, 99))
        opts.log_severity_level = 3
        try:
            self.session = ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # onnxruntime raises its own untyped errors: translate at the boundary
            raise ModelLoadError(f"onnxruntime cannot load {path}: {exc}") from exc
        outputs = [o.name for o in self.session.get_outputs()]
        if probabilities not in outputs:
            raise ModelLoadError(f"{path} has no output {probabilities!r}; outputs: {outputs}")
        self.input_name = self.session.get_inputs()[0].name
        self.probabilities = probabilities
        self._outs = [probabilities]
        self._run = self.session.run

    def run_checked(self, x: np.ndarray) -> np.ndarray:
        """Hot path for inputs already validated as C-contiguous float32 (the agent's validator output)."""
        try:
            return self._run(self._outs, {self.input_name: x})[0]
        except Exception as exc:
            raise InferenceError(f"onnxruntime failed: {exc}") from exc

    def run(self, x: np.ndarray) -> np.ndarray:
        try:
            out = self.session.run([self.probabilities], {self.input_name: np.ascontiguousarray(x, np.float32)})[0]
        except Exception as exc:
            raise InferenceError(f"onnxruntime failed: {exc}") from exc
        return np.asarray(out, dtype=np.float32)


def _litert_interpreter() -> Any:
    try:
        from ai_edge_litert.interpreter import Interpreter
    except ImportError:  # pragma: no cover - only on machines without ai-edge-litert
        try:
            from tflite_runtime.interpreter import Interpreter
        except ImportError as exc:
            raise ModelLoadError("no LiteRT runtime: install ai-edge-litert (or tflite-runtime)") from exc
    return Interpreter


class LiteRtRuntime:
    name = "litert"

    def __init__(self, path: Path, *, threads: int = 1) -> None:
        """Raises ModelLoadError when LiteRT cannot load the file."""
        interpreter_cls = _litert_interpreter()
        try:
            self.interp = interpreter_cls(model_path=str(path), num_threads=max(1, threads))
            self.interp.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ModelLoadError(f"LiteRT cannot load {path}: {exc}") from exc
        self._in = self.interp.get_input_details()[0]
        self._out = self.interp.get_output_details()[0]
        self.input_name = str(self._in["name"])
        self._batch = int(self._in["shape"][0])

    @staticmethod
    def _quant(detail: dict[str, Any]) -> tuple[float, int]:
        scale, zero = detail.get("quantization", (0.0, 0))
        return float(scale), int(zero)

    def _resize(self, n: int) -> None:
        if n != self._batch:
            shape = list(self._in["shape"])
            shape[0] = n
            self.interp.resize_tensor_input(self._in["index"], shape)
            self.interp.allocate_tensors()
            self._in = self.interp.get_input_details()[0]
            self._out = self.interp.get_output_details()[0]
            self._batch = n

    def run(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float32)
        try:
            self._resize(x.shape[0])
            dtype = np.dtype(self._in["dtype"])
            if dtype.kind in "iu":
                scale, zero = self._quant(self._in)
                info = np.iinfo(dtype)
                x_in = np.clip(np.round(x / scale) + zero, info.min, info.max).astype(dtype)
            else:
                x_in = x.astype(dtype)
            self.interp.set_tensor(self._in["index"], x_in)
            self.interp.invoke()
            y = self.interp.get_tensor(self._out["index"])
        except (ValueError, RuntimeError) as exc:
            raise InferenceError(f"LiteRT failed: {exc}") from exc
        if np.dtype(self._out["dtype"]).kind in "iu":
            scale, zero = self._quant(self._out)
            return ((y.astype(np.float32) - zero) * scale).astype(np.float32)
        return np.asarray(y, dtype=np.float32)

    def run_checked(self, x: np.ndarray) -> np.ndarray:
        return self.run(x)


def open_runtime(
    runtime: str, path: Path, probabilities: str, *, threads: int = 1, graph_optimization: str = "all"
) -> Runtime:
    """Open the named backend ("onnxruntime" or "litert"). Raises ModelLoadError."""
    if runtime == "onnxruntime":
        return OnnxRuntime(path, probabilities, threads=threads, graph_optimization=graph_optimization)
    if runtime == "litert":
        return LiteRtRuntime(path, threads=threads)
    raise ModelLoadError(f"unknown runtime {runtime!r}; known: onnxruntime, litert")
