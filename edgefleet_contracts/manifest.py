"""The package manifest: what a package holds and claims, signed by a delegated package-signing key.

Every file in the archive other than ``manifest.json`` and ``keyset.json`` is listed here with its sha256
and length. The manifest also states the input/output schema the agent validates against, quantization,
evaluation headline metrics, lineage, owner and validity period.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from . import _fields as f
from .errors import SchemaError
from .timeutil import fmt, parse
from .versions import parse_version

MANIFEST_TYPE = "edgefleet.package"
MANIFEST_SPEC = 1
MANIFEST_NAME = "manifest.json"
KEYSET_NAME = "keyset.json"
RUNTIMES = ("onnxruntime", "litert")
KINDS = ("tabular", "image")
DTYPES = ("float32", "float64", "int8", "uint8", "int32", "int64")
_NAME = re.compile(r"\A[a-z0-9][a-z0-9_.-]{0,63}\Z")
_SHA256 = re.compile(r"\A[0-9a-f]{64}\Z")
_PATH = re.compile(r"\A[A-Za-z0-9_.-]+(/[A-Za-z0-9_.-]+)*\Z")


@dataclass(frozen=True)
class FeatureSpec:
    name: str
    min: float
    max: float


@dataclass(frozen=True)
class ImageSpec:
    """How the agent turns an encoded image into the model's input (OpenCV, in this order)."""

    width: int
    height: int
    color: str  # "gray" | "rgb" | "bgr"
    resize: str  # "area" | "linear" | "nearest"
    scale: float  # multiply pixel values (0..255) by this ...
    mean: float  # ... then subtract mean ...
    std: float  # ... then divide by std
    layout: str  # "flat" (N, H*W*C) | "nhwc" | "nchw"

    @property
    def channels(self) -> int:
        return 1 if self.color == "gray" else 3


@dataclass(frozen=True)
class InputSpec:
    name: str
    dtype: str
    shape: tuple[int, ...]  # -1 for the batch dimension
    features: tuple[FeatureSpec, ...]
    image: ImageSpec | None = None

    @property
    def feature_names(self) -> list[str]:
        return [x.name for x in self.features]


@dataclass(frozen=True)
class OutputSpec:
    probabilities: str  # name of the model output holding class probabilities
    classes: tuple[str, ...]


@dataclass(frozen=True)
class FileEntry:
    sha256: str
    length: int


@dataclass(frozen=True)
class Manifest:
    name: str
    version: str
    target: str
    runtime: str
    kind: str
    model_file: str
    input: InputSpec
    output: OutputSpec
    files: dict[str, FileEntry]
    created: datetime
    expires: datetime
    owner: str = ""
    quantization: dict[str, Any] = field(default_factory=dict)
    evaluation: dict[str, Any] = field(default_factory=dict)
    lineage: dict[str, Any] = field(default_factory=dict)

    # ---- (de)serialisation -------------------------------------------------------------------------------
    @classmethod
    def from_signed(cls, d: dict[str, Any]) -> Manifest:
        """Validate the ``signed`` part of a manifest envelope; raises SchemaError naming the bad field."""
        w = "manifest"
        d = f.obj(d, w)
        f.const(d, "type", MANIFEST_TYPE, w)
        f.const(d, "spec", MANIFEST_SPEC, w)
        name = f.string(d, "name", w)
        if not _NAME.match(name):
            raise SchemaError(f"manifest.name {name!r} must be lowercase letters, digits, '_', '.', '-'")
        version = f.string(d, "version", w)
        parse_version(version)
        runtime = f.string(d, "runtime", w)
        if runtime not in RUNTIMES:
            raise SchemaError(f"manifest.runtime {runtime!r} is not one of {', '.join(RUNTIMES)}")
        kind = f.string(d, "kind", w)
        if kind not in KINDS:
            raise SchemaError(f"manifest.kind {kind!r} is not one of {', '.join(KINDS)}")
        files: dict[str, FileEntry] = {}
        for path, entry in f.obj(d.get("files"), "manifest.files").items():
            if not _PATH.match(path) or ".." in path.split("/") or path in (MANIFEST_NAME, KEYSET_NAME):
                raise SchemaError(f"manifest.files has an unsafe or reserved path {path!r}")
            e = f.obj(entry, f"manifest.files[{path}]")
            sha = f.string(e, "sha256", f"manifest.files[{path}]")
            if not _SHA256.match(sha):
                raise SchemaError(f"manifest.files[{path}].sha256 is not 64 lowercase hex digits")
            files[path] = FileEntry(sha, f.integer(e, "length", f"manifest.files[{path}]", minimum=0))
        model_file = f.string(d, "model_file", w)
        if model_file not in files:
            raise SchemaError(f"manifest.model_file {model_file!r} is not listed in manifest.files")
        return cls(
            name=name,
            version=version,
            target=f.string(d, "target", w),
            runtime=runtime,
            kind=kind,
            model_file=model_file,
            input=_input_from(f.obj(d.get("input"), "manifest.input"), kind),
            output=_output_from(f.obj(d.get("output"), "manifest.output")),
            files=files,
            created=parse(d.get("created"), "manifest.created"),
            expires=parse(d.get("expires"), "manifest.expires"),
            owner=f.string(d, "owner", w, optional=True),
            quantization=f.obj(d.get("quantization", {}), "manifest.quantization"),
            evaluation=f.obj(d.get("evaluation", {}), "manifest.evaluation"),
            lineage=f.obj(d.get("lineage", {}), "manifest.lineage"),
        )

    def to_signed(self) -> dict[str, Any]:
        inp: dict[str, Any] = {
            "name": self.input.name,
            "dtype": self.input.dtype,
            "shape": list(self.input.shape),
            "features": [{"name": x.name, "min": x.min, "max": x.max} for x in self.input.features],
        }
        if self.input.image is not None:
            im = self.input.image
            inp["image"] = {
                "width": im.width, "height": im.height, "color": im.color, "resize": im.resize,
                "scale": im.scale, "mean": im.mean, "std": im.std, "layout": im.layout,
            }
        return {
            "type": MANIFEST_TYPE,
            "spec": MANIFEST_SPEC,
            "name": self.name,
            "version": self.version,
            "target": self.target,
            "runtime": self.runtime,
            "kind": self.kind,
            "model_file": self.model_file,
            "input": inp,
            "output": {"probabilities": self.output.probabilities, "classes": list(self.output.classes)},
            "files": {p: {"sha256": e.sha256, "length": e.length} for p, e in sorted(self.files.items())},
            "created": fmt(self.created),
            "expires": fmt(self.expires),
            "owner": self.owner,
            "quantization": self.quantization,
            "evaluation": self.evaluation,
            "lineage": self.lineage,
        }


def _input_from(d: dict[str, Any], kind: str) -> InputSpec:
    w = "manifest.input"
    dtype = f.string(d, "dtype", w)
    if dtype not in DTYPES:
        raise SchemaError(f"{w}.dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    shape = f.array(d, "shape", w)
    if not shape or not all(isinstance(s, int) and not isinstance(s, bool) and (s > 0 or s == -1) for s in shape):
        raise SchemaError(f"{w}.shape must be a non-empty list of positive integers or -1")
    feats = []
    for i, fe in enumerate(f.array(d, "features", w)):
        fd = f.obj(fe, f"{w}.features[{i}]")
        lo, hi = f.number(fd, "min", f"{w}.features[{i}]"), f.number(fd, "max", f"{w}.features[{i}]")
        if not lo <= hi:
            raise SchemaError(f"{w}.features[{i}] has min > max")
        feats.append(FeatureSpec(f.string(fd, "name", f"{w}.features[{i}]"), lo, hi))
    if len({x.name for x in feats}) != len(feats):
        raise SchemaError(f"{w}.features has duplicate names")
    image = None
    if kind == "image":
        im = f.obj(d.get("image"), f"{w}.image")
        color = f.string(im, "color", f"{w}.image")
        if color not in ("gray", "rgb", "bgr"):
            raise SchemaError(f"{w}.image.color {color!r} is not gray, rgb or bgr")
        resize = f.string(im, "resize", f"{w}.image")
        if resize not in ("area", "linear", "nearest"):
            raise SchemaError(f"{w}.image.resize {resize!r} is not area, linear or nearest")
        layout = f.string(im, "layout", f"{w}.image")
        if layout not in ("flat", "nhwc", "nchw"):
            raise SchemaError(f"{w}.image.layout {layout!r} is not flat, nhwc or nchw")
        std = f.number(im, "std", f"{w}.image")
        if std <= 0:
            raise SchemaError(f"{w}.image.std must be positive")
        image = ImageSpec(
            width=f.integer(im, "width", f"{w}.image", minimum=1),
            height=f.integer(im, "height", f"{w}.image", minimum=1),
            color=color, resize=resize, scale=f.number(im, "scale", f"{w}.image"),
            mean=f.number(im, "mean", f"{w}.image"), std=std, layout=layout,
        )
    elif not feats:
        raise SchemaError(f"{w}.features must name every input feature of a tabular model")
    return InputSpec(f.string(d, "name", w), dtype, tuple(shape), tuple(feats), image)


def _output_from(d: dict[str, Any]) -> OutputSpec:
    w = "manifest.output"
    classes = f.array(d, "classes", w)
    if len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise SchemaError(f"{w}.classes must list at least two class names")
    return OutputSpec(f.string(d, "probabilities", w), tuple(classes))
