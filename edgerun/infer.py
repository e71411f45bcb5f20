"""`python -m edgerun infer`: predictions from a deploy bundle, for people (text) and machines (json, csv).

Inputs: an IDX images file (.gz or not), a folder of images (flat, or one subfolder per class),
or one image file. Labels come from --labels (an IDX labels file), from the labels file beside an
IDX images file (...images-idx3... -> ...labels-idx1...), or from class subfolders named after the
bundle's labels; with labels, accuracy and a confusion summary are computed and shown.
The model is hashed against the manifest before it is loaded. TensorRT runs the engine when
TensorRT and an engine are there; otherwise onnxruntime runs the chosen ONNX with the best
provider present (TensorRT, CUDA, then CPU). Probabilities are the softmax of the model's logits.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgerun import pixels
from edgerun.bundle import BundleError, Manifest, open_bundle, verify_file
from edgerun.errors import EdgeError
from edgerun.io import atomic_write
from edgerun.readers import (
    IMAGE_SUFFIXES,
    check_labels,
    class_folders,
    image_files,
    load_flat_folder,
    load_image_folder,
    read_idx,
    read_image,
)
from edgerun.verify import load_verified, verify_model

FORMATS = ("text", "json", "csv")
TEXT_LIMIT = 10


class InferError(EdgeError):
    """A bad argument, input or model output for `infer`."""


@dataclass(frozen=True)
class Inputs:
    images: np.ndarray               # uint8 [N, C, H, W]
    names: tuple[str, ...]           # one per image: an index, or a file name
    labels: np.ndarray | None        # int64 [N] in the bundle's label order, when known
    labels_from: str                 # where the labels came from, or why there are none
    source: str                      # the --input path
    labels_file: Path | None = None  # the IDX labels file read, if any


@dataclass(frozen=True)
class Timing:
    total_ms: float
    first_batch_ms: float
    batches: int
    batch_size: int
    count: int
    what: str

    def to_json(self) -> dict:
        return {"total_ms": round(self.total_ms, 3), "first_batch_ms": round(self.first_batch_ms, 3),
                "per_input_ms": round(self.total_ms / self.count, 4), "batches": self.batches,
                "batch_size": self.batch_size, "what": self.what}


@dataclass(frozen=True)
class Outcome:
    inputs: Inputs
    probabilities: np.ndarray        # float64 [N, classes], softmax of the logits
    classes: tuple[str, ...]
    top_k: int
    model_file: str
    model_sha256: str
    backend: str
    timing: Timing

    @property
    def predicted(self) -> np.ndarray:
        return self.probabilities.argmax(1)

    @property
    def correct(self) -> int | None:
        labels = self.inputs.labels
        return None if labels is None else int((self.predicted == labels).sum())

    def confusion(self) -> np.ndarray:
        k = len(self.classes)
        return np.bincount(self.inputs.labels * k + self.predicted, minlength=k * k).reshape(k, k)

    def most_confused(self, n: int = 3) -> list[tuple[int, int, int]]:
        """(true, predicted, count) of the largest off-diagonal confusion cells."""
        m = self.confusion()
        np.fill_diagonal(m, 0)
        order = np.argsort(-m, axis=None, kind="stable")[:n]
        return [(int(i // m.shape[1]), int(i % m.shape[1]), int(m.flat[i])) for i in order if m.flat[i] > 0]


# ---------------------------------------------------------------- command line

def add_infer_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("infer", help="predict with a deploy bundle (TensorRT if present, else onnxruntime)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="a bundle folder, or a .tar / .tar.gz of one")
    p.add_argument("--input", required=True, help="an IDX images file (.gz or not), a folder of images, or one image")
    p.add_argument("--model", help="file in the bundle to run (default: the engine if TensorRT is here, "
                                   "else the chosen ONNX)")
    p.add_argument("--labels", help="an IDX labels file for --input (default: the labels file beside an IDX input)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--format", choices=FORMATS, default="text")
    p.add_argument("--top-k", type=int, default=None, help="classes per prediction (default: up to 3)")
    p.add_argument("--limit", type=int, default=None,
                   help=f"predictions to print with --format text (default {TEXT_LIMIT})")
    p.add_argument("--output", help="write the predictions here (atomically) instead of to stdout")
    return p


def run_infer(args) -> int:
    """Run `infer`; prints one `PASSED | ...` line last and returns 0, or raises an EdgeError."""
    if args.batch_size <= 0:
        raise InferError(f"--batch-size must be > 0, got {args.batch_size}")
    if args.limit is not None and (args.format != "text" or args.limit < 0):
        raise InferError(f"--limit applies to --format text only, as a count ≥ 0 (got --limit {args.limit} "
                         f"with --format {args.format})")
    import tempfile
    with tempfile.TemporaryDirectory(prefix="bundle-") as tmp:
        bundle = open_bundle(Path(args.bundle), Path(tmp))
        manifest = load_verified(bundle)
        outcome = infer(bundle, manifest, Path(args.input), model=args.model,
                        labels=Path(args.labels) if args.labels else None,
                        batch_size=args.batch_size, top_k=args.top_k)
    document = {"text": lambda: to_text(outcome, TEXT_LIMIT if args.limit is None else args.limit),
                "json": lambda: json.dumps(to_json(outcome), indent=2) + "\n",
                "csv": lambda: to_csv(outcome)}[args.format]()
    # json and csv on stdout stay parseable: the summary goes to stderr then.
    summary_to = sys.stdout if args.output or args.format == "text" else sys.stderr
    if args.output:
        atomic_write(args.output, document.encode("utf-8"))  # UTF-8 whatever the locale says
    else:
        sys.stdout.write(document)
    for line in summary(outcome, args.output):
        print(line, file=summary_to, flush=True)
    return 0


# ---------------------------------------------------------------- the work

def infer(bundle: Path, manifest: Manifest, input_path: Path, *, model: str | None = None,
          labels: Path | None = None, batch_size: int = 64, top_k: int | None = None) -> Outcome:
    """Read the inputs, verify and run the model, and return the probabilities with their context."""
    classes = manifest.labels
    if top_k is not None and not 1 <= top_k <= len(classes):
        raise InferError(f"--top-k must be between 1 and {len(classes)} (the bundle's classes), got {top_k}")
    inputs = load_inputs(input_path, manifest, labels)
    for data in (input_path, inputs.labels_file):
        _verify_if_listed(bundle, manifest, data)  # the bundle's own sample: hashed like its models
    name = pick_model(bundle, manifest, model)
    path = verify_model(manifest, name)
    risk = manifest.int8_risk(name)
    if risk:
        print(f"note: {risk}", file=sys.stderr)
    x = normalise(inputs.images, manifest)
    logits, backend, timing = run_model(path, manifest.files[name].kind, manifest.input.name, x, batch_size)
    if logits.ndim != 2 or logits.shape != (len(x), len(classes)):
        raise InferError(f"{name}: the model's output is {list(logits.shape)}, expected [{len(x)}, {len(classes)}] "
                         f"(one score per label in the manifest)")
    bad = ~np.isfinite(logits).all(axis=1)
    if bad.any():
        raise InferError(f"{name}: the model produced non-finite outputs for {int(bad.sum())} of {len(x)} inputs "
                         f"(first: {inputs.names[int(bad.argmax())]})")
    return Outcome(inputs, softmax(logits), classes, top_k or min(3, len(classes)), name,
                   manifest.files[name].sha256, backend, timing)


def load_inputs(path: Path, manifest: Manifest, labels_path: Path | None = None) -> Inputs:
    spec = manifest.input
    size, c = (spec.height, spec.width), spec.channels
    if not path.exists():
        raise InferError(f"{path}: input not found")
    labels, labels_from = None, "no labels"
    if path.is_dir():
        subfolders, files = class_folders(path), image_files(path)
        if subfolders and files:
            raise InferError(f"{path}: holds both image files and subfolders; point --input at a flat folder "
                             f"of images or at one holding only class subfolders")
        if subfolders and set(subfolders) <= set(manifest.labels):
            images, labels, _ = load_image_folder(path, size, c, classes=list(manifest.labels))
            names = _tree_names(path, manifest.labels)
            labels_from = "class folders"
        elif subfolders:
            images, _, _ = load_image_folder(path, size, c)
            names = _tree_names(path, sorted(subfolders))
            labels_from = (f"no labels: class folders {subfolders[:5]}{'…' if len(subfolders) > 5 else ''} "
                           f"are not the bundle's labels")
        else:
            images, names = load_flat_folder(path, size, c)
    elif path.suffix.lower() in IMAGE_SUFFIXES:
        images, names = read_image(path, size, c)[None], [path.name]
    else:
        images = read_idx(path)
        if images.ndim == 3:
            images = images[:, None]
        names = [str(i) for i in range(len(images))]
        if labels_path is None:
            labels_path = beside(path)
    if images.ndim != 4 or tuple(images.shape[1:]) != (c, *size) or images.dtype != np.uint8:
        raise InferError(f"{path}: images are {images.dtype} {tuple(images.shape[1:])}, "
                         f"the bundle expects uint8 {(c, *size)}")
    if len(images) == 0:
        raise InferError(f"{path}: no images (the file holds 0)")
    if labels_path is not None:
        if labels is not None:
            raise InferError(f"--labels {labels_path}: the input's class folders already give the labels")
        labels = check_labels(read_idx(labels_path), len(images), len(manifest.labels), str(labels_path))
        labels_from = str(labels_path)
    return Inputs(np.ascontiguousarray(images), tuple(names), labels, labels_from, str(path), labels_path)


def _verify_if_listed(bundle: Path, manifest: Manifest, path: Path | None) -> None:
    if path is None:
        return
    try:
        name = path.resolve().relative_to(bundle.resolve()).as_posix()
    except (ValueError, OSError, RuntimeError):
        return  # not a file of the bundle
    if name in manifest.files:
        verify_file(bundle, manifest, name)


def beside(images_path: Path) -> Path | None:
    """The labels file next to an IDX images file (t10k-images-idx3-ubyte.gz -> t10k-labels-idx1-ubyte[.gz])."""
    if "images-idx3" not in images_path.name:
        return None
    stem = images_path.name.replace("images-idx3", "labels-idx1").removesuffix(".gz")
    found = [p for p in (images_path.with_name(stem + ".gz"), images_path.with_name(stem)) if p.is_file()]
    return found[0] if found else None


def _tree_names(root: Path, classes) -> list[str]:
    """The 'class/file' names in the order load_image_folder reads them."""
    return [f"{name}/{f.name}" for name in classes if (root / name).is_dir() for f in image_files(root / name)]


def pick_model(bundle: Path, manifest: Manifest, requested: str | None) -> str:
    files = manifest.files
    if requested:
        if requested not in files:
            raise BundleError(f"{bundle}: no model {requested!r} in the bundle (has {', '.join(manifest.models())})")
        if files[requested].kind not in ("onnx", "engine"):
            raise BundleError(f"{bundle}: {requested} is a {files[requested].kind} file, not a model (onnx or engine)")
        return requested
    engines = [n for n in manifest.models() if files[n].kind == "engine"]
    if engines and _tensorrt_here():
        return manifest.chosen if manifest.chosen in engines else engines[0]
    onnx = [n for n in manifest.models() if files[n].kind == "onnx"]
    if manifest.chosen in onnx:
        return manifest.chosen
    if not onnx:
        raise BundleError(f"{bundle}: no ONNX model in the bundle, and no TensorRT here to run "
                          f"{', '.join(engines) or 'an engine'}")
    return "model.onnx" if "model.onnx" in onnx else onnx[0]


def _tensorrt_here() -> bool:
    try:
        from edgerun.trt import trt_version_info
    except ImportError:
        return False
    return trt_version_info() is not None


def normalise(images: np.ndarray, manifest: Manifest) -> np.ndarray:
    """uint8 NCHW -> the model's input: edgerun.pixels.normalise with the manifest's scale, mean and
    std (the arithmetic training used, to the bit), in the input's dtype."""
    norm = manifest.input.normalisation
    return pixels.normalise(images, norm.mean, norm.std, norm.scale).astype(manifest.input.dtype)


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = np.exp(z - z.max(axis=1, keepdims=True))  # shifted: no overflow for large logits
    return z / z.sum(axis=1, keepdims=True)


def open_runner(path: Path, kind: str):
    """(runner, backend description) for a verified model file."""
    if kind == "engine":
        from edgerun.trt import TrtEngineRunner
        return TrtEngineRunner(path), "tensorrt"
    from edgerun.ort import OrtRunner, available_ort_providers
    have = available_ort_providers()
    providers = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in have]
    runner = OrtRunner(path, providers=(*providers, "CPUExecutionProvider"))
    return runner, f"onnxruntime ({runner.providers[0]})"


def run_model(path: Path, kind: str, input_name: str, x: np.ndarray, batch_size: int):
    """(logits [N, classes], backend, Timing): the wall time of each runner call, in batches."""
    runner, backend = open_runner(path, kind)
    chunks, times = [], []
    with runner:
        if runner.input_names != [input_name]:
            raise InferError(f"{path.name}: the model's inputs are {runner.input_names}, the manifest says "
                             f"[{input_name!r}]")
        outputs = runner.output_names
        if "logits" not in outputs and len(outputs) != 1:
            raise InferError(f"{path.name}: the model has outputs {outputs} and none is named 'logits'")
        output = "logits" if "logits" in outputs else outputs[0]
        for i in range(0, len(x), batch_size):
            t = time.perf_counter()
            out = runner.infer({input_name: x[i:i + batch_size]})
            times.append((time.perf_counter() - t) * 1000)
            chunks.append(np.asarray(out[output]))
    what = (f"wall time of the {backend} inference calls on this machine, first call included"
            + ("; host↔device copies included" if kind == "engine" else "")
            + "; reading and normalising the inputs not included")
    timing = Timing(sum(times), times[0], len(times), batch_size, len(x), what)
    return np.concatenate(chunks), backend, timing


# ---------------------------------------------------------------- output

def _top(outcome: Outcome, row: int) -> list[dict]:
    p = outcome.probabilities[row]
    order = np.argsort(-p, kind="stable")[:outcome.top_k]
    return [{"label": outcome.classes[j], "class_index": int(j), "probability": round(float(p[j]), 6)} for j in order]


def to_json(outcome: Outcome) -> dict:
    labels = outcome.inputs.labels
    predictions = []
    for i, name in enumerate(outcome.inputs.names):
        top = _top(outcome, i)
        item = {"input": name, **top[0], "top_k": top}
        if labels is not None:
            item.update(true_label=outcome.classes[labels[i]], true_class_index=int(labels[i]))
        predictions.append(item)
    accuracy = confusion = None
    if labels is not None:
        accuracy = {"top1_pct": round(100.0 * outcome.correct / len(labels), 4), "correct": outcome.correct,
                    "count": len(labels), "labels_from": outcome.inputs.labels_from}
        confusion = {"rows": "true label", "columns": "predicted label", "labels": list(outcome.classes),
                     "matrix": outcome.confusion().tolist(),
                     "most_confused": [{"true": outcome.classes[t], "predicted": outcome.classes[p], "count": n}
                                       for t, p, n in outcome.most_confused()]}
    return {"input_path": outcome.inputs.source, "model_file": outcome.model_file,
            "model_sha256": outcome.model_sha256, "backend": outcome.backend, "count": len(predictions),
            "probabilities": "softmax of the model's logits",
            "accuracy": accuracy, "accuracy_note": None if labels is not None else outcome.inputs.labels_from,
            "confusion": confusion, "timing": outcome.timing.to_json(), "predictions": predictions}


def to_csv(outcome: Outcome) -> str:
    labels = outcome.inputs.labels
    head = ["input", "label", "class_index", "probability"]
    for j in range(2, outcome.top_k + 1):
        head += [f"top{j}_label", f"top{j}_class_index", f"top{j}_probability"]
    if labels is not None:
        head += ["true_label", "true_class_index"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(head)
    for i, name in enumerate(outcome.inputs.names):
        row = [name]
        for t in _top(outcome, i):
            row += [t["label"], t["class_index"], t["probability"]]
        if labels is not None:
            row += [outcome.classes[labels[i]], int(labels[i])]
        writer.writerow(row)
    return buf.getvalue()


def to_text(outcome: Outcome, limit: int) -> str:
    labels, lines = outcome.inputs.labels, []
    for i, name in enumerate(outcome.inputs.names[:limit]):
        top = _top(outcome, i)
        line = f"{name}\t{top[0]['label']}\t{top[0]['probability']:.4f}"
        if len(top) > 1:
            line += "\t(then " + ", ".join(f"{t['label']} {t['probability']:.4f}" for t in top[1:]) + ")"
        if labels is not None and labels[i] != top[0]["class_index"]:
            line += f"\tWRONG: labelled {outcome.classes[labels[i]]}"
        lines.append(line)
    if len(outcome.inputs.names) > limit:
        lines.append(f"… {len(outcome.inputs.names) - limit} more (--limit, or --format json/csv for all)")
    return "".join(line + "\n" for line in lines)


def summary(outcome: Outcome, output: str | None) -> list[str]:
    t, n = outcome.timing, len(outcome.inputs.names)
    copies = ", host↔device copies included" if outcome.backend == "tensorrt" else ""
    lines = [f"{n} inputs with {outcome.model_file} (sha256 verified) on {outcome.backend}: {t.total_ms:.1f} ms "
             f"in {t.batches} batch{'es' if t.batches != 1 else ''} of ≤{t.batch_size}, "
             f"{t.total_ms / n:.3f} ms/input "
             f"(inference calls only, first one included{copies})"]
    if outcome.inputs.labels is None:
        verdict = f"PASSED | {n} predictions ({outcome.inputs.labels_from}: accuracy not checked)"
    else:
        names = outcome.classes
        confused = ", ".join(f"{names[a]}→{names[b]} ×{c}" for a, b, c in outcome.most_confused())
        lines.append(f"confusion: most confused (true→predicted) {confused or 'none'}")
        verdict = (f"PASSED | {n} predictions, accuracy {100.0 * outcome.correct / n:.2f} % ({outcome.correct}/{n}) "
                   f"against {outcome.inputs.labels_from}")
    if output:
        lines.append(f"predictions written to {output}")
    return [*lines, verdict]
