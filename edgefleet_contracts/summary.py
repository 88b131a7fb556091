"""The window summary: the only thing about inputs and outputs that leaves a device.

A summary holds counts and sums, never a raw value: per input feature (or derived image statistic) counts on
the package's reference bins (``len(edges) + 1``: underflow, inner bins, overflow), missing / NaN /
out-of-range counts, sum and sum of squares of the in-range values; predicted-class counts, the confidence
histogram and calibrated-confidence sums per predicted class (label-free accuracy estimation); a latency
histogram on fixed log-spaced edges; error counts by kind; confusion counts when labels were fed back.

Summaries are mergeable: :func:`merge` adds two summaries of the same device and model version (used when a
window has fewer than k samples, and when the outbox is full). Each carries a per-device monotonic ``seq`` for
idempotent ingest, and travels signed by the device key (``{"signed": …, "signatures": […]}``).

Noise (``privacy``). A device with ``dp_epsilon`` set releases its histogram counts (feature bins, class counts,
confidence bins) with Laplace noise added and rounded, and *not* clipped at zero: clipping is what made noise
biased (a bin that is empty in truth gained ≈ b/2 phantom counts per release, and a scope summing hundreds of
windows showed drift that was only noise). So in a noised summary, and only there, those counts may be
negative; sums of many releases are unbiased and the server clips after adding. ``privacy.noise_variance``
is the variance the noise adds to each released count (2/ε² per release, adding up when releases merge), so
the server knows how much of a scope's counts is noise (:func:`noise_variance`: 2/ε² + 1/12 per release); a
summary without it (an earlier agent) counts as one release at ``epsilon``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from . import _fields as f
from .errors import SchemaError
from .timeutil import fmt, parse
from .topics import check_id

SUMMARY_TYPE = "edgefleet.summary"
SUMMARY_SPEC = 1
MAX_SUMMARY_BYTES = 256 * 1024
# Latency histogram edges in milliseconds, log-spaced 0.01 ms .. 10 s (shared by every device and the server).
LATENCY_EDGES_MS: tuple[float, ...] = tuple(round(0.01 * (10 ** (i / 8)), 6) for i in range(49))
ERROR_KINDS = ("invalid_input", "missing_field", "unexpected_field", "wrong_shape", "nan", "out_of_range",
               "bad_image", "inference", "other")


_INT = frozenset({int})
_INF = float("inf")
# The checks below test the common valid case first with exact types (``type(x) is int`` excludes bool, as the
# isinstance test does) using C-level calls, and only otherwise run the general test that names the error: same
# results, ~2x faster on the server's ingest path, which validates ~750 numbers per summary.


# What noise_variance gives for an epsilon so small that 2/ε² is not a finite float: still finite (a summary's
# numbers must be), and so large that the server weighs such counts as noise only. Merging a few hundred such
# releases stays finite. Agents never release at such an epsilon (their config takes 0.01 to 100).
MAX_NOISE_VARIANCE = 1e300


def noise_variance(epsilon: float) -> float:
    """The variance one release's rounded Laplace(1/epsilon) noise adds to a count (2/ε², plus 1/12 for the
    rounding), at most MAX_NOISE_VARIANCE: never a division by zero or an infinity, however small ``epsilon``.

    Raises ValueError for an epsilon that is not a positive number (0 means no noise: there is no release)."""
    if not epsilon > 0:  # also NaN
        raise ValueError(f"epsilon must be a positive number, not {epsilon!r}")
    if epsilon < 1e-140:  # ε² would underflow towards 0 and 2/ε² overflow
        return MAX_NOISE_VARIANCE
    return min(2.0 / (epsilon * epsilon) + 1.0 / 12.0, MAX_NOISE_VARIANCE)


def consistency_problem(count: int, n: list[int], bin_totals: list[int], class_counts: list[int],
                        confidence_counts: list[int], calibrated_sum: list[float], latency_counts: list[int],
                        empty_bins: int, noised: bool, name: Callable[[int], str]) -> str | None:
    """What makes a summary's numbers disagree with each other (each check holds exactly for every window an
    agent closes, and for merged windows, as all of them add), or None. Per feature ``i``: ``n[i]`` and
    ``bin_totals[i]`` (the sum of its counts); ``name(i)`` its name, for the message.

    One prediction gives one latency, one predicted class and one confidence, so those histograms each add up to
    ``window.count``; a feature's bins hold its ``n`` in-range values, at most one per prediction; a value in a
    bin that was empty in the reference counts once in ``empty_bins``; a calibrated confidence lies in [0, 1], so
    a class's calibrated sum lies between 0 and its count. In a noised summary (``privacy.epsilon``) the feature
    bins, class and confidence counts carry noise and add up to their totals only on average: only the checks
    without them apply (latencies, ``n``, ``empty_bins``, calibrated sums between 0 and ``window.count``).
    A summary that breaks one was not written by an agent as it works (a bug, or a key holder's forgery), and
    would skew what the server computes from it (sample sizes, estimated accuracy above 1). The common case
    costs a few list operations (the server's ingest runs this per summary); the loops only name a problem."""
    total = sum(latency_counts)
    if total != count:
        return (f"summary.ops.latency_counts add up to {total}, but window.count is {count} (one latency per "
                "prediction)")
    if n and max(n) > count:
        i = next(i for i, v in enumerate(n) if v > count)
        return f"summary.features[{i}] ({name(i)}): n is {n[i]}, more than the window's {count} predictions"
    if not noised and bin_totals != n:
        i = next(i for i, (a, b) in enumerate(zip(bin_totals, n, strict=True)) if a != b)
        return f"summary.features[{i}] ({name(i)}): counts add up to {bin_totals[i]}, but n is {n[i]}"
    values = sum(n)
    if empty_bins > values:
        return f"summary.output.empty_bins is {empty_bins}, more than the {values} feature values counted"
    tolerance = 1e-6 * max(1, count)  # calibrated sums are rounded to 9 decimals per class
    if calibrated_sum and min(calibrated_sum) < -tolerance:
        return "summary.output.calibrated_sum must not be negative (calibrated confidences lie in [0, 1])"
    if noised:
        if sum(calibrated_sum) > count + tolerance:
            return (f"summary.output.calibrated_sum adds up to {sum(calibrated_sum):g}, more than the window's "
                    f"{count} predictions (calibrated confidences lie in [0, 1])")
        return None
    for what, hist in (("class_counts", class_counts), ("confidence_counts", confidence_counts)):
        total = sum(hist)
        if total != count:
            return f"summary.output.{what} add up to {total}, but window.count is {count} (one per prediction)"
    for c, (cal, k) in enumerate(zip(calibrated_sum, class_counts, strict=True)):
        if cal > k + tolerance:
            return (f"summary.output.calibrated_sum[{c}] is {cal:g}, more than the class's {k} predictions "
                    "(calibrated confidences lie in [0, 1])")
    return None


def _int_list(v: Any, what: str, length: int | None = None, *, signed: bool = False) -> list[int]:
    """A list of integers, non-negative unless ``signed`` (the noised histogram counts, see the module doc)."""
    if type(v) is not list or not (set(map(type, v)) <= _INT and (signed or not v or min(v) >= 0)):  # noqa: SIM102
        if not isinstance(v, list) or not all(isinstance(x, int) and not isinstance(x, bool) and (signed or x >= 0)
                                              for x in v):
            kind = "integers" if signed else "non-negative integers"
            raise SchemaError(f"{what} must be a list of {kind}"
                              + ("" if signed else " (negative counts only in a noised summary: privacy.epsilon)"))
    if length is not None and len(v) != length:
        raise SchemaError(f"{what} must have {length} entries, got {len(v)}")
    return v


def _num(v: Any, what: str) -> float:
    t = type(v)
    if (t is float or t is int) and _INF > v > -_INF:  # False for NaN and the infinities
        return float(v)
    if not isinstance(v, int | float) or isinstance(v, bool) or v != v or v in (_INF, -_INF):
        raise SchemaError(f"{what} must be a finite number")
    return float(v)


@dataclass
class FeatureWindow:
    name: str
    counts: list[int]
    missing: int = 0
    nan: int = 0
    out_of_range: int = 0
    n: int = 0  # values counted in ``counts`` (and in sum/sumsq)
    sum: float = 0.0
    sumsq: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "counts": self.counts, "missing": self.missing, "nan": self.nan,
                "out_of_range": self.out_of_range, "n": self.n, "sum": self.sum, "sumsq": self.sumsq}


@dataclass
class Summary:
    device_id: str
    model: str
    version: str
    seq: int
    start: str
    end: str
    count: int  # predictions served in the window
    features: list[FeatureWindow]
    class_counts: list[int]
    confidence_counts: list[int]
    calibrated_sum: list[float]  # per predicted class: sum of calibrated confidence
    latency_counts: list[int]  # len(LATENCY_EDGES_MS) + 1
    errors: dict[str, int]
    confusion: list[list[int]] | None = None  # [true][predicted], from fed-back labels
    windows: int = 1  # how many raw windows were merged into this one
    empty_bins: int = 0  # values that fell in bins empty in the reference (estimate not trustworthy there)
    epsilon: float | None = None  # Laplace noise scale parameter used, if any
    epsilon_spent: float = 0.0
    noise_variance: float = 0.0  # variance the noise adds to each histogram count (2/ε² per release, summed)

    # ---- wire ----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "type": SUMMARY_TYPE, "spec": SUMMARY_SPEC, "device_id": self.device_id,
            "model": {"name": self.model, "version": self.version}, "seq": self.seq,
            "window": {"start": self.start, "end": self.end, "count": self.count, "windows": self.windows},
            "features": [x.to_dict() for x in self.features],
            "output": {"class_counts": self.class_counts, "confidence_counts": self.confidence_counts,
                       "calibrated_sum": self.calibrated_sum, "empty_bins": self.empty_bins},
            "ops": {"latency_counts": self.latency_counts, "errors": dict(sorted(self.errors.items()))},
            "labels": {"confusion": self.confusion} if self.confusion is not None else None,
            "privacy": self._privacy(),
        }

    def _privacy(self) -> dict[str, Any]:
        out: dict[str, Any] = {"epsilon": self.epsilon, "epsilon_spent": self.epsilon_spent}
        if self.noise_variance:
            out["noise_variance"] = self.noise_variance
        return out

    @classmethod
    def from_dict(cls, d: Any) -> Summary:
        """Validate an untrusted summary document. Raises SchemaError naming the bad field."""
        w = "summary"
        d = f.obj(d, w)
        f.const(d, "type", SUMMARY_TYPE, w)
        if d.get("spec") != SUMMARY_SPEC:
            raise SchemaError(f"summary.spec {d.get('spec')!r} is not supported (this server reads {SUMMARY_SPEC})")
        model = f.obj(d.get("model"), "summary.model")
        win = f.obj(d.get("window"), "summary.window")
        start, end = f.string(win, "start", "summary.window"), f.string(win, "end", "summary.window")
        if parse(end, "summary.window.end") < parse(start, "summary.window.start"):
            raise SchemaError("summary.window.end is before its start")
        priv = f.obj(d.get("privacy", {}), "summary.privacy")
        eps = priv.get("epsilon")
        epsilon = _num(eps, "summary.privacy.epsilon") if eps is not None else None
        if epsilon is not None and epsilon <= 0:
            raise SchemaError("summary.privacy.epsilon must be positive when present")
        noise_var = _num(priv.get("noise_variance", 0.0), "summary.privacy.noise_variance")
        if noise_var < 0 or (noise_var and epsilon is None):
            raise SchemaError("summary.privacy.noise_variance must be non-negative, and 0 without privacy.epsilon")
        noised = epsilon is not None
        feats = [_feature(fd, i, noised) for i, fd in enumerate(f.array(d, "features", w))]
        out = f.obj(d.get("output"), "summary.output")
        class_counts = _int_list(out.get("class_counts"), "summary.output.class_counts", signed=noised)
        cal = out.get("calibrated_sum")
        if not isinstance(cal, list) or len(cal) != len(class_counts):
            raise SchemaError("summary.output.calibrated_sum must have one number per class")
        ops = f.obj(d.get("ops"), "summary.ops")
        errors = f.obj(ops.get("errors"), "summary.ops.errors")
        for k, v in errors.items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise SchemaError(f"summary.ops.errors[{k}] must be a non-negative integer")
        labels = d.get("labels")
        confusion = None
        if labels is not None:
            rows = f.array(f.obj(labels, "summary.labels"), "confusion", "summary.labels")
            confusion = [_int_list(r, "summary.labels.confusion row", len(class_counts)) for r in rows]
            if len(confusion) != len(class_counts):
                raise SchemaError("summary.labels.confusion must be square, one row per class")
        s = cls(
            device_id=check_id(f.string(d, "device_id", w), "summary.device_id"),
            model=f.string(model, "name", "summary.model"), version=f.string(model, "version", "summary.model"),
            seq=f.integer(d, "seq", w, minimum=0), start=start, end=end,
            count=f.integer(win, "count", "summary.window", minimum=0), features=feats,
            class_counts=class_counts,
            confidence_counts=_int_list(out.get("confidence_counts"), "summary.output.confidence_counts",
                                        signed=noised),
            calibrated_sum=[_num(v, "summary.output.calibrated_sum[]") for v in cal],
            latency_counts=_int_list(ops.get("latency_counts"), "summary.ops.latency_counts",
                                     len(LATENCY_EDGES_MS) + 1),
            errors={str(k): int(v) for k, v in errors.items()}, confusion=confusion,
            windows=f.integer(win, "windows", "summary.window", minimum=1) if "windows" in win else 1,
            empty_bins=f.integer(out, "empty_bins", "summary.output", minimum=0) if "empty_bins" in out else 0,
            epsilon=epsilon,
            epsilon_spent=_num(priv.get("epsilon_spent", 0.0), "summary.privacy.epsilon_spent"),
            noise_variance=noise_var,
        )
        fs = s.features
        problem = consistency_problem(s.count, [x.n for x in fs], [sum(x.counts) for x in fs], s.class_counts,
                                      s.confidence_counts, s.calibrated_sum, s.latency_counts, s.empty_bins, noised,
                                      lambda i: fs[i].name)
        if problem is not None:
            raise SchemaError(problem)
        return s


def _feature(fd: Any, i: int, noised: bool = False) -> FeatureWindow:
    """One validated feature window (see the note above ``_int_list``); ``noised``: counts may be negative."""
    if type(fd) is dict and not noised:
        name, counts, s, ss = fd.get("name"), fd.get("counts"), fd.get("sum"), fd.get("sumsq")
        ints: tuple[Any, ...] = (fd.get("missing"), fd.get("nan"), fd.get("out_of_range"), fd.get("n"))
        if (type(name) is str and name and type(counts) is list and set(map(type, counts)) <= _INT
                and (not counts or min(counts) >= 0) and set(map(type, ints)) == _INT and min(ints) >= 0
                and (type(s) is float or type(s) is int) and (type(ss) is float or type(ss) is int)
                and _INF > s > -_INF and _INF > ss > -_INF):
            return FeatureWindow(name, counts, ints[0], ints[1], ints[2], ints[3], float(s), float(ss))
    fw = f"summary.features[{i}]"
    fd = f.obj(fd, fw)
    return FeatureWindow(
        f.string(fd, "name", fw), _int_list(fd.get("counts"), f"{fw}.counts", signed=noised),
        f.integer(fd, "missing", fw, minimum=0), f.integer(fd, "nan", fw, minimum=0),
        f.integer(fd, "out_of_range", fw, minimum=0), f.integer(fd, "n", fw, minimum=0),
        _num(fd.get("sum"), f"{fw}.sum"), _num(fd.get("sumsq"), f"{fw}.sumsq"),
    )


def _add(a: list[Any], b: list[Any], what: str) -> list[Any]:
    if len(a) != len(b):
        raise SchemaError(f"cannot merge summaries: {what} have different lengths ({len(a)} vs {len(b)})")
    return [x + y for x, y in zip(a, b, strict=True)]


def merge(a: Summary, b: Summary) -> Summary:
    """Counts add; the window spans both; the result keeps ``b``'s sequence number (the later one).

    Raises SchemaError when the summaries are from different devices or model versions or have other bins.
    """
    if (a.device_id, a.model, a.version) != (b.device_id, b.model, b.version):
        raise SchemaError("cannot merge summaries of different devices or model versions")
    if [x.name for x in a.features] != [x.name for x in b.features]:
        raise SchemaError("cannot merge summaries with different features")
    feats = [
        FeatureWindow(x.name, _add(x.counts, y.counts, f"{x.name} counts"), x.missing + y.missing, x.nan + y.nan,
                      x.out_of_range + y.out_of_range, x.n + y.n, x.sum + y.sum, x.sumsq + y.sumsq)
        for x, y in zip(a.features, b.features, strict=True)
    ]
    errors = dict(a.errors)
    for k, v in b.errors.items():
        errors[k] = errors.get(k, 0) + v
    confusion = None
    if a.confusion is not None or b.confusion is not None:
        n = len(a.class_counts)
        ca = a.confusion or [[0] * n for _ in range(n)]
        cb = b.confusion or [[0] * n for _ in range(n)]
        confusion = [_add(r1, r2, "confusion rows") for r1, r2 in zip(ca, cb, strict=True)]
    start = min(a.start, b.start, key=lambda t: parse(t, "start"))
    end = max(a.end, b.end, key=lambda t: parse(t, "end"))
    return Summary(
        device_id=a.device_id, model=a.model, version=a.version, seq=max(a.seq, b.seq), start=fmt(parse(start, "s")),
        end=fmt(parse(end, "e")), count=a.count + b.count, features=feats,
        class_counts=_add(a.class_counts, b.class_counts, "class counts"),
        confidence_counts=_add(a.confidence_counts, b.confidence_counts, "confidence counts"),
        calibrated_sum=_add(a.calibrated_sum, b.calibrated_sum, "calibrated sums"),
        latency_counts=_add(a.latency_counts, b.latency_counts, "latency counts"), errors=errors,
        confusion=confusion, windows=a.windows + b.windows, empty_bins=a.empty_bins + b.empty_bins,
        epsilon=a.epsilon if a.epsilon is not None else b.epsilon, epsilon_spent=a.epsilon_spent + b.epsilon_spent,
        noise_variance=a.noise_variance + b.noise_variance,
    )
