"""Checking requests against the package's input schema. Fast when the input is good; precise when it is not.

An array row is checked for shape, finiteness and per-feature range in one vectorised comparison; only when it
fails do we look for the first offending feature to name it. Named inputs (the HTTP API) are also checked for
missing and unexpected fields — both at once usually means an upstream rename, and the error says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from edgefleet_contracts.manifest import InputSpec

from .errors import InputError

_F32 = np.dtype(np.float32)  # the native-order singleton: ``dtype is _F32`` excludes byte-swapped arrays


class Validator:
    def __init__(self, spec: InputSpec) -> None:
        self.spec = spec
        self.names = spec.feature_names
        self.width = len(self.names)
        self.lows = np.array([f.min for f in spec.features], dtype=np.float32)
        self.highs = np.array([f.max for f in spec.features], dtype=np.float32)
        self._index = {n: i for i, n in enumerate(self.names)}
        self._shapes = ((1, self.width), (self.width,))

    def into(self, x: Any, out: np.ndarray, also: np.ndarray | None = None) -> None:
        """Validate one input straight into ``out`` (a preallocated float32 ``[1, F]`` row, e.g. the runtime's
        bound input) and, when given, ``also`` (another such row, e.g. the window's staging row; the first ufunc
        writes it, so the second copy is free). Raises InputError naming the feature; the rows are then garbage.

        Hot path for a float32 array of shape ``[1, F]`` or ``[F]``: the same clamp-and-compare as :meth:`row`
        (two ufunc calls and one byte compare), with no allocation. When ``out`` equals the input byte for byte,
        so does ``also``: every value was already inside its range. Anything else goes through :meth:`row`.
        """
        if type(x) is np.ndarray and x.dtype is _F32 and x.shape in self._shapes:
            first = out if also is None else also
            np.fmax(x, self.lows, out=first)
            np.fmin(first, self.highs, out=out)
            if out.tobytes() != x.tobytes():
                self._explain(x.reshape(-1))
            return
        out[...] = self.row(x)
        if also is not None:
            also[...] = out

    def row(self, x: Any) -> np.ndarray:
        """One input as a float32 ``[1, F]`` array (a private copy). Raises InputError naming the feature.

        Hot path: the check is two ufunc calls. ``fmax``/``fmin`` clamp into the valid range and turn NaN into a
        bound, so the clamped row differs byte-for-byte from the input exactly when some value is NaN, infinite
        or out of range. The clamped buffer is then the validated copy (equal to the input when valid).
        """
        if type(x) is not np.ndarray or x.dtype != np.float32:
            try:
                x = _as_float32(x, f"input is not numeric: expected {self.width} numbers")
            except OverflowError:  # a Python int beyond float range (JSON allows any number of digits)
                raise self._overflow(x) from None
            except (TypeError, ValueError):
                raise InputError(f"input is not numeric: expected {self.width} numbers", kind="wrong_shape") from None
        if x.shape != (1, self.width):
            if x.shape == (self.width,):
                x = x.reshape(1, self.width)
            else:
                raise InputError(f"input has shape {list(np.shape(x))}, expected [{self.width}] "
                                 f"({', '.join(self.names[:3])}, …)", kind="wrong_shape")
        out = np.fmax(x, self.lows)
        np.fmin(out, self.highs, out=out)
        if out.tobytes() != x.tobytes():
            self._explain(x[0])
        return out

    def rows(self, x: Any) -> tuple[np.ndarray, list[InputError | None]]:
        """A batch ``[N, F]``: the valid rows and, per input row, None or its error (errors do not stop others)."""
        try:
            a = _as_float32(x, "batch is not a numeric [N, F] array")
        except OverflowError:
            raise self._overflow(x) from None
        except (TypeError, ValueError):
            raise InputError("batch is not a numeric [N, F] array", kind="wrong_shape") from None
        if a.ndim != 2 or a.shape[1] != self.width:
            raise InputError(f"batch has shape {list(a.shape)}, expected [N, {self.width}]", kind="wrong_shape")
        ok = ((a >= self.lows) & (a <= self.highs)).all(axis=1)
        errors: list[InputError | None] = [None] * len(a)
        for i in np.flatnonzero(~ok):
            try:
                self._explain(a[i])
            except InputError as exc:
                errors[int(i)] = exc
        return a[ok], errors

    def _overflow(self, x: Any) -> InputError:
        """The error for an input holding an integer too large for a float: named after its feature when the
        input is one row (or a batch) of ``F`` values, else for the input as a whole."""
        rows = x if isinstance(x, list | tuple) and x and all(isinstance(r, list | tuple) for r in x) else [x]
        for r in rows:
            if not isinstance(r, list | tuple) or len(r) != self.width:
                continue
            for j, v in enumerate(r):
                try:
                    float(v)
                except OverflowError:
                    return InputError(
                        f"feature {self.names[j]!r} is a number too large to represent, outside its valid range "
                        f"[{float(self.lows[j]):.6g}, {float(self.highs[j]):.6g}]",
                        kind="out_of_range", feature=self.names[j])
                except (TypeError, ValueError):
                    continue
        return InputError("input holds a number too large to represent", kind="out_of_range")

    def _explain(self, r: np.ndarray) -> None:
        nan = np.flatnonzero(np.isnan(r))
        if nan.size:
            name = self.names[int(nan[0])]
            raise InputError(f"feature {name!r} is NaN", kind="nan", feature=name)
        bad = np.flatnonzero((r < self.lows) | (r > self.highs))
        if bad.size:
            j = int(bad[0])
            raise InputError(
                f"feature {self.names[j]!r} = {float(r[j]):.6g} is outside its valid range "
                f"[{float(self.lows[j]):.6g}, {float(self.highs[j]):.6g}]",
                kind="out_of_range", feature=self.names[j],
            )
        inf = np.flatnonzero(~np.isfinite(r))
        if inf.size:
            name = self.names[int(inf[0])]
            raise InputError(f"feature {name!r} is infinite", kind="out_of_range", feature=name)

    def named(self, fields: Mapping[str, Any]) -> np.ndarray:
        """A name -> value mapping as a float32 ``[1, F]`` row. Raises InputError (missing, unexpected, type)."""
        if not isinstance(fields, Mapping):
            raise InputError("named input must be an object of feature name -> number", kind="wrong_shape")
        missing = [n for n in self.names if n not in fields]
        unexpected = sorted(k for k in fields if k not in self._index)
        if missing and unexpected:
            raise InputError(
                f"input schema changed upstream: missing {listed(missing)} and unexpected {listed(unexpected)} "
                "(renamed fields?)", kind="missing_field", feature=missing[0])
        if missing:
            raise InputError(f"missing feature(s) {listed(missing)}", kind="missing_field", feature=missing[0])
        if unexpected:
            raise InputError(f"unexpected field(s) {listed(unexpected)}; the model takes {self.width} named "
                             "features", kind="unexpected_field")
        values = []
        for n in self.names:
            v = fields[n]
            if v is None:
                raise InputError(f"missing value for feature {n!r}", kind="missing_field", feature=n)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise InputError(f"feature {n!r} must be a number, got {type(v).__name__}", kind="invalid_input",
                                 feature=n)
            values.append(v)
        return self.row(values)


def _as_float32(x: Any, message: str) -> np.ndarray:
    """``x`` as a float32 array, converted once, refusing what the conversion would take silently: complex
    numbers (their imaginary part dropped), strings that spell numbers ("14.2": the local HTTP API refuses them
    too) and booleans (InputError ``wrong_shape`` saying what the input holds). Objects (None, ints past 64
    bits) go on to the conversion, which raises TypeError, ValueError or OverflowError for the caller to name."""
    a = x if isinstance(x, np.ndarray) else np.asarray(x)
    what = {"c": "complex numbers", "U": "strings", "S": "bytes", "b": "booleans"}.get(a.dtype.kind)
    if what is not None:
        raise InputError(f"{message}; it holds {what}", kind="wrong_shape")
    return a.astype(np.float32, copy=False)


def listed(names: list[str], shown: int = 5) -> str:
    """The first ``shown`` names, and how many more there are (an error message must not pass for the full list)."""
    head = ", ".join(repr(n) for n in names[:shown])
    return head if len(names) <= shown else f"{head} and {len(names) - shown} more ({len(names)} in all)"
