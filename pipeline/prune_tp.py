"""torch-pruning, as this project drives it: importance criteria, the layers kept whole, Taylor
gradients, the pruner (attention heads and bare parameters included), one pruning schedule with its
replayable history, and the pruner the latency search ranks groups with. pipeline.prune builds the
targets (ratio, MACs, latency, replayed widths) on top of it.
"""
from __future__ import annotations

import warnings
from typing import Iterable

import torch
import torch.nn as nn
import torch_pruning as tp

from edgerun.errors import brief
from pipeline import prune_attention as attn
from pipeline import prune_scope as scope
from pipeline.errors import PipelineError
from pipeline.models import forward_named
from pipeline.prune_store import json_history
from pipeline.tasks.logits import importance_loss

IMPORTANCES = ("l1", "l2", "taylor", "bn_scale", "lamp", "random")


def make_importance(name: str, model: nn.Module):
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


def ignored_modules(model: nn.Module, names: Iterable[str], example_input=None) -> list:
    """The layers (and bare parameters) producing the model's outputs, the model's own
    ``prune_ignored_layers`` (module names it may declare) and the user's ``ignored_layers``."""
    modules = dict(model.named_modules())
    out = scope.output_producers(model, example_input) if example_input is not None else []
    declared = tuple(getattr(model, "prune_ignored_layers", ()) or ())
    for n in (*declared, *names):
        if n not in modules:
            raise PipelineError(f"prune.ignored_layers: the model has no module named {n!r}")
        if not any(modules[n] is o for o in out):
            out.append(modules[n])
    return out


def taylor_gradients(model: nn.Module, batches: list, loss=None) -> None:
    """Accumulate the gradients of ``loss(output, labels)`` (the task's `importance_loss`; default a
    classifier's cross-entropy) over ``batches`` (GroupTaylorImportance reads ``.grad``)."""
    loss = loss or importance_loss
    if not batches:
        raise PipelineError("prune.importance: 'taylor' needs taylor_batches (an iterable of (x, y) tensors)")
    was_training = model.training
    model.eval()  # BN statistics must not move; gradients still flow
    model.zero_grad(set_to_none=True)
    device = next(model.parameters()).device
    for x, y in batches:
        loss(model(x.to(device)), y.to(device)).backward()
    model.train(was_training)


def build_pruner(model, example_input, importance, ratio, *, global_pruning, round_to, max_layer_ratio,
            iterative_steps, ignored, layer_ratios, narrow_heads, unwrapped, attentions):
    modules = dict(model.named_modules())
    ratio_dict = {modules[name]: float(r) for name, r in (layer_ratios or {}).items()}
    for a in attentions:
        if a.kind == "mha" and not narrow_heads:  # heads keep their width: an MHA loses only whole heads
            ratio_dict.setdefault(a.module, 0.0)
        elif a.kind != "mha" and not global_pruning:
            # Local mode names each group's ranking scope after its root module, and torch-pruning roots
            # an attention group at its output Linear, the root of the residual group too when that
            # comes first in its graph: one overwrites the other and the residual never shrinks. An
            # explicit scope per attention, at the same ratio, keeps them apart.
            ratio_dict.setdefault(a.projections if len(a.projections) > 1 else a.projections[0], float(ratio))
    return tp.pruner.BasePruner(
        model, example_input, importance=importance, global_pruning=global_pruning,
        pruning_ratio=float(ratio), pruning_ratio_dict=ratio_dict or None, max_pruning_ratio=float(max_layer_ratio),
        iterative_steps=int(iterative_steps), ignored_layers=ignored,
        round_to=int(round_to) if round_to and round_to > 1 else None,
        # fresh dicts: torch-pruning 1.6.1 mutates these arguments' shared defaults across pruners
        in_channel_groups={}, out_channel_groups={},
        # heads as channel groups, so narrowing keeps whole heads; whole heads go in attn.remove_heads
        num_heads=attn.torch_pruning_heads(attentions), prune_num_heads=False, prune_head_dims=narrow_heads,
        customized_pruners=attn.customized_pruners(),
        unwrapped_parameters=scope.unwrapped_for_torch_pruning(model, unwrapped))


def run_schedule(model, example_input, *, ratio, importance, global_pruning, round_to, max_layer_ratio,
                  iterative_steps, ignored_names, taylor_batches, seed, unwrapped, layer_ratios=None,
                  between_steps=None, progress=None, head_ratio=0.0, narrow_heads=True, taylor_loss=None):
    """Prune ``model`` in place over ``iterative_steps`` steps; returns the replayable history."""
    torch.manual_seed(seed)
    imp = make_importance(importance, model)
    attentions = attn.find_attention(model)
    heads0 = {a.module: a.heads()[0] for a in attentions}
    pruner = None
    try:
        with torch.enable_grad(), warnings.catch_warnings():
            # bare parameters are reported in info["unwrapped"], dim by dim
            warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
            ignored = ignored_modules(model, ignored_names, example_input)
            pruner = build_pruner(model, example_input, imp, ratio, global_pruning=global_pruning, round_to=round_to,
                             max_layer_ratio=max_layer_ratio, iterative_steps=iterative_steps, ignored=ignored,
                             layer_ratios=layer_ratios, narrow_heads=narrow_heads,
                             unwrapped=unwrapped, attentions=attentions)
            for step in range(iterative_steps):
                if importance == "taylor":
                    taylor_gradients(model, taylor_batches, taylor_loss)
                if head_ratio > 0:
                    active = [a for a in attentions if a.module not in pruner.ignored_layers]
                    attn.remove_heads(pruner, active, heads0, head_ratio, step, iterative_steps)
                pruner.step()
                if importance == "taylor":
                    model.zero_grad(set_to_none=True)
                attn.sync_attributes(model, attentions, pruner.num_heads)
                attn.check_consistent(attentions)
                try:
                    check_runs(model, example_input)
                except PipelineError as e:  # a mis-indexed graph shows here first
                    raise PipelineError(f"{e}{scope.split_hint(pruner.DG)}") from None
                if progress:
                    progress(step + 1, iterative_steps)
                if between_steps is not None and step < iterative_steps - 1:
                    between_steps(step, model)
    except PipelineError:
        raise
    except Exception as e:  # noqa: BLE001 - torch-pruning's failures are tracebacks deep in its graph code
        raise PipelineError(f"prune: torch-pruning failed ({brief(e)})"
                            f"{scope.split_hint(pruner.DG if pruner else None)}") from None
    return json_history(pruner.pruning_history())


def check_runs(model, example_input) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            forward_named(model, example_input, "prune: the pruned model fails")
    finally:
        model.train(was_training)


def ranking_pruner(m, example_input, common: dict):
    """(pruner, attentions): the pruner the latency search ranks channels and heads with (no ratio of
    its own), with Taylor gradients in place where the importance needs them."""
    attentions = attn.find_attention(m)
    with torch.enable_grad(), warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Unwrapped parameters detected")
        pruner = build_pruner(m, example_input, make_importance(common["importance"], m), 0.0, global_pruning=False,
                         round_to=1, max_layer_ratio=common["max_layer_ratio"], iterative_steps=1,
                         ignored=ignored_modules(m, common["ignored_names"], example_input), layer_ratios=None,
                         narrow_heads=True, unwrapped=common["unwrapped"], attentions=attentions)
        if common["importance"] == "taylor":
            taylor_gradients(m, common["taylor_batches"], common.get("taylor_loss"))
    return pruner, attentions
