"""Everything a verb loads from a bundle is listed and verified first (edgerun.bundle reads the manifest).

``load_verified`` is how every verb opens a bundle: the manifest parsed strictly, no unlisted file in
the folder, and the bundle's own runtime (when it is the code running) as listed. ``verify_model``
hashes a model with every file loading it reads: an engine's sidecar, an ONNX file's external data.
build_engine.sh verifies its files with ``python3 -m edgerun.verify`` before it reads them.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path, PurePosixPath

from edgerun.bundle import MANIFEST, MODEL_KINDS, BundleError, Manifest, load_manifest, verify_file
from edgerun.errors import EdgeError, brief

RUNTIME_KIND = "runtime"       # edgerun/*: the code that runs (checked when it is the code running)
EXTERNAL_DATA_KIND = "onnx-data"
# What the runtime and the user write into a bundle on the target (benchmark.json, an --output file,
# build_engine.sh's engine, its sidecar and timing cache): tolerated unlisted at the top level, as no
# verb loads an unlisted file. Python's bytecode cache of the listed runtime is tolerated too.
OUTPUT_SUFFIXES = (".json", ".csv", ".txt", ".log", ".engine", ".timing-cache")
READ_BY_THE_RUNTIME = ("trtexec_args_trt", "engine_build.json", "engine.env", MANIFEST)


def load_verified(bundle: str | Path) -> Manifest:
    """``load_manifest`` (strict, nothing unlisted) plus the check of the runtime running from it."""
    manifest = load_manifest(bundle)
    check_listing(manifest)
    verify_running_runtime(manifest)
    return manifest


def check_listing(manifest: Manifest) -> None:
    """Refuse a bundle holding a file (or folder) that its manifest does not list.

    A packager writes exactly what it lists; anything else was added later (a planted module, a
    stray copy) and could be loaded in the place of a listed file. What the runtime and the user
    write on the target (OUTPUT_SUFFIXES at the top level) and Python's bytecode cache of the
    listed runtime are the exceptions: no verb loads an unlisted file.
    """
    bundle = manifest.bundle
    listed = set(manifest.files) | {MANIFEST}
    folders = {str(PurePosixPath(n).parent) for n in listed} - {"."}
    folders |= {str(p) for n in folders for p in PurePosixPath(n).parents if str(p) != "."}
    for top, dirs, names in os.walk(bundle):
        here = PurePosixPath(Path(top).relative_to(bundle).as_posix())
        for d in sorted(dirs):
            name = str(here / d) if str(here) != "." else d
            if name not in folders and not _bytecode_cache(name, manifest) or (Path(top) / d).is_symlink():
                _unlisted(bundle, name + "/")
        for f in sorted(names):
            name = str(here / f) if str(here) != "." else f
            if name not in listed and not _tolerated(name, manifest):
                _unlisted(bundle, name)


def _unlisted(bundle: Path, name: str) -> None:
    raise BundleError(f"{bundle}: {name} is in the bundle but not listed in {MANIFEST}: refused (the packager "
                      f"did not write it; remove it or copy the bundle again)")


def _bytecode_cache(folder: str, manifest: Manifest) -> bool:
    parent, _, last = folder.rpartition("/")
    return last == "__pycache__" and any(n.startswith(parent + "/") and manifest.files[n].kind == RUNTIME_KIND
                                         for n in manifest.files)


def _tolerated(name: str, manifest: Manifest) -> bool:
    folder, _, file = name.rpartition("/")
    if folder.endswith("__pycache__") and _bytecode_cache(folder, manifest):
        source = f"{folder.rpartition('/')[0]}/{file.split('.')[0]}.py".lstrip("/")
        return file.endswith(".pyc") and source in manifest.files
    if folder or file.startswith(READ_BY_THE_RUNTIME) or not file.endswith(OUTPUT_SUFFIXES):
        return False
    # an engine's sidecar is read with its engine: the one of a listed engine must be listed itself
    return not (file.endswith(".json") and file[:-len(".json")] in manifest.files)


def verify_model(manifest: Manifest, name: str) -> Path:
    """``verify_file`` for a model and for every file loading it reads (each listed, each hashed)."""
    bundle = manifest.bundle
    path = verify_file(bundle, manifest, name)
    if manifest.files[name].kind == "engine":
        sidecar = f"{name}.json"   # the TensorRT runner reads it beside the engine
        if (bundle / sidecar).exists() or sidecar in manifest.files:
            verify_file(bundle, manifest, sidecar)
        return path
    for data in external_data(path, manifest):
        verify_file(bundle, manifest, data)
    return path


def external_data(path: Path, manifest: Manifest) -> list[str]:
    """The bundle names of the external data files the ONNX file at ``path`` reads.

    Read from the model with the onnx package when it is here; without it (onnxruntime alone on a
    device) every listed external data file counts, so none is loaded unverified.
    """
    try:
        import onnx
    except ImportError:
        return sorted(n for n, f in manifest.files.items() if f.kind == EXTERNAL_DATA_KIND)
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf's errors have no common base: any of them means "not readable"
        raise BundleError(f"{path}: not a readable ONNX model ({brief(e)})") from None
    folder = PurePosixPath(path.parent.relative_to(manifest.bundle).as_posix())
    out = []
    for location in external_locations(model):
        name = str(folder / location).removeprefix("./")
        if name not in manifest.files:
            raise BundleError(f"{path}: its weights are in external data {location!r}, which {MANIFEST} does "
                              f"not list: refused")
        out.append(name)
    return out


def external_locations(model) -> list[str]:
    """The external data files (as the model names them, relative to its folder) an ONNX model reads."""
    return sorted({loc for t in _tensors(model.graph) for loc in _locations(t)})


def _locations(tensor) -> list[str]:
    if tensor.data_location != 1:   # TensorProto.EXTERNAL
        return []
    return [e.value for e in tensor.external_data if e.key == "location"]


def _tensors(graph):
    """Every tensor of a graph that may hold external data: initializers, attributes, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield from (sparse.values, sparse.indices)
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
            for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                yield from _tensors(sub)


def verify_running_runtime(manifest: Manifest) -> None:
    """When the code running is the bundle's own edgerun/, its files must be the listed ones.

    Python loaded them before any check could run, so this catches a damaged copy rather than an
    attacker; still, the runtime never vouches for a bundle whose runtime differs from its manifest.
    """
    if Path(__file__).resolve().parent != (manifest.bundle / "edgerun").resolve():
        return
    for name, entry in manifest.files.items():
        if entry.kind == RUNTIME_KIND:
            verify_file(manifest.bundle, manifest, name)


def main(argv=None) -> int:
    """``python3 -m edgerun.verify NAME...`` inside a bundle folder (build_engine.sh runs it): the
    manifest checked, each named file verified; ``--sha256 NAME`` prints its listed digest after."""
    args = sys.argv[1:] if argv is None else list(argv)
    show = args[:1] == ["--sha256"]
    names = args[1:] if show else args
    if not names or (show and len(names) != 1):
        print("usage: python3 -m edgerun.verify NAME... | --sha256 NAME", file=sys.stderr)
        return 1
    try:
        manifest = load_verified(Path.cwd())
        for name in names:
            kind = manifest.files[name].kind if name in manifest.files else ""
            verify_model(manifest, name) if kind in MODEL_KINDS else verify_file(manifest.bundle, manifest, name)
    except EdgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if show:
        print(manifest.files[names[0]].sha256)
    return 0


if __name__ == "__main__":
    sys.exit(main())
