"""Deploy bundles as untrusted input: unpack safely, validate the manifest, hash files before use.

A bundle is a folder (or a .tar / .tar.gz of one) holding ``manifest.json`` and the files it
lists. Anyone may hand one over, so nothing in it is believed: every manifest field is checked for
type and range (a duplicate key, an unknown field or a wrong type is refused, not ignored), every
listed file name must stay inside the bundle (no absolute paths, no '..', no symlink pointing out),
and a file is hashed against the manifest before it is loaded. edgerun.verify adds what a verb
needs besides: no unlisted file in the folder, a model verified with its external data or sidecar.
Every refusal is one ``BundleError`` line naming the manifest field or file.
"""
from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Mapping

from edgerun.errors import EdgeError
from edgerun.io import sha256_file

MANIFEST = "manifest.json"
FORMAT = 4                     # 3: every file of the bundle is listed, the runtime and scripts included;
#                                4: the task's figure is named (``metric``), a file's ``score`` is in it
MAX_MANIFEST_BYTES = 16 << 20  # a real manifest is a few kB
MODEL_KINDS = ("onnx", "engine")
MAX_INPUT_VALUES = 1 << 27  # C x H x W of one image: 3 x 6688 x 6688, far above any edge model
# Every field the packager writes, with its JSON type: anything else is refused, not ignored.
TOP_LEVEL = {"format": int, "model": dict, "input": dict, "labels": list, "target": str, "files": dict,
             "chosen": dict, "sample": dict, "preflight": dict, "engine_recipe": dict, "lineage": dict,
             "libraries": dict, "verified": dict, "int8_form": dict, "metric": dict}
FILE_FIELDS = ("kind", "sha256", "precision", "label", "stage", "score", "role")
# The task's figure, as the packager's task describes it (pipeline.records.Metric): text fields, a direction
METRIC_TEXT = ("kind", "name", "label", "unit", "drop_unit")
SAMPLE_FIELDS = ("images", "labels", "count", "n", "note")


class BundleError(EdgeError):
    """A bundle that is missing, malformed, tampered with or unsafe to open."""


@dataclass(frozen=True)
class Normalisation:
    """x = (pixel * scale - mean[c]) / std[c], per channel c."""
    scale: float
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class InputSpec:
    name: str
    batch: str | int              # a symbolic name ("batch") or a fixed batch size
    channels: int
    height: int
    width: int
    dtype: str                    # float32 | float16
    layout: str                   # NCHW
    normalisation: Normalisation


@dataclass(frozen=True)
class FileEntry:
    name: str                     # relative to the bundle, '/'-separated
    kind: str                     # onnx | engine | calibration | sample | ...
    sha256: str
    precision: str = ""
    label: str = ""
    stage: str = ""
    score: float | None = None    # the file's figure in the manifest's metric (a classifier's top-1)
    role: str = ""                # the pipeline's artifact role (onnx-fp32, onnx-int8, ...)


@dataclass(frozen=True)
class TaskMetric:
    """What the files' scores measure: the task that packaged the model (``kind``, "classify") and its
    metric (its key ``name``, its ``label`` "top-1", ``unit``, which way is better)."""
    kind: str
    name: str
    label: str = ""
    unit: str = ""
    higher_is_better: bool = True

    def text(self, value: float) -> str:
        return f"{self.label or self.name} {value:.2f}{self.unit}"


@dataclass(frozen=True)
class Sample:
    """A small labelled test set shipped in the bundle (IDX files listed with kind "sample")."""
    images: str
    labels: str
    count: int | None = None


@dataclass(frozen=True)
class Manifest:
    bundle: Path
    input: InputSpec
    labels: tuple[str, ...]
    files: Mapping[str, FileEntry]
    chosen: str | None            # the file the packager chose, if any
    chosen_why: str
    target: str
    sample: Sample | None
    preflight: Mapping | None     # the packager's pre-flight summary, kept as read
    int8_form: Mapping = field(default_factory=lambda: MappingProxyType({}))   # role -> {"weights", "reason", ...}
    metric: TaskMetric | None = None   # the task's figure the files' scores are in

    def int8_risk(self, name: str) -> str | None:
        """A line for the user when ``name`` holds full-range int8 weights for onnxruntime and this CPU's
        int8 kernels sum u8*s8 pairs in int16 (they can saturate: answers differ from the build machine's)."""
        from edgerun.machine import int16_int8_dot
        entry = self.files.get(name)
        # the TensorRT form (onnx-int8-trt) runs on a GPU, not on these kernels
        form = self.int8_form.get("onnx-int8") if entry is not None and entry.role == "onnx-int8" else None
        if not isinstance(form, dict) or form.get("weights") != "full_range" or not int16_int8_dot():
            return None
        return (f"{name}: its int8 weights use the full range ({form.get('reason')}), and this CPU has no VNNI/AMX: "
                "onnxruntime's int8 kernels can saturate here; prefer model.onnx or re-package on this CPU")

    def models(self) -> list[str]:
        return sorted(n for n, f in self.files.items() if f.kind in MODEL_KINDS)


# ---------------------------------------------------------------- opening

def open_bundle(path: str | Path, tmp: str | Path) -> Path:
    """A bundle folder, or a .tar(.gz) of one unpacked into ``tmp``: no member may land outside it."""
    path, tmp = Path(path), Path(tmp)
    if path.is_dir():
        return path
    if not path.is_file():
        raise BundleError(f"{path}: bundle not found")
    import tarfile
    try:
        with tarfile.open(path) as tar:
            # The "data" filter refuses absolute paths, '..', links out of the folder and devices.
            tar.extractall(tmp, filter="data")
    except (tarfile.TarError, OSError, EOFError, zlib.error) as e:
        detail = "; ".join(str(e).splitlines()) or type(e).__name__
        raise BundleError(f"{path}: refused or unreadable bundle archive ({detail})") from None
    found = [p.parent for p in tmp.rglob(MANIFEST)]
    if len(found) != 1:
        raise BundleError(f"{path}: the archive must hold exactly one bundle ({MANIFEST}), found {len(found)}")
    return found[0]


def inside(bundle: Path, name, field: str) -> Path:
    """``bundle / name`` if ``name`` is a plain relative path that stays inside the bundle."""
    if not isinstance(name, str) or not name or "\x00" in name or "\\" in name:
        raise BundleError(f"{bundle}/{MANIFEST}: {field} must be a relative file name, got {name!r}")
    parts = PurePosixPath(name).parts
    if PurePosixPath(name).is_absolute() or ".." in parts or not parts:
        raise BundleError(f"{bundle}/{MANIFEST}: {field} = {name!r} points outside the bundle "
                          f"(absolute or '..'): refused")
    path = bundle / name
    try:
        target, root = path.resolve(), bundle.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop
        raise BundleError(f"{bundle}/{MANIFEST}: {field} = {name!r} cannot be resolved ({e}): refused") from None
    if not target.is_relative_to(root):
        raise BundleError(f"{bundle}/{MANIFEST}: {field} = {name!r} resolves outside the bundle "
                          f"(a symlink to {target}): refused")
    return path


# ---------------------------------------------------------------- the manifest

def read_document(bundle: Path) -> tuple[dict, _Checker]:
    """``manifest.json`` as a JSON object (size-capped, a duplicate key refused) and the checker of its fields:
    the first step of every bundle's manifest, a classifier's (load_manifest) or a decoder's (edgerun.genai)."""
    path = bundle / MANIFEST
    if not path.is_file():
        raise BundleError(f"{bundle}: not a deploy bundle (no {MANIFEST})")
    inside(bundle, MANIFEST, MANIFEST)
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise BundleError(f"{path}: {path.stat().st_size} bytes, more than a manifest can be "
                          f"({MAX_MANIFEST_BYTES}): refused")
    try:
        doc = json.loads(path.read_bytes(), object_pairs_hook=_no_duplicate_keys)
    except (ValueError, RecursionError, OSError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise BundleError(f"{path}: unreadable manifest ({detail})") from None
    check = _Checker(path)
    check.kind(doc, dict, "the manifest")
    return doc, check


def load_manifest(bundle: str | Path) -> Manifest:
    """Read and validate ``manifest.json``: types, ranges, file names and cross-references."""
    bundle = Path(bundle)
    doc, check = read_document(bundle)
    spec = _input_spec(check, check.field(doc, "input", dict))
    labels = tuple(check.field(doc, "labels", list))
    if not labels or not all(isinstance(x, str) and x for x in labels):
        check.fail("labels", "a non-empty list of non-empty strings", doc["labels"])
    if len(set(labels)) != len(labels):
        check.fail("labels", "distinct names", doc["labels"])
    files = listed_files(check, bundle, check.field(doc, "files", dict))
    chosen, why = _chosen(check, doc.get("chosen"), files)
    target = doc.get("target", "")
    if not isinstance(target, str):
        check.fail("target", "a string", target)
    int8 = doc.get("int8_form", {})
    manifest = Manifest(bundle, spec, labels, MappingProxyType(files), chosen, why, target,
                        _sample(check, doc.get("sample"), files), _preflight(check, doc.get("preflight")),
                        MappingProxyType(int8 if isinstance(int8, dict) else {}), _metric(check, doc.get("metric")))
    check.only(doc, TOP_LEVEL, "the manifest")
    for key in ("format", "model", "engine_recipe", "lineage", "libraries", "verified", "int8_form"):
        if key in doc:
            check.kind(doc[key], TOP_LEVEL[key], key)
    if doc.get("format", FORMAT) != FORMAT:
        check.fail("format", f"{FORMAT} (this runtime's; the bundle was made by another packager: package it "
                             f"again)", doc["format"])
    return manifest


def _no_duplicate_keys(pairs: list) -> dict:
    """json's object hook: a key given twice is refused (json.loads would keep the last one silently)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


class _Checker:
    """Type checks that fail with one line naming the manifest field."""

    def __init__(self, path: Path):
        self.path = path

    def fail(self, field: str, expected: str, found) -> None:
        shown = repr(found)
        shown = shown if len(shown) <= 80 else shown[:79] + "…"
        raise BundleError(f"{self.path}: unreadable manifest ({field} must be {expected}, got {shown})")

    def kind(self, value, kind, field: str, expected: str = ""):
        if not isinstance(value, kind) or isinstance(value, bool):
            self.fail(field, expected or f"a JSON {_JSON_NAMES[kind]}", value)
        return value

    def only(self, obj: dict, known, where: str) -> None:
        unknown = sorted(set(obj) - set(known))
        if unknown:
            raise BundleError(f"{self.path}: unreadable manifest (unknown field {unknown[0]!r} in {where}; "
                              f"known: {', '.join(known)})")

    def field(self, obj: dict, key: str, kind, where: str = ""):
        name = f"{where}.{key}" if where else key
        if key not in obj:
            raise BundleError(f"{self.path}: unreadable manifest (no field {name!r})")
        return self.kind(obj[key], kind, name)

    def number(self, value, field: str, positive: bool = False) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or (positive and value <= 0):
            self.fail(field, "a finite number" + (" > 0" if positive else ""), value)
        return float(value)


_JSON_NAMES = {dict: "object", list: "list", str: "string", int: "integer"}


def _input_spec(check: _Checker, obj: dict) -> InputSpec:
    check.only(obj, ("name", "shape", "dtype", "layout", "normalisation"), "input")
    name = check.field(obj, "name", str, "input")
    shape = check.field(obj, "shape", list, "input")
    dims = shape[1:]
    if len(shape) != 4 or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in dims) \
            or not (isinstance(shape[0], str) or (isinstance(shape[0], int) and not isinstance(shape[0], bool)
                                                   and shape[0] > 0)):
        check.fail("input.shape", "[batch, C, H, W] with positive integers C, H, W", shape)
    if math.prod(dims) > MAX_INPUT_VALUES:  # the readers would allocate this per image
        check.fail("input.shape", f"at most {MAX_INPUT_VALUES} values per image (C x H x W)", shape)
    dtype = check.field(obj, "dtype", str, "input")
    if dtype not in ("float32", "float16"):
        check.fail("input.dtype", "'float32' or 'float16'", dtype)
    layout = check.field(obj, "layout", str, "input")
    if layout != "NCHW":
        check.fail("input.layout", "'NCHW' (the only layout the readers produce)", layout)
    norm = check.field(obj, "normalisation", dict, "input")
    check.only(norm, ("scale", "mean", "std"), "input.normalisation")
    c = dims[0]
    scale = check.number(norm.get("scale"), "input.normalisation.scale", positive=True)
    stats = {}
    for key in ("mean", "std"):
        values = check.field(norm, key, list, "input.normalisation")
        if len(values) != c:
            check.fail(f"input.normalisation.{key}", f"{c} numbers (one per channel)", values)
        stats[key] = tuple(check.number(v, f"input.normalisation.{key}", positive=key == "std") for v in values)
    return InputSpec(name, shape[0], c, dims[1], dims[2], dtype, layout,
                     Normalisation(scale, stats["mean"], stats["std"]))


def listed_files(check: _Checker, bundle: Path, obj: dict) -> dict[str, FileEntry]:
    """The manifest's ``files``: each name inside the bundle, each entry's fields typed."""
    if not obj:
        check.fail("files", "a non-empty object {name: {kind, sha256, ...}}", obj)
    files = {}
    for name, entry in obj.items():
        where = f"files[{name!r}]"
        inside(bundle, name, "files key")
        check.kind(entry, dict, where)
        check.only(entry, FILE_FIELDS, where)
        digest = check.field(entry, "sha256", str, where)
        if len(digest) != 64 or any(ch not in "0123456789abcdef" for ch in digest):
            check.fail(f"{where}.sha256", "64 lowercase hex digits", digest)
        text = {}
        for key in ("kind", "precision", "label", "stage", "role"):
            value = entry.get(key, "")
            if not isinstance(value, str) or (key == "kind" and not value):
                check.fail(f"{where}.{key}", "a non-empty string" if key == "kind" else "a string", value)
            text[key] = value
        score = entry.get("score")
        if score is not None:
            score = check.number(score, f"{where}.score")
        files[name] = FileEntry(name, text["kind"], digest, text["precision"], text["label"], text["stage"], score,
                                text["role"])
    return files


def _metric(check: _Checker, obj) -> TaskMetric | None:
    if obj is None:
        return None
    check.kind(obj, dict, "metric")
    text = {}
    for key in METRIC_TEXT:
        value = obj.get(key, "")
        if not isinstance(value, str) or (key in ("kind", "name") and not value):
            check.fail(f"metric.{key}", "a non-empty string" if key in ("kind", "name") else "a string", value)
        text[key] = value
    better = obj.get("higher_is_better", True)
    if not isinstance(better, bool):
        check.fail("metric.higher_is_better", "true or false", better)
    return TaskMetric(text["kind"], text["name"], text["label"], text["unit"], better)


def _chosen(check: _Checker, obj, files: dict) -> tuple[str | None, str]:
    if obj is None:
        return None, ""
    check.kind(obj, dict, "chosen")
    name, why = obj.get("file"), obj.get("why", "")
    if name is not None:
        check.kind(name, str, "chosen.file", "a file name or null")
        if name not in files or files[name].kind not in MODEL_KINDS:
            check.fail("chosen.file", f"a model listed in files ({', '.join(sorted(files))})", name)
    if not isinstance(why, str):
        check.fail("chosen.why", "a string", why)
    return name, why


def _sample(check: _Checker, obj, files: dict) -> Sample | None:
    if obj is None:
        return None
    check.kind(obj, dict, "sample")
    check.only(obj, SAMPLE_FIELDS, "sample")
    names = {}
    for key in ("images", "labels"):
        name = check.field(obj, key, str, "sample")
        if name not in files or files[name].kind != "sample":
            check.fail(f"sample.{key}", 'a file listed in files with kind "sample"', name)
        names[key] = name
    for key in ("count", "n"):
        value = obj.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value <= 0):
            check.fail(f"sample.{key}", "a positive integer", value)
    if "count" in obj and "n" in obj and obj["count"] != obj["n"]:
        check.fail("sample.n", f"the same as sample.count ({obj['count']})", obj["n"])
    if not isinstance(obj.get("note", ""), str):
        check.fail("sample.note", "a string", obj["note"])
    return Sample(names["images"], names["labels"], obj.get("count", obj.get("n")))


def _preflight(check: _Checker, obj) -> Mapping | None:
    if obj is None:
        return None
    return MappingProxyType(dict(check.kind(obj, dict, "preflight")))


# ---------------------------------------------------------------- files

def verify_file(bundle: str | Path, manifest: Manifest, name: str) -> Path:
    """The path of a listed file, after checking it stays inside and its sha256 matches the manifest."""
    bundle = Path(bundle)
    entry = manifest.files.get(name)
    if entry is None:
        raise BundleError(f"{bundle}: no file {name!r} in the bundle (has {', '.join(sorted(manifest.files))})")
    path = inside(bundle, name, f"files[{name!r}]")
    if not path.is_file():
        raise BundleError(f"{path}: listed in {MANIFEST} but missing from the bundle")
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise BundleError(f"{path}: sha256 {digest[:16]}… does not match {MANIFEST} ({entry.sha256[:16]}…): "
                          f"corrupted or replaced; copy the bundle again")
    return path
