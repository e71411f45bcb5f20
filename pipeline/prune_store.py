"""Pruned models on disk without pickle: ``pruning_history.json`` + the weights.

The history is torch-pruning's own (replayable on a fresh, unpruned instance of the same model) plus
what replay alone cannot recover: the head attributes of qkv / q-k-v attention modules and the
pruning dims of bare parameters. Weights are ``model.safetensors`` when safetensors is installed,
else ``state_dict.pt`` loaded with ``weights_only=True``. Every file goes through edgerun.io.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
import torch.nn as nn
import torch_pruning as tp

from edgerun.errors import brief
from edgerun.io import atomic_write
from pipeline import prune_attention as attn
from pipeline import prune_scope as scope
from pipeline.errors import PipelineError

HISTORY_FILE = "pruning_history.json"
SAFETENSORS_FILE = "model.safetensors"
STATE_DICT_FILE = "state_dict.pt"
HISTORY_FORMAT = 1


def json_history(history) -> list:
    return [[str(name), bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in history]


def layer_channels(model: nn.Module) -> dict[str, int]:
    """Output channels/features of every conv and linear layer, by module name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = int(m.out_channels)
        elif isinstance(m, nn.Linear):
            out[name] = int(m.out_features)
    return out


def save_pruned(model: nn.Module, history, folder, *, unwrapped: dict[str, int | None] | None = None) -> Path:
    """Write ``pruning_history.json`` and the weights into ``folder`` (created); returns the folder.
    ``unwrapped``: the ``unwrapped_parameters`` dims given to prune_model, if any (replay needs them)."""
    folder = Path(folder)
    meta = {"format": HISTORY_FORMAT, "history": json_history(history),
            "heads": attn.head_table(attn.find_attention(model)), "channels": layer_channels(model)}
    overrides = {k: int(v) for k, v in (unwrapped or {}).items() if v is not None}
    if overrides:
        meta["unwrapped"] = overrides
    atomic_write(folder / HISTORY_FILE, json.dumps(meta))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        (folder / SAFETENSORS_FILE).unlink(missing_ok=True)
        atomic_write(folder / STATE_DICT_FILE, lambda tmp: torch.save(state, tmp))
    else:
        (folder / STATE_DICT_FILE).unlink(missing_ok=True)
        atomic_write(folder / SAFETENSORS_FILE, lambda tmp: save_file(state, tmp))
    return folder


def _read_meta(hist_path: Path) -> dict:
    if not hist_path.is_file():
        raise PipelineError(f"prune: {hist_path} not found (expected a folder written by save_pruned)")
    try:
        meta = json.loads(hist_path.read_text())
        if not isinstance(meta, dict):
            meta = {"history": meta}
        if not isinstance(meta["history"], list):
            raise TypeError("history is not a list")
        for key in ("heads", "unwrapped"):
            if not isinstance(meta.get(key, {}), dict):
                raise TypeError(f"{key} is not an object")
    except (ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"prune: {hist_path} is not a pruning history ({e})") from None
    return meta


def load_pruned(fresh_model: nn.Module, example_input, folder) -> nn.Module:
    """Replay the saved history on ``fresh_model`` (an unpruned instance), then load the weights."""
    folder = Path(folder)
    hist_path = folder / HISTORY_FILE
    meta = _read_meta(hist_path)
    history = meta["history"]
    modules = dict(fresh_model.named_modules())
    try:
        dims = scope.unwrapped_dims(fresh_model, meta.get("unwrapped"))
    except PipelineError as e:
        raise PipelineError(f"prune: {hist_path} does not fit this model ({e})") from None
    try:
        for entry in history:
            if not (isinstance(entry, list) and len(entry) == 3 and isinstance(entry[0], str)):
                raise PipelineError(f"prune: {hist_path} is not a pruning history (entry {entry!r:.60})")
            if entry[0] not in modules:
                raise PipelineError(f"prune: {hist_path} names layer {entry[0]!r}, which this model does not have")
        with torch.enable_grad(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            dg = tp.DependencyGraph().build_dependency(
                fresh_model, example_inputs=example_input, verbose=False,
                customized_pruners=attn.customized_pruners(),
                unwrapped_parameters=scope.unwrapped_for_torch_pruning(fresh_model, dims))
            dg.load_pruning_history(history)
    except PipelineError:
        raise
    except Exception as e:  # noqa: BLE001 - any replay failure means the history is for another model
        raise PipelineError(f"prune: {hist_path} does not fit this model ({brief(e)})") from None
    attn.restore_attributes(fresh_model, meta.get("heads", {}))
    attn.sync_attributes(fresh_model, attn.find_attention(fresh_model))
    state = _load_weights(folder)
    own = fresh_model.state_dict()
    bad = [k for k, v in state.items() if k not in own or own[k].shape != v.shape]
    missing = [k for k in own if k not in state]
    if bad or missing:
        what = bad[0] if bad else missing[0]
        detail = (f"shape {tuple(state[what].shape)} vs {tuple(own[what].shape)}" if what in state and what in own
                  else "missing" if what in own else "unexpected")
        raise PipelineError(f"prune: the weights in {folder} do not fit the replayed model ({what}: {detail})")
    fresh_model.load_state_dict(state)
    return fresh_model


def _load_weights(folder: Path) -> dict:
    st, pt = folder / SAFETENSORS_FILE, folder / STATE_DICT_FILE
    try:
        if st.is_file():
            try:
                from safetensors.torch import load_file
            except ImportError:
                raise PipelineError(f"prune: {st} needs the safetensors package") from None
            return load_file(str(st))
        if pt.is_file():
            return torch.load(pt, map_location="cpu", weights_only=True)
    except PipelineError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file
        raise PipelineError(f"prune: cannot read the weights in {folder} ({brief(e)})") from None
    raise PipelineError(f"prune: no weights in {folder} (expected {SAFETENSORS_FILE} or {STATE_DICT_FILE})")
