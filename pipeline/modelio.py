"""Models in and out of the pipeline: build, load and save weights, run on arrays, count, score.

Plain functions over torch models and config sections; no stage, runner or context here.
"""
from __future__ import annotations

import json
import re
import stat
import struct
import zipfile
from pathlib import Path

import numpy as np

from edgerun.io import atomic_write
from pipeline.errors import PipelineError

# A checkpoint's bytes, on disk and unpacked: an edge model is far smaller; more is a mistake or a bomb.
MAX_WEIGHTS_BYTES = 4 << 30
# torch stores tensors uncompressed (ratio 1); a member that inflates 100-fold is a zip bomb, not weights.
MAX_ZIP_RATIO = 100
MAX_ZIP_ENTRIES = 100_000
MAX_SAFETENSORS_HEADER = 100 << 20   # the safetensors library's own limit


def check_weights_file(path: Path, what: str = "model.weights") -> None:
    """Refuse a weights file that is not a readable regular file, or that would unpack to more than
    MAX_WEIGHTS_BYTES, from its size and its zip directory (torch) or safetensors header alone:
    before anything is decompressed or allocated (a 1 MiB zip of zeros declares 1 GiB)."""
    def bad(msg):
        raise PipelineError(f"{what}: {path}: {msg}")
    try:
        st = path.stat()
        if not stat.S_ISREG(st.st_mode):
            bad("not a regular file")
        if st.st_size > MAX_WEIGHTS_BYTES:
            bad(f"{st.st_size / 2**30:.1f} GiB, more than the {MAX_WEIGHTS_BYTES >> 30} GiB a checkpoint may have here")
        with open(path, "rb") as f:
            head = f.read(8)
            if zipfile.is_zipfile(f):
                _check_zip(f, bad)
            elif path.suffix == ".safetensors":
                _check_safetensors(f, head, st.st_size, bad)
    except OSError as e:
        bad(f"cannot read ({e.strerror or e})")


def _check_zip(f, bad) -> None:
    try:
        end = zipfile._EndRecData(f)   # the end record alone: how many entries before reading them all
        if end is not None and end[zipfile._ECD_ENTRIES_TOTAL] > MAX_ZIP_ENTRIES:
            bad(f"a zip of {end[zipfile._ECD_ENTRIES_TOTAL]} entries; a checkpoint has far fewer")
        members = zipfile.ZipFile(f).infolist()
    except (zipfile.BadZipFile, ValueError, struct.error):
        return   # torch.load reports a damaged zip in its own words
    total = sum(m.file_size for m in members)
    if total > MAX_WEIGHTS_BYTES:
        bad(f"its zip directory declares {total / 2**30:.1f} GiB unpacked, more than the "
            f"{MAX_WEIGHTS_BYTES >> 30} GiB a checkpoint may have here (refused before unpacking)")
    bomb = next((m for m in members if m.file_size > 1 << 20 and m.file_size > MAX_ZIP_RATIO * m.compress_size), None)
    if bomb is not None:
        bad(f"zip member {bomb.filename[:80]!r} unpacks {bomb.compress_size} bytes to {bomb.file_size} "
            f"({bomb.file_size // max(bomb.compress_size, 1)}:1; torch stores tensors uncompressed): "
            f"refused before unpacking")


def _check_safetensors(f, head: bytes, size: int, bad) -> None:
    """The header is 8 bytes of length, then JSON: each tensor's data_offsets must lie in the file."""
    n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
    if not 0 < n <= min(MAX_SAFETENSORS_HEADER, size - 8):
        bad(f"safetensors header of {n} bytes in a file of {size} bytes")
    try:
        f.seek(8)
        header = json.loads(f.read(n))
        spans = [t["data_offsets"] for k, t in header.items() if k != "__metadata__"]
        ok = all(0 <= int(b) <= int(e) <= size - 8 - n for b, e in spans)
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError):
        bad("not a safetensors header (JSON with data_offsets per tensor)")
    if not ok:
        bad("a safetensors header whose tensors lie beyond the end of the file")


def build(model_cfg, data_cfg):
    """A fresh model from ``[model]``, given the input the data section describes."""
    from pipeline.models import build_model
    return build_model(model_cfg.factory or model_cfg.name, num_classes=model_cfg.num_classes,
                       in_channels=data_cfg.channels, image_size=tuple(data_cfg.size),
                       kwargs=dict(model_cfg.kwargs))


def example_input(data_cfg, batch: int = 1):
    import torch
    return torch.zeros(batch, data_cfg.channels, *data_cfg.size)


def output_names(model) -> tuple[str, ...]:
    """A model may name its outputs (an encoder returns its embeddings and logits); else one 'logits'."""
    return tuple(getattr(model, "output_names", ("logits",)))


def read_state_dict(path: Path, key: str = "model.weights", *, unsafe_pickle: bool = False) -> dict:
    """A weights file as {name: tensor}, every problem one line naming ``key``: bounded first
    (check_weights_file), then safetensors (by its suffix) or a torch file loaded weights-only (a checkpoint
    never runs code when it loads, unless the user says it may); tensors only, none NaN or inf."""
    import torch
    check_weights_file(path, key)
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
            state = load_file(str(path))
        except Exception as e:  # the library raises its own types for a damaged file
            from edgerun.errors import brief
            raise PipelineError(f"{key}: {path}: not a safetensors file ({brief(e)})") from None
    else:
        try:
            state = torch.load(path, map_location="cpu", weights_only=not unsafe_pickle)
        except Exception as e:  # torch raises many types for a corrupt or pickled file
            hint = ("; if you made this file yourself and it holds a pickled model, "
                    "--set model.unsafe_pickle=true loads it (pickle runs code from the file)"
                    if key == "model.weights" and ("weights_only" in str(e) or "Unsupported global" in str(e))
                    else "")
            # torch wraps part of its message in ANSI bold codes: they do not belong in a one-line error.
            first = re.sub(r"\x1b\[[0-9;]*m", "", (str(e).splitlines() or [type(e).__name__])[0])
            raise PipelineError(f"{key}: {path}: not a weights-only state_dict ({first[:160]}){hint}") from None
    if isinstance(state, torch.nn.Module):
        state = state.state_dict()
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise PipelineError(f"{key}: {path}: expected a state_dict of tensors, got {type(state).__name__}")
    # NaN or inf weights give NaN logits, and a NaN argmax scores like a guess: refuse them here.
    broken = [k for k, v in state.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if broken:
        raise PipelineError(f"{key}: {path}: {len(broken)} tensors hold NaN or inf values "
                            f"(first {broken[0]}): the checkpoint is damaged or its training diverged")
    return state


def fit_report(own: dict, state: dict) -> dict[str, list[str]]:
    """How a state_dict fits a model's: its missing, unexpected and reshaped keys, each sorted."""
    return {"missing": sorted(k for k in own if k not in state),
            "unexpected": sorted(k for k in state if k not in own),
            "reshaped": sorted(k for k in state if k in own and own[k].shape != state[k].shape)}


def load_state(model, path: Path, *, unsafe_pickle: bool = False, strict: bool = True) -> dict:
    """``model.weights`` into ``model`` (read_state_dict).

    ``strict=False`` loads what fits and returns what did not (missing, unexpected, reshaped keys),
    so a checkpoint with another stem or head can start a model; the record reports it.
    """
    if not path.is_file():
        raise PipelineError(f"model.weights: {path}: checkpoint not found")
    state = read_state_dict(path, unsafe_pickle=unsafe_pickle)
    own = model.state_dict()
    report = fit_report(own, state)
    if strict and any(report.values()):
        kind, keys = next((k, v) for k, v in report.items() if v)
        detail = (f"{keys[0]}: checkpoint {tuple(state[keys[0]].shape)} vs model {tuple(own[keys[0]].shape)}"
                  if kind == "reshaped" else keys[0])
        raise PipelineError(f"model.weights: {path} does not match the model ({len(keys)} {kind} keys, first "
                            f"{detail}); model.weights_strict = false loads what fits and reports the rest")
    fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(fitting, strict=False)
    model.eval()
    return report


def save_weights(model, path: Path) -> None:
    import io

    import torch
    # Serialised in memory first: torch.save on a full disk raises RuntimeError ("iostream error"),
    # while atomic_write turns the OSError of a failed write into one line naming the file.
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    atomic_write(path, buffer.getvalue())


def torch_outputs(model, x: np.ndarray, batch: int = 500, train: bool = False) -> dict[str, np.ndarray]:
    """The model's outputs by name, in eval mode (``train``: in train mode, where BatchNorm uses each
    batch's statistics and updates its running ones)."""
    import torch
    names = output_names(model)
    chunks: dict[str, list] = {n: [] for n in names}
    model.train(train)
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out = model(torch.from_numpy(x[i:i + batch]))
            out = out if isinstance(out, (tuple, list)) else (out,)
            if len(out) != len(names):
                if names != ("logits",):
                    raise PipelineError(f"model: {type(model).__name__} returned {len(out)} outputs, its "
                                        f"output_names has {len(names)} ({', '.join(names)})")
                out = out[-1:]   # an unnamed tuple ends with the logits (as probe_model reads it)
            for n, o in zip(names, out, strict=True):
                chunks[n].append(o.numpy())
    outputs = {n: np.concatenate(c) for n, c in chunks.items()}
    check_finite(outputs, f"model: {type(model).__name__}")
    return outputs


def check_finite(outputs: dict[str, np.ndarray], what: str) -> None:
    """Refuse NaN or inf outputs: their argmax is a class all the same, so top-1 would look like a
    (bad) result instead of a broken model."""
    for name, out in outputs.items():
        bad = ~np.isfinite(out.reshape(len(out), -1)).all(axis=1) if out.size else np.zeros(0, bool)
        if bad.any():
            raise PipelineError(f"{what} gives NaN or inf {name} for {int(bad.sum())} of {len(out)} images "
                                f"(first: image {int(np.argmax(bad))}): a model that computes NaN, or a "
                                f"training that diverged (lower the learning rate)")


def onnx_outputs(path: Path, x: np.ndarray, threads: int = 0) -> dict[str, np.ndarray]:
    from edgerun.ort import run_onnx
    return run_onnx(path, x, threads=threads)


def count(model, data_cfg) -> dict:
    """MACs in the seed's convention (conv/linear multiply-accumulates, as thop/fvcore count them),
    torch-pruning's op count (bias adds and activations too) and parameters, each labelled."""
    from pipeline.prune import conv_linear_macs, count_macs
    x = example_input(data_cfg)
    ops, params = count_macs(model, x)
    return {"macs": int(conv_linear_macs(model, x)), "ops_tp": int(ops), "params": int(params)}


def train_eval_gap(model, x: np.ndarray, y: np.ndarray, task, n: int = 1000) -> float | None:
    """The task's metric in train mode minus eval mode on a train slice, in one batch (on a copy: train mode
    updates BatchNorm). A large gap means BatchNorm running statistics have not settled."""
    import copy

    import torch
    if not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return None
    probe = copy.deepcopy(model)
    xs, ys = x[:n], y[:n]
    in_eval = task.metrics(torch_outputs(probe, xs), ys)[task.metric]
    in_train = task.metrics(torch_outputs(probe, xs, batch=len(xs), train=True), ys)[task.metric]
    return round(in_train - in_eval, 3)


def load_state_fresh(cfg, path: Path):
    """A new model of the run's architecture with the weights a stage saved (strict)."""
    model = build(cfg.model, cfg.data)
    load_state(model, path)
    return model
