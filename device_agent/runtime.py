"""One inference interface, two backends: onnxruntime and LiteRT.

``run(x)`` takes float32 ``[N, ...]`` in the model's float domain and returns class probabilities float32
``[N, C]``. Quantized int8/uint8 LiteRT tensors are (de)quantized here with the model's own scale and zero point,
so callers never see the integer domain.

``bind(inputs, outputs)`` is the agent's hot path: zero-argument runners that read a preallocated input row and
write the probabilities into a preallocated output row in place. With onnxruntime each runner is an IOBinding
(no input-feed dict, no output allocation: ~2.5 µs less per call than ``InferenceSession.run`` for the example
models, see ``bench/agent_overhead.py``); other backends get copying runners with the same contract.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from .errors import InferenceError, ModelLoadError

_GRAPH_OPT = {"disable": 0, "basic": 1, "extended": 2, "all": 99}

Runner = Callable[[], None]


def copying_runners(run: Callable[[np.ndarray], np.ndarray], inputs: Sequence[np.ndarray],
                    outputs: Sequence[np.ndarray]) -> list[Runner]:
    """Runners with the ``bind`` contract for a backend that cannot bind memory: run, then copy the result."""

    def make(x: np.ndarray, out: np.ndarray) -> Runner:
        def runner() -> None:
            y = run(x)
            try:
                out[...] = y
            except ValueError as exc:  # the model's output is not the [1, C] the manifest declares
                raise InferenceError(f"model output of shape {list(np.shape(y))} does not fit "
                                     f"{list(out.shape)}") from exc

        return runner

    return [make(x, out) for x, out in zip(inputs, outputs, strict=True)]


class Runtime(Protocol):
    name: str

    def run(self, x: np.ndarray) -> np.ndarray: ...

    def run_checked(self, x: np.ndarray) -> np.ndarray: ...

    def bind(self, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> list[Runner]: ...


class OnnxRuntime:
    name = "onnxruntime"

    def __init__(self, path: Path, probabilities: str, *, threads: int = 1, graph_optimization: str = "all",
                 allow_spinning: bool = False) -> None:
        """Raises ModelLoadError when onnxruntime cannot load the file or it lacks the output. ``allow_spinning``:
        the intra-op threads spin-wait after each run (the target's ``[runtime] allow_spinning``)."""
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = max(1, threads)
        opts.inter_op_num_threads = 1
        opts.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")
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
        self.binding = ""  # what the last ``bind`` gave: "iobinding" (in place) or "copying"

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

    def bind(self, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> list[Runner]:
        """Runners for the hot path: ``runners[i]()`` runs the model on ``inputs[i]`` and writes the probabilities
        into ``outputs[i]`` (C-contiguous float32 ``[1, ...]`` / ``[1, C]``, kept alive and never resized by the
        caller; one runner is never called from two threads at once). One onnxruntime IOBinding per pair, so the
        runtime reads and writes those rows in place. Runners raise InferenceError.

        The binding is checked once against ``run`` on ``inputs[0]``; a model that cannot be bound this way
        (another output type or shape) gets copying runners instead, with the same contract.
        """
        bindings = []
        try:
            for x, out in zip(inputs, outputs, strict=True):
                if not (x.flags.c_contiguous and out.flags.c_contiguous and x.dtype == np.float32
                        and out.dtype == np.float32):
                    raise ValueError("bound rows must be C-contiguous float32")
                io = self.session.io_binding()
                io.bind_input(self.input_name, "cpu", 0, np.float32, list(x.shape), x.ctypes.data)
                io.bind_output(self.probabilities, "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
                bindings.append(io)
            runners = [self._runner(io) for io in bindings]
            if runners:
                expected = self.run(inputs[0])
                outputs[0][...] = np.nan
                runners[0]()
                if not np.array_equal(outputs[0], expected, equal_nan=True):
                    raise ValueError("bound output differs from run()")
        except Exception:  # noqa: BLE001 - any failure to bind means: use the copying path, which is always right
            self.binding = "copying"
            return copying_runners(self.run, inputs, outputs)
        self.binding = "iobinding"
        return runners

    def _runner(self, io: Any) -> Runner:
        """One bound run. The public ``run_with_iobinding`` spends ~0.5 µs in Python on WebGPU graph-capture
        checks that never apply to the CPU provider; when this onnxruntime exposes the session's native
        ``run_with_iobinding`` (``_sess``/``_iobinding``, as 1.32 does) it is called directly, and checked by ``bind``;
        otherwise the public method."""
        native = getattr(getattr(self.session, "_sess", None), "run_with_iobinding", None)
        raw = getattr(io, "_iobinding", None)
        if native is not None and raw is not None:
            target, arg = native, raw
        else:
            target, arg = self.session.run_with_iobinding, io

        def runner() -> None:
            try:
                target(arg, None)
            except Exception as exc:
                raise InferenceError(f"onnxruntime failed: {exc}") from exc

        return runner


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

    def bind(self, inputs: Sequence[np.ndarray], outputs: Sequence[np.ndarray]) -> list[Runner]:
        """Copying runners (LiteRT owns its tensors): see ``OnnxRuntime.bind`` for the contract."""
        return copying_runners(self.run, inputs, outputs)


def open_runtime(
    runtime: str, path: Path, probabilities: str, *, threads: int = 1, graph_optimization: str = "all",
    allow_spinning: bool = False,
) -> Runtime:
    """Open the named backend ("onnxruntime" or "litert"). Raises ModelLoadError."""
    if runtime == "onnxruntime":
        return OnnxRuntime(path, probabilities, threads=threads, graph_optimization=graph_optimization,
                           allow_spinning=allow_spinning)
    if runtime == "litert":
        return LiteRtRuntime(path, threads=threads)
    raise ModelLoadError(f"unknown runtime {runtime!r}; known: onnxruntime, litert")
