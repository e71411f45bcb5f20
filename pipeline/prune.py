"""Structured (channel) pruning with torch-pruning, to a channel ratio, a MAC budget or a latency budget.

    model, info = prune_model(model, example_input, target="macs", macs=0.1, importance="l2",
                              global_pruning=True, iterative_steps=4, between_steps=finetune_a_bit)
    save_pruned(model, info["history"], folder)
    model = load_pruned(fresh_model, example_input, folder)

Targets (``target=``):
  * ``"ratio"``: torch-pruning's *channel* ratio ``ratio`` (0.5 removes half of each layer's channels in
    uniform mode, half of all channels in global mode; MACs shrink by about 1-(1-ratio)^2).
  * ``"macs"``: ``macs`` <= 1.0 is the **fraction of the unpruned MACs to keep** (0.1 = 10x fewer MACs);
    ``macs`` > 1 is an absolute MAC budget. The channel ratio that meets it is found by bisection on a
    deepcopy (the whole iterative schedule is simulated, without ``between_steps``).
  * ``"latency_ms"``: a budget in milliseconds for one batch of ``latency_batch`` on onnxruntime CPU
    (the copy is exported with the TorchScript exporter and timed, median of repeated runs); bisection
    on the ratio as for MACs. Timing on a shared machine is noisy: treat it as approximate.

The classifier (the model's ``classifier`` attribute, else its last ``nn.Linear``) is never pruned at its
output, nor is any layer whose output is itself a model output (a vision tower's projector), any
module named in the model's ``prune_ignored_layers`` attribute, or anything named in ``ignored_layers``. Models with attention modules that carry
``num_heads`` and a ``qkv`` Linear (ViT style) get torch-pruning's head handling and their
``num_heads``/``head_dim`` attributes are updated after each step.

Persistence never pickles: ``pruning_history.json`` (the replayable history plus those attributes)
and the weights (``model.safetensors`` when safetensors is installed, else ``state_dict.pt`` loaded
with ``weights_only=True``).
"""
from __future__ import annotations

import copy
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from pipeline.errors import PipelineError
from pipeline.train import logits_of

IMPORTANCES = ("l1", "l2", "taylor", "bn_scale", "lamp", "random")
TARGETS = ("ratio", "macs", "latency_ms")
HISTORY_FILE = "pruning_history.json"
SAFETENSORS_FILE = "model.safetensors"
STATE_DICT_FILE = "state_dict.pt"
HISTORY_FORMAT = 1
RATIO_MAX = 0.98      # the highest channel ratio the search tries
BRACKET_STEP = 0.04   # first step when bracketing the ratio that meets a MAC/latency budget
RATIO_TOL = 0.005     # bisection stops when the bracket is this narrow


# --------------------------------------------------------------------------------------------- counting
def count_macs(model: nn.Module, example_input) -> tuple[int, int]:
    """(MACs, params) for one forward of ``example_input`` (torch-pruning's counter returns MACs)."""
    was_training = model.training
    macs, params = tp.utils.count_ops_and_params(model, example_input)
    model.train(was_training)
    return int(macs), int(params)


def layer_channels(model: nn.Module) -> dict[str, int]:
    """Output channels/features of every conv and linear layer, by module name."""
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            out[name] = int(m.out_channels)
        elif isinstance(m, nn.Linear):
            out[name] = int(m.out_features)
    return out


# --------------------------------------------------------------------------------------------- helpers
def classifier_of(model: nn.Module) -> nn.Module:
    head = getattr(model, "classifier", None)
    if isinstance(head, nn.Module):
        return head
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise PipelineError("prune: the model has no `classifier` attribute and no nn.Linear to keep as its head")
    return linears[-1]


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """Modules that declare ``num_heads`` and own a ``qkv`` Linear (ViT-style attention)."""
    return [m for m in model.modules()
            if isinstance(getattr(m, "num_heads", None), int) and isinstance(getattr(m, "qkv", None), nn.Linear)]


def _sync_head_attributes(model: nn.Module, num_heads: dict | None = None) -> None:
    """After pruning, make each attention module's ``num_heads``/``head_dim`` match its ``qkv`` layer."""
    for m in _attention_modules(model):
        if num_heads is not None and m.qkv in num_heads:
            m.num_heads = int(num_heads[m.qkv])
        m.head_dim = m.qkv.out_features // (3 * m.num_heads)
    attns = _attention_modules(model)
    if attns and not isinstance(getattr(model, "qkv", None), nn.Linear):
        # the model-level mirror (ViTSmall.num_heads/head_dim), when there is one
        if isinstance(getattr(model, "num_heads", None), int):
            model.num_heads = attns[0].num_heads
        if isinstance(getattr(model, "head_dim", None), int):
            model.head_dim = attns[0].head_dim


def _head_attributes(model: nn.Module) -> dict[str, dict[str, int]]:
    names = {m: n for n, m in model.named_modules()}
    return {names[m]: {"num_heads": int(m.num_heads), "head_dim": int(getattr(m, "head_dim", 0))}
            for m in _attention_modules(model)}


def _make_importance(name: str, model: nn.Module):
    if name == "l1":
        return tp.importance.GroupMagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.GroupMagnitudeImportance(p=2)
    if name == "taylor":
        return tp.importance.GroupTaylorImportance()
    if name == "lamp":
        return tp.importance.LAMPImportance(p=2)
    if name == "random":
        return tp.importance.RandomImportance()
    if name == "bn_scale":
        if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise PipelineError("prune.importance: 'bn_scale' needs BatchNorm layers and this model has none; "
                                "use 'l2', 'l1', 'lamp' or 'taylor'")
        return tp.importance.BNScaleImportance()
    raise PipelineError(f"prune.importance: unknown {name!r}; expected one of {', '.join(IMPORTANCES)}")


def output_modules(model: nn.Module, example_input) -> list[nn.Module]:
    """Leaf modules whose output tensor is itself one of the model's outputs (e.g. a vision tower's
    projector and its classifier): pruning their output width would change the model's contract."""
    seen: list[tuple[torch.Tensor, nn.Module]] = []  # keeps the tensors alive, so identity is safe
    hooks = [m.register_forward_hook(lambda mod, _inp, out: seen.append((out, mod)))
             for m in model.modules() if not any(True for _ in m.children())]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            out = model(example_input)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    outs = out if isinstance(out, (tuple, list)) else [out]
    found = []
    for o in outs:
        for t, mod in seen:
            if t is o and mod not in found:
                found.append(mod)
    return found


def _ignored(model: nn.Module, names: Iterable[str], example_input=None) -> list[nn.Module]:
    """The classifier, the modules that produce model outputs, the model's own ``prune_ignored_layers``
    (a tuple of module names it may declare) and the user's ``ignored_layers``."""
    modules = dict(model.named_modules())
    out = [classifier_of(model)]
    if example_input is not None:
        out += [m for m in output_modules(model, example_input) if m not in out]
    declared = tuple(getattr(model, "prune_ignored_layers", ()) or ())
    for n in (*declared, *names):
        if n not in modules:
            raise PipelineError(f"prune.ignored_layers: the model has no module named {n!r}")
        out.append(modules[n])
    return out


def _taylor_gradients(model: nn.Module, batches: list) -> None:
    """Accumulate cross-entropy gradients over ``batches`` (GroupTaylorImportance reads ``.grad``)."""
    if not batches:
        raise PipelineError("prune.importance: 'taylor' needs taylor_batches (an iterable of (x, y) tensors)")
    was_training = model.training
    model.eval()  # BN statistics must not move; gradients still flow
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    for x, y in batches:
        loss = F.cross_entropy(logits_of(model(x.to(device))), y.to(device))
        loss.backward()
    model.train(was_training)


def _pruner(model, example_input, importance, ratio, *, global_pruning, round_to, max_layer_ratio,
            iterative_steps, ignored, layer_ratios, head_ratio=0.0):
    num_heads = {m.qkv: m.num_heads for m in _attention_modules(model)}
    modules = dict(model.named_modules())
    ratio_dict = {modules[name]: float(r) for name, r in (layer_ratios or {}).items()}
    return tp.pruner.BasePruner(
        model, example_input, importance=importance, global_pruning=global_pruning,
        pruning_ratio=float(ratio), pruning_ratio_dict=ratio_dict or None, max_pruning_ratio=float(max_layer_ratio),
        iterative_steps=int(iterative_steps), ignored_layers=ignored,
        round_to=int(round_to) if round_to and round_to > 1 else None,
        # Either whole heads go (head_ratio > 0) or every head narrows: torch-pruning keeps qkv, proj
        # and the num_heads/head_dim attributes consistent in both modes.
        num_heads=num_heads, prune_num_heads=head_ratio > 0, prune_head_dims=head_ratio == 0,
        head_pruning_ratio=float(head_ratio))


def _run_schedule(model, example_input, *, ratio, importance, global_pruning, round_to, max_layer_ratio,
                  iterative_steps, ignored_names, taylor_batches, seed, layer_ratios=None, between_steps=None,
                  progress=None, head_ratio=0.0):
    """Prune ``model`` in place over ``iterative_steps`` steps; returns the replayable history."""
    torch.manual_seed(seed)
    imp = _make_importance(importance, model)
    with torch.enable_grad():
        pruner = _pruner(model, example_input, imp, ratio, global_pruning=global_pruning, round_to=round_to,
                         max_layer_ratio=max_layer_ratio, iterative_steps=iterative_steps,
                         ignored=_ignored(model, ignored_names, example_input), layer_ratios=layer_ratios,
                         head_ratio=head_ratio)
        for step in range(iterative_steps):
            if importance == "taylor":
                _taylor_gradients(model, taylor_batches)
            pruner.step()
            if importance == "taylor":
                model.zero_grad(set_to_none=True)
            _sync_head_attributes(model, pruner.num_heads)
            if progress:
                progress(step + 1, iterative_steps)
            if between_steps is not None and step < iterative_steps - 1:
                between_steps(step, model)
    return _json_history(pruner.pruning_history())


def _json_history(history) -> list:
    return [[str(name), bool(is_out), [int(i) for i in idxs]] for name, is_out, idxs in history]


# --------------------------------------------------------------------------------------------- latency
def measure_latency_ms(model: nn.Module, example_input: torch.Tensor, batch: int = 1, *, warmup: int = 10,
                       runs: int = 50, threads: int = 0) -> float:
    """Median latency (ms) of one batch on onnxruntime's CPU provider, from a TorchScript-exported copy."""
    import numpy as np
    import onnxruntime as ort

    m = copy.deepcopy(model).cpu().eval()
    x = example_input[:1].detach().cpu().repeat(batch, *([1] * (example_input.dim() - 1)))
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "model.onnx")
        with torch.no_grad():
            torch.onnx.export(m, (x,), path, dynamo=False, opset_version=17, input_names=["input"],
                              dynamic_axes={"input": {0: "batch"}})
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        feed = {"input": x.numpy().astype(np.float32)}
        for _ in range(warmup):
            sess.run(None, feed)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            sess.run(None, feed)
            times.append((time.perf_counter() - t0) * 1000.0)
    return float(statistics.median(times))


# --------------------------------------------------------------------------------------------- pruning
def prune_model(model: nn.Module, example_input, *, target: str = "ratio", ratio: float = 0.5,
                macs: float = 0.0, latency_ms: float = 0.0, latency_batch: int = 1, importance: str = "l2",
                global_pruning: bool = False, round_to: int = 1, max_layer_ratio: float = 1.0,
                iterative_steps: int = 1, ignored_layers: Iterable[str] = (),
                between_steps: Callable[[int, nn.Module], None] | None = None,
                taylor_batches: Iterable | None = None, seed: int = 0,
                progress: Callable[[int, int], None] | None = None,
                layer_ratios: dict[str, float] | None = None, head_ratio: float = 0.0) -> tuple[nn.Module, dict]:
    """Prune ``model`` in place; returns ``(model, info)``.

    ``info``: macs_before/after, params_before/after, ratio_used (the channel ratio applied),
    history (JSON-friendly, for :func:`save_pruned`), channels ({layer: kept output channels}),
    plus target/budget/latency fields where they apply. ``between_steps(step_index, model)`` runs
    after every iterative step but the last (e.g. a short fine-tune). ``progress(step, steps)`` is
    called after each step. ``layer_ratios`` ({module name: channel ratio}) fixes the ratio of the named
    layers' output channels (torch-pruning's ``pruning_ratio_dict``); the searched/given ``ratio``
    applies to the others. ``head_ratio`` > 0 removes that fraction of whole attention heads (keeping
    head_dim) instead of narrowing every head.
    """
    if target not in TARGETS:
        raise PipelineError(f"prune.target: unknown {target!r}; expected one of {', '.join(TARGETS)}")
    if importance not in IMPORTANCES:
        raise PipelineError(f"prune.importance: unknown {importance!r}; expected one of {', '.join(IMPORTANCES)}")
    if not 0.0 <= float(head_ratio) < 1.0:
        raise PipelineError(f"prune.head_ratio: must be in [0, 1), got {head_ratio}")
    if int(iterative_steps) < 1:
        raise PipelineError(f"prune.iterative_steps: must be >= 1, got {iterative_steps}")
    if not 0.0 < float(max_layer_ratio) <= 1.0:
        raise PipelineError(f"prune.max_layer_ratio: must be in (0, 1], got {max_layer_ratio}")
    if importance == "bn_scale":
        _make_importance(importance, model)  # fail early and clearly
    ignored_names = tuple(ignored_layers)
    _ignored(model, ignored_names)
    layer_ratios = dict(layer_ratios or {})
    named = dict(model.named_modules())
    for name, r in layer_ratios.items():
        if name not in named:
            raise PipelineError(f"prune.layer_ratios: the model has no module named {name!r}")
        if not 0.0 <= float(r) < 1.0:
            raise PipelineError(f"prune.layer_ratios: {name} ratio must be in [0, 1), got {r}")
    batches = list(taylor_batches) if taylor_batches is not None else []
    if importance == "taylor" and not batches:
        raise PipelineError("prune.importance: 'taylor' needs taylor_batches (an iterable of (x, y) tensors)")

    macs_before, params_before = count_macs(model, example_input)
    common = dict(importance=importance, global_pruning=global_pruning, round_to=round_to,
                  max_layer_ratio=max_layer_ratio, iterative_steps=int(iterative_steps),
                  ignored_names=ignored_names, taylor_batches=batches, seed=seed, layer_ratios=layer_ratios,
                  head_ratio=float(head_ratio))
    info: dict = {"target": target}

    if target == "ratio":
        if not 0.0 <= float(ratio) < 1.0:
            raise PipelineError(f"prune.ratio: must be in [0, 1), got {ratio}")
        ratio_used = float(ratio)
    else:
        if target == "macs":
            if macs <= 0:
                raise PipelineError("prune.macs: give a fraction of MACs to keep (0 < macs <= 1) or a MAC budget (> 1)")
            budget = float(macs) * macs_before if macs <= 1.0 else float(macs)
            info["macs_budget"] = int(budget)

            def cost(m):
                return count_macs(m, example_input)[0]
            what = "MACs"
        else:
            if latency_ms <= 0:
                raise PipelineError("prune.latency_ms: give a positive latency budget in milliseconds")
            budget = float(latency_ms)
            info["latency_budget_ms"] = budget

            def cost(m):
                return measure_latency_ms(m, example_input, latency_batch)
            what = f"ms at batch {latency_batch}"
        ratio_used, sim_channels = _bisect_ratio(model, example_input, budget, cost, what, common,
                                                 cost0=macs_before if target == "macs" else None)
    history = _run_schedule(model, example_input, ratio=ratio_used, between_steps=between_steps,
                            progress=progress, **common)

    # With fine-tuning between global steps the allocation can differ from the simulation: top up.
    if target != "ratio" and layer_channels(model) != sim_channels and cost(model) > budget:
        once = {**common, "iterative_steps": 1, "layer_ratios": None}  # layer_ratios were applied already
        extra, _ = _bisect_ratio(model, example_input, budget, cost, what, once)
        history += _run_schedule(model, example_input, ratio=extra, **once)
        info["top_up_ratio"] = extra

    macs_after, params_after = count_macs(model, example_input)
    info.update({"macs_before": macs_before, "macs_after": macs_after, "params_before": params_before,
                 "params_after": params_after, "ratio_used": ratio_used, "history": history,
                 "channels": layer_channels(model)})
    if target == "latency_ms":
        info["latency_ms_after"] = measure_latency_ms(model, example_input, latency_batch)
    return model, info


def _bisect_ratio(model, example_input, budget, cost, what, common, cost0=None) -> tuple[float, dict]:
    """Smallest channel ratio (within RATIO_TOL) whose simulated pruned copy costs <= budget; also the
    channels it gives. Each trial prunes a deepcopy, so trials are few: a first guess from
    cost ~ (1 - ratio)^2, a bracket grown outwards from it, then bisection of the bracket."""
    cache: dict[float, tuple[float, dict]] = {}

    def trial(r):
        r = round(min(max(r, 0.0), RATIO_MAX), 6)
        if r not in cache:
            m = copy.deepcopy(model)
            if r > 0 or common.get("layer_ratios"):
                _run_schedule(m, example_input, ratio=r, **common)
            cache[r] = (cost(m), layer_channels(m))
        return r, cache[r][0]

    if cost0 is None or common.get("layer_ratios"):
        cost0 = trial(0.0)[1]
    else:
        cache[0.0] = (cost0, layer_channels(model))
    if cost0 <= budget:
        return 0.0, cache[0.0][1]
    guess = 1.0 - math.sqrt(budget / cost0)
    r, c = trial(guess)
    step = BRACKET_STEP
    if c <= budget:  # grow downwards until it no longer fits
        hi, lo = r, None
        while lo is None:
            r2, c2 = trial(hi - step)
            if r2 <= 0.0 or c2 > budget:
                lo = max(r2, 0.0) if c2 > budget else 0.0
                if c2 <= budget:
                    hi = r2
            else:
                hi = r2
            step *= 2
    else:  # grow upwards until it fits (global pruning can refuse to empty layers: not monotone at the top)
        lo, hi = r, None
        while hi is None:
            if lo >= RATIO_MAX:
                best = min(v[0] for v in cache.values())
                raise PipelineError(f"prune: cannot reach {budget:,.4g} {what}: the lowest found is {best:,.4g}; "
                                    "relax the target, max_layer_ratio or ignored_layers")
            r2, c2 = trial(lo + step)
            if c2 <= budget:
                hi = r2
            else:
                lo = r2
            step *= 2
    while hi - lo > RATIO_TOL:
        mid, c = trial((lo + hi) / 2)
        if c <= budget:
            hi = mid
        else:
            lo = mid
    return hi, cache[hi][1]


# --------------------------------------------------------------------------------------------- persistence
def save_pruned(model: nn.Module, history, folder) -> Path:
    """Write ``pruning_history.json`` and the weights into ``folder`` (created); returns the folder."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    meta = {"format": HISTORY_FORMAT, "history": _json_history(history), "heads": _head_attributes(model),
            "channels": layer_channels(model)}
    (folder / HISTORY_FILE).write_text(json.dumps(meta))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    try:
        from safetensors.torch import save_file
    except ImportError:
        (folder / SAFETENSORS_FILE).unlink(missing_ok=True)
        torch.save(state, folder / STATE_DICT_FILE)
    else:
        (folder / STATE_DICT_FILE).unlink(missing_ok=True)
        save_file(state, str(folder / SAFETENSORS_FILE))
    return folder


def load_pruned(fresh_model: nn.Module, example_input, folder) -> nn.Module:
    """Replay the saved history on ``fresh_model`` (an unpruned instance), then load the weights."""
    folder = Path(folder)
    hist_path = folder / HISTORY_FILE
    if not hist_path.is_file():
        raise PipelineError(f"prune: {hist_path} not found (expected a folder written by save_pruned)")
    try:
        meta = json.loads(hist_path.read_text())
        history = meta["history"] if isinstance(meta, dict) else meta
        heads = meta.get("heads", {}) if isinstance(meta, dict) else {}
    except (ValueError, KeyError, TypeError) as e:
        raise PipelineError(f"prune: {hist_path} is not a pruning history ({e})") from None
    modules = dict(fresh_model.named_modules())
    try:
        with torch.enable_grad():
            dg = tp.DependencyGraph().build_dependency(fresh_model, example_inputs=example_input)
            for name, _, idxs in history:
                if name not in modules:
                    raise PipelineError(f"prune: {hist_path} names layer {name!r}, which this model does not have")
            dg.load_pruning_history(history)
    except PipelineError:
        raise
    except Exception as e:  # noqa: BLE001 - any replay failure means the history is for another model
        raise PipelineError(f"prune: {hist_path} does not fit this model ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from None
    for name, attrs in heads.items():
        m = modules.get(name)
        if m is not None:
            for k, v in attrs.items():
                setattr(m, k, v)
    _sync_head_attributes(fresh_model)
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
    if st.is_file():
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise PipelineError(f"prune: {st} needs the safetensors package") from None
        return load_file(str(st))
    if pt.is_file():
        return torch.load(pt, map_location="cpu", weights_only=True)
    raise PipelineError(f"prune: no weights in {folder} (expected {SAFETENSORS_FILE} or {STATE_DICT_FILE})")
