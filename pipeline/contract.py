"""What a stage may read: its declared config keys and its declared input stages, nothing else.

A stage declares keys as ``section`` (every key of it) or ``section.key``. It gets a ``ConfigView``
that answers only those keys (anything else raises ContractError: a bug in the stage, found by the
first test that runs it), and its fingerprint is computed from exactly the values the view hands
over, so the fingerprint is complete by construction. Values that name files contribute the file's
content hash, not its spelling; a model factory contributes all of the user's code it imports.
"""
from __future__ import annotations

import ast
import dataclasses
import importlib.machinery
import importlib.util
import os
import site
import sys
import sysconfig
from pathlib import Path
from typing import Callable, Iterable

from edgerun.io import hash_json, sha256_file
from pipeline.config import Config
from pipeline.data import PROJECT_ROOT, resolve_root
from pipeline.errors import ContractError, PipelineError


def expand(cfg: Config, keys: Iterable[str]) -> tuple[str, ...]:
    """``section`` -> every ``section.key``; sorted, unique."""
    out = set()
    for key in keys:
        section, _, name = key.partition(".")
        values = dataclasses.asdict(getattr(cfg, section))
        if name:
            if name not in values:
                raise ContractError(f"declared config key {key!r} does not exist")
            out.add(key)
        else:
            out.update(f"{section}.{k}" for k in values)
    return tuple(sorted(out))


class SectionView:
    def __init__(self, stage: str, section: str, obj, allowed: set[str], seen: set[str]):
        self._stage, self._section, self._obj, self._allowed, self._seen = stage, section, obj, allowed, seen

    def __getattr__(self, name: str):
        if name.startswith("_"):
            raise AttributeError(name)
        key = f"{self._section}.{name}"
        if key not in self._allowed:
            raise ContractError(f"stage {self._stage} read config {key} without declaring it")
        self._seen.add(key)
        return getattr(self._obj, name)


class ConfigView:
    """``view.prune.ratio`` works only if the stage declared ``prune`` or ``prune.ratio``."""

    def __init__(self, stage: str, cfg: Config, allowed: Iterable[str]):
        self._stage, self._cfg = stage, cfg
        self._allowed = set(allowed)
        self.seen: set[str] = set()   # what the stage actually read (tests compare it with the declaration)

    def __getattr__(self, section: str):
        if section.startswith("_"):
            raise AttributeError(section)
        if not any(k.startswith(section + ".") for k in self._allowed):
            raise ContractError(f"stage {self._stage} read config section [{section}] without declaring it")
        return SectionView(self._stage, section, getattr(self._cfg, section), self._allowed, self.seen)


# Keys whose value names a file or folder: the fingerprint holds what is in it.
def _weights_hash(value: str) -> str:
    from pipeline.modelio import check_weights_file
    path = resolve_root(value)
    if not path.is_file():
        raise PipelineError(f"model.weights: {path} is not a file")
    check_weights_file(path)   # readable, and no bomb: refused here, before the first stage starts
    return _content(path, "model.weights")


def _content(path: Path, key: str) -> str:
    try:
        return sha256_file(path)
    except OSError as e:
        raise PipelineError(f"{key}: {path}: cannot read ({e.strerror or e})") from None


def _factory_hash(value: str) -> str:
    module = value.partition(":")[0]
    try:
        spec = importlib.util.find_spec(module)
    except Exception as e:  # importing parent packages can raise anything
        raise PipelineError(f"model.factory {value!r}: cannot locate module {module!r} "
                            f"({type(e).__name__}: {e})") from None
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        raise PipelineError(f"model.factory {value!r}: no module {module!r} found on the Python path")
    return hash_json({name: _content(path, "model.factory") for name, path in user_code(module, spec).items()})


# Which code is the user's model code. Two rules, united, because each alone misses something:
# - the static import closure: the factory's module and every module it imports by name (import x,
#   from . import y, from pkg.mod import f), followed transitively through the user's own files. It
#   does not depend on what this process happened to import before (a "modules newly loaded by the
#   import" rule does: in a notebook or a test session the modules are already loaded, and the
#   fingerprint would change with the order of imports);
# - every .py file of the factory's top-level package: code it reaches by importlib with a computed
#   name is not in the closure, but lives in its package in practice.
# Not the user's: the standard library, installed packages (their versions are in the fingerprint as
# library versions where they matter) and this project's own packages (stage versions cover them).
def _library_dirs() -> tuple[str, ...]:
    paths = sysconfig.get_paths()
    dirs = {paths[k] for k in ("stdlib", "platstdlib", "purelib", "platlib") if k in paths}
    dirs |= {*site.getsitepackages(), site.getusersitepackages()}
    dirs |= {str(PROJECT_ROOT / name) for name in ("pipeline", "edgerun", "export", "calib")}
    return tuple(os.path.realpath(d) + os.sep for d in dirs)


def _spec(name: str):
    """A module's spec without importing it (parents included): its origin file, its package path."""
    loaded = sys.modules.get(name)
    if loaded is not None and getattr(loaded, "__spec__", None) is not None:
        return loaded.__spec__
    parent, _, _ = name.rpartition(".")
    path = None
    if parent:
        found = _spec(parent)
        path = found.submodule_search_locations if found is not None else None
        if path is None:
            return None
    try:
        return importlib.machinery.PathFinder.find_spec(name, path)
    except (ImportError, ValueError, OSError):
        return None


def _imported_names(tree: ast.AST, package: str) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{base}.{node.module}" if node.module else base
            else:
                base = node.module or ""
            names.add(base)
            names.update(f"{base}.{a.name}" for a in node.names)   # from pkg import submodule
    # importing a.b.c runs a/__init__.py and a/b/__init__.py too
    return {".".join(n.split(".")[:i]) for n in names if n and not n.startswith(".")
            for i in range(1, n.count(".") + 2)}


def user_code(module: str, spec) -> dict[str, Path]:
    """{module name or package file: path} of the user's code the factory's module brings in."""
    library = _library_dirs()

    def outside(path) -> bool:
        return not (os.path.realpath(path) + os.sep).startswith(library)

    def users(origin) -> bool:
        return bool(origin) and origin.endswith(".py") and outside(origin)
    found: dict[str, Path] = {module: Path(spec.origin)}
    queue = [(module, spec)]
    while queue:
        name, sp = queue.pop()
        package = name if sp.submodule_search_locations is not None else name.rpartition(".")[0]
        try:
            tree = ast.parse(Path(sp.origin).read_bytes())
        except (SyntaxError, ValueError, OSError):
            continue   # its bytes are hashed all the same; the import reports the error itself
        for imported in sorted(_imported_names(tree, package)):
            sub = _spec(imported) if imported not in found else None
            if sub is not None and users(sub.origin):
                found[imported] = Path(sub.origin)
                queue.append((imported, sub))
    top = _spec(module.partition(".")[0])
    for location in (top.submodule_search_locations or ()) if top is not None else ():
        if outside(location):
            for path in sorted(Path(location).rglob("*.py")):
                found.setdefault(f"{top.name}/{path.relative_to(location)}", path)
    return found


def _folder_hash(value: str) -> str:
    """A Hugging Face folder (model.pretrained): every file's name and content. By its path alone, a folder
    whose weights were replaced in place (a new fine-tune saved over the old) would reuse the old model's stages."""
    path = resolve_root(value)
    if not path.is_dir():
        raise PipelineError(f"model.pretrained: {path} is not a folder (a Hugging Face model folder: config.json, "
                            f"weights, tokenizer.json)")
    files = sorted(p for p in path.rglob("*") if p.is_file())
    return hash_json({str(p.relative_to(path)): _content(p, "model.pretrained") for p in files})


def _file_hash(key: str, expected: str = "") -> Callable[[str], str]:
    """A file named by ``key``: its content (``expected``: what the message says the file should be)."""
    def content(value: str) -> str:
        path = resolve_root(value)
        if not path.is_file():
            raise PipelineError(f"{key}: {path} is not a file{expected}")
        return _content(path, key)
    return content


FILE_VALUED: dict[str, Callable[[str], str]] = {"model.weights": _weights_hash, "model.factory": _factory_hash,
                                                "model.pretrained": _folder_hash,
                                                "prune.from_record": _file_hash(
                                                    "prune.from_record",
                                                    " (a widths.json or a prune/finetune stage.json)"),
                                                "vlm.tower_factory": _factory_hash,
                                                "vlm.tower_weights": _file_hash("vlm.tower_weights"),
                                                "vlm.projector_weights": _file_hash("vlm.projector_weights")}


def fingerprint_values(cfg: Config, keys: Iterable[str], data_identity: Callable[[], str]) -> dict:
    """The declared values, with file-valued keys replaced by {value, sha256}; data.root by the data's content."""
    out = {}
    for key in keys:
        section, _, name = key.partition(".")
        value = getattr(getattr(cfg, section), name)
        if key == "data.root":
            value = {"value": value, "content": data_identity()}
        elif key in FILE_VALUED and value:
            value = {"value": value, "sha256": FILE_VALUED[key](value)}
        out[key] = value
    return out
