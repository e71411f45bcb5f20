"""What a stage may read: its declared config keys and its declared input stages, nothing else.

A stage declares keys as ``section`` (every key of it) or ``section.key``. It gets a ``ConfigView``
that answers only those keys (anything else raises ContractError: a bug in the stage, found by the
first test that runs it), and its fingerprint is computed from exactly the values the view hands
over, so the fingerprint is complete by construction. Values that name files contribute the file's
content hash, not its spelling.
"""
from __future__ import annotations

import dataclasses
import importlib.util
from pathlib import Path
from typing import Callable, Iterable

from edgerun.io import sha256_file
from pipeline.config import Config
from pipeline.data import resolve_root
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
    path = resolve_root(value)
    if not path.is_file():
        raise PipelineError(f"model.weights: {path} is not a file")
    return sha256_file(path)


def _factory_hash(value: str) -> str:
    module = value.partition(":")[0]
    try:
        spec = importlib.util.find_spec(module)
    except Exception as e:  # importing parent packages can raise anything
        raise PipelineError(f"model.factory {value!r}: cannot locate module {module!r} "
                            f"({type(e).__name__}: {e})") from None
    if spec is None or not spec.origin or not Path(spec.origin).is_file():
        raise PipelineError(f"model.factory {value!r}: no module {module!r} found on the Python path")
    return sha256_file(spec.origin)


def _record_hash(value: str) -> str:
    path = resolve_root(value)
    if not path.is_file():
        raise PipelineError(f"prune.from_record: {path} is not a file (a widths.json or a prune/finetune stage.json)")
    return sha256_file(path)


FILE_VALUED: dict[str, Callable[[str], str]] = {"model.weights": _weights_hash, "model.factory": _factory_hash,
                                                "prune.from_record": _record_hash}


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
