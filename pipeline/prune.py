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
  * ``"latency_ms"``: a budget in milliseconds for one batch of ``latency_batch`` on the deploy runtime;
    ``"speedup"``: ``speedup`` times faster than the unpruned model there. Both choose a width per
    group of coupled channels from measured latency tables (pipeline.prune_latency): the result says
    what was measured, how long it took, predicted and measured speedup. Timing on a shared machine
    is noisy: the pick is verified against the unpruned model with the interleaved protocol.

What stays fixed (pipeline.prune_scope): the output channels of the layers that produce the model's
outputs (a classifier's last layer, a vision tower's projector), modules named in the model's
``prune_ignored_layers`` attribute and anything in ``ignored_layers``. Everything else, hidden layers
of a classifier head included, may shrink. Attention heads (pipeline.prune_attention): torch's
``nn.MultiheadAttention``, fused-``qkv`` and separate q/k/v modules keep whole heads under every target;
``head_ratio`` > 0 removes that share of every attention's heads (the least important ones) instead of
narrowing them. Bare parameters (a class token,
position embeddings, layer scales) follow torch-pruning's default dim unless ``unwrapped_parameters``
says otherwise. Any failure is one line naming the part of the model that failed.

MACs are counted two ways: ``count_macs`` is torch-pruning's op count (it also counts bias adds,
norms and activations); ``conv_linear_macs`` counts multiply-accumulates of conv, linear and attention
layers only, the convention of thop/fvcore and of the seed experiment (pruning targets use the first).
"""
from __future__ import annotations

import copy
import math
from typing import Callable, Iterable

import torch
import torch.nn as nn

from edgerun.errors import brief
from pipeline import prune_attention as attn
from pipeline import prune_heads as heads
from pipeline import prune_latency as latency
from pipeline import prune_scope as scope
from pipeline.errors import PipelineError
from pipeline.prune_cost import (  # noqa: F401 (public here)
    batch_of,
    bisect_ratio,
    conv_linear_macs,
    count_macs,
    export_for_timing,
    measure_latency_ms,
)
from pipeline.prune_greedy import is_head_group
from pipeline.prune_latency import GPU_ROUND_TO, latency_backend, resolve_round_to  # noqa: F401 (public here)
from pipeline.prune_store import (  # noqa: F401
    HISTORY_FILE,
    SAFETENSORS_FILE,
    STATE_DICT_FILE,
    json_history,
    layer_channels,
    load_pruned,
    save_pruned,
)
from pipeline.prune_tp import (
    IMPORTANCES,
    ignored_modules,
    make_importance,
    ranking_pruner,
    run_schedule,
)

TARGETS = ("ratio", "macs", "latency_ms", "speedup")
LATENCY_TARGETS = ("latency_ms", "speedup")


# --------------------------------------------------------------------------------------------- helpers
def _check_outputs(model, example_input, shapes_before) -> None:
    after = scope.output_shapes(model, example_input)
    if after != shapes_before:
        raise PipelineError(f"prune: pruning changed the model's output shapes from {shapes_before} to {after}; "
                            "list the layer producing that output in prune.ignored_layers")


# --------------------------------------------------------------------------------------------- pruning
def _validate(model, *, target, importance, head_ratio, iterative_steps, max_layer_ratio, ignored_layers,
              layer_ratios, attentions) -> None:
    if target not in TARGETS:
        raise PipelineError(f"prune.target: unknown {target!r}; expected one of {', '.join(TARGETS)}")
    if importance not in IMPORTANCES:
        raise PipelineError(f"prune.importance: unknown {importance!r}; expected one of {', '.join(IMPORTANCES)}")
    if not 0.0 <= float(head_ratio) < 1.0:
        raise PipelineError(f"prune.head_ratio: must be in [0, 1), got {head_ratio}")
    if head_ratio > 0 and not attentions:
        raise PipelineError(f"prune.head_ratio: {head_ratio} asks to remove attention heads but the model has none "
                            "(recognised: nn.MultiheadAttention, and modules with an int num_heads and a qkv Linear "
                            "or q/k/v Linears); set it to 0")
    if int(iterative_steps) < 1:
        raise PipelineError(f"prune.iterative_steps: must be >= 1, got {iterative_steps}")
    if not 0.0 < float(max_layer_ratio) <= 1.0:
        raise PipelineError(f"prune.max_layer_ratio: must be in (0, 1], got {max_layer_ratio}")
    if importance == "bn_scale":
        make_importance(importance, model)  # fail early and clearly
    ignored_modules(model, ignored_layers)
    named = dict(model.named_modules())
    for name, r in layer_ratios.items():
        if name not in named:
            raise PipelineError(f"prune.layer_ratios: the model has no module named {name!r}")
        if not 0.0 <= float(r) < 1.0:
            raise PipelineError(f"prune.layer_ratios: {name} ratio must be in [0, 1), got {r}")
    attn.check_supported(attentions)


def prune_model(model: nn.Module, example_input, *, target: str = "ratio", ratio: float = 0.5,
                macs: float = 0.0, latency_ms: float = 0.0, latency_batch: int = 1, speedup: float = 0.0,
                latency_threads: int = 1, latency_runtime: str = "onnxruntime-cpu", verify_processes: int = 3,
                log: Callable[[str], object] | None = None, importance: str = "l2",
                global_pruning: bool = False, round_to: int = 1, max_layer_ratio: float = 1.0,
                iterative_steps: int = 1, ignored_layers: Iterable[str] = (),
                between_steps: Callable[[int, nn.Module], None] | None = None,
                taylor_batches: Iterable | None = None, taylor_loss: Callable | None = None, seed: int = 0,
                progress: Callable[[int, int], None] | None = None,
                layer_ratios: dict[str, float] | None = None, head_ratio: float = 0.0,
                unwrapped_parameters: dict[str, int] | None = None,
                search: latency.SearchOptions | None = None,
                widths: dict[str, int] | None = None) -> tuple[nn.Module, dict]:
    """Prune ``model`` in place; returns ``(model, info)``.

    ``info``: macs_before/after (torch-pruning's count), conv_linear_macs_before/after (see
    conv_linear_macs), params_before/after, ratio_used (the channel ratio applied), history
    (JSON-friendly, for :func:`save_pruned`), channels ({layer: kept output channels}), heads
    ({attention module: kind, num_heads/head_dim before and after}), unwrapped ({bare parameter:
    "pruned along dim d" | "kept"}), plus target/budget/latency fields where they apply.
    ``between_steps(step_index, model)`` runs after every iterative step but the last (e.g. a short
    fine-tune); ``progress(step, steps)`` after each step. ``layer_ratios`` ({module name: channel
    ratio}) fixes the ratio of the named layers' output channels (torch-pruning's
    ``pruning_ratio_dict``). ``head_ratio`` > 0 removes that fraction of every attention's heads
    (rounded up, never all; spread linearly over the iterative steps) instead of narrowing every
    head. ``unwrapped_parameters`` ({parameter name: dim}) overrides the dim along which a bare
    parameter is pruned; pass the same dict to save_pruned. ``search`` holds the latency search's
    goal mode, time budget and back-off (its wider rungs come back as ``info["rungs"]``: [(widths,
    pruned model, history)], the unpruned model narrowed to each). ``widths`` ({group: kept width})
    replays a pick instead of any target: the groups are pruned to exactly those widths.
    ``taylor_loss(output, labels)``: what Taylor importance differentiates on ``taylor_batches`` (the task's
    `importance_loss`; default a classifier's cross-entropy).
    """
    attentions = attn.find_attention(model)
    ignored_names = tuple(ignored_layers)
    layer_ratios = dict(layer_ratios or {})
    _validate(model, target=target, importance=importance, head_ratio=head_ratio, iterative_steps=iterative_steps,
              max_layer_ratio=max_layer_ratio, ignored_layers=ignored_names, layer_ratios=layer_ratios,
              attentions=attentions)
    if target in LATENCY_TARGETS and (layer_ratios or head_ratio):
        raise PipelineError(f"prune.target = {target!r} chooses every group's width itself: it cannot be combined "
                            "with layer_ratios or head_ratio; use ignored_layers to keep layers whole")
    unwrapped = scope.unwrapped_dims(model, unwrapped_parameters)
    batches = list(taylor_batches) if taylor_batches is not None else []
    if importance == "taylor" and not batches:
        raise PipelineError("prune.importance: 'taylor' needs taylor_batches (an iterable of (x, y) tensors)")

    shapes_before = scope.output_shapes(model, example_input)
    bare_before = {n: tuple(p.shape) for n, p in model.named_parameters() if n in unwrapped}
    heads_before = attn.head_table(attentions)
    macs_before, params_before = count_macs(model, example_input)
    cl_macs_before = conv_linear_macs(model, example_input)
    common = dict(importance=importance, global_pruning=global_pruning, round_to=round_to,
                  max_layer_ratio=max_layer_ratio, iterative_steps=int(iterative_steps),
                  ignored_names=ignored_names, taylor_batches=batches, taylor_loss=taylor_loss, seed=seed,
                  layer_ratios=layer_ratios,
                  head_ratio=float(head_ratio), narrow_heads=float(head_ratio) == 0.0, unwrapped=unwrapped)
    info: dict = {"target": target}

    if widths:
        history = _replay(model, example_input, widths, common, between_steps, progress)
        info.update(widths_source="replayed", replayed_widths=dict(widths))
        ratio_used = None
    elif target in LATENCY_TARGETS:
        if target == "latency_ms" and latency_ms <= 0:
            raise PipelineError("prune.latency_ms: give a positive latency budget in milliseconds")
        if target == "latency_ms":
            info["latency_budget_ms"] = float(latency_ms)
        found = _latency_search(model, example_input, common, batch=latency_batch, threads=latency_threads,
                                backend=latency_runtime, block=round_to if round_to > 1 else 0,
                                speedup=float(speedup) if target == "speedup" else 0.0,
                                latency_ms=float(latency_ms) if target == "latency_ms" else 0.0,
                                verify_processes=verify_processes, log=log, options=search)
        unpruned = copy.deepcopy(model) if len(found.ladder) > 1 else None
        history = _apply_widths(model, example_input, found.widths, common, between_steps, progress)
        info.update(latency_search=found.summary(), latency_tables=found.tables_json(),
                    latency_ms_after=found.pruned_ms, widths_source="searched",
                    rungs=[_rung_model(unpruned, example_input, r.widths, common, between_steps)
                           for r in found.ladder[1:]])
        ratio_used = None
    elif target == "ratio":
        if not 0.0 <= float(ratio) < 1.0:
            raise PipelineError(f"prune.ratio: must be in [0, 1), got {ratio}")
        ratio_used = float(ratio)
    else:
        if macs <= 0:
            raise PipelineError("prune.macs: give a fraction of MACs to keep (0 < macs <= 1) or a MAC budget (> 1)")
        budget = float(macs) * macs_before if macs <= 1.0 else float(macs)
        info["macs_budget"] = int(budget)

        def cost(m):
            return count_macs(m, example_input)[0]
        what = "MACs"
        ratio_used, sim_channels = bisect_ratio(model, example_input, budget, cost, what, common, run_schedule,
                                                cost0=macs_before)
    if target not in LATENCY_TARGETS and not widths:
        history = run_schedule(model, example_input, ratio=ratio_used, between_steps=between_steps,
                                progress=progress, **common)

    # With fine-tuning between global steps the allocation can differ from the simulation: top up
    # (heads were removed already: the top-up only narrows what the main schedule may narrow).
    if target == "macs" and layer_channels(model) != sim_channels and cost(model) > budget:
        once = {**common, "iterative_steps": 1, "layer_ratios": None, "head_ratio": 0.0}
        extra, _ = bisect_ratio(model, example_input, budget, cost, what, once, run_schedule)
        history += run_schedule(model, example_input, ratio=extra, **once)
        info["top_up_ratio"] = extra

    _check_outputs(model, example_input, shapes_before)
    macs_after, params_after = count_macs(model, example_input)
    heads_after = attn.head_table(attn.find_attention(model))
    info.update({"macs_before": macs_before, "macs_after": macs_after,
                 "conv_linear_macs_before": cl_macs_before,
                 "conv_linear_macs_after": conv_linear_macs(model, example_input),
                 "params_before": params_before, "params_after": params_after, "ratio_used": ratio_used,
                 "history": history, "channels": layer_channels(model),
                 "heads": {n: {"kind": h["kind"], "num_heads_before": h["num_heads"],
                               "head_dim_before": h["head_dim"], "num_heads": heads_after[n]["num_heads"],
                               "head_dim": heads_after[n]["head_dim"]} for n, h in heads_before.items()},
                 "unwrapped": scope.unwrapped_report(bare_before, model)})
    return model, info


# --------------------------------------------------------------------------------------------- latency targets
def _width_ratios(widths: dict[str, int], full: dict[str, int]) -> dict[str, float]:
    # torch-pruning keeps int(n * (1 - ratio)) channels: aim half a channel above w so that float
    # rounding cannot drop one more
    return {n: 1.0 - (w + 0.5) / full[n] for n, w in widths.items() if w < full[n]}


def _apply_widths(model, example_input, widths: dict[str, int], common: dict, between_steps=None,
                  progress=None) -> list:
    """Prune ``model`` in place so that each group root in ``widths`` keeps that many channels and each
    head group (prune_heads: "<attention>#heads") that many whole heads (those go first)."""
    kept_heads = {n: w for n, w in widths.items() if is_head_group(n)}
    history = []
    if kept_heads:
        history = heads.keep_heads(model, *ranking_pruner(model, example_input, common), kept_heads)
    widths = {n: w for n, w in widths.items() if n not in kept_heads}
    full = {n: c for n, c in layer_channels(model).items() if n in widths}
    ratios = _width_ratios(widths, full)
    if not ratios:
        return history
    opts = {**common, "layer_ratios": ratios, "global_pruning": False, "round_to": 1, "head_ratio": 0.0,
            "narrow_heads": True}
    history += run_schedule(model, example_input, ratio=0.0, between_steps=between_steps, progress=progress, **opts)
    got = {n: c for n, c in layer_channels(model).items() if n in widths}
    if got != widths:
        raise PipelineError(f"prune: torch-pruning kept {got} channels where the latency search chose {widths}")
    return history


def _rung_model(unpruned, example_input, widths: dict[str, int], common: dict, between_steps):
    """A back-off rung: (widths, the unpruned model narrowed to them, its replayable history)."""
    m = copy.deepcopy(unpruned)
    return widths, m, _apply_widths(m, example_input, widths, common, between_steps)


def _replay(model, example_input, widths: dict[str, int], common: dict, between_steps, progress) -> list:
    """Prune to exactly ``widths`` (a recorded pick); a group the model does not have, or a width
    outside 1..its channels, is one line naming it."""
    groups, _ = latency_groups(model, example_input, common)
    channels = {g.name: g.channels for g in groups}
    for name, w in widths.items():
        if name not in channels:
            raise PipelineError(f"prune.widths: the model has no prunable group {name!r} "
                                f"(groups: {', '.join(sorted(channels)) or 'none'})")
        if not 1 <= int(w) <= channels[name]:
            raise PipelineError(f"prune.widths: {name} has {channels[name]} channels; a kept width must be in "
                                f"1..{channels[name]}, got {w}")
    narrowed = {n: int(w) for n, w in widths.items() if int(w) < channels[n]}
    return _apply_widths(model, example_input, narrowed, common, between_steps, progress)


def latency_groups(model, example_input, common: dict) -> tuple[list, list[str]]:
    """The groups the pruner would rank (torch-pruning's own group objects, same ignored layers), with
    their channels' importance, then a head group per attention (prune_heads); attention groups' and
    grouped channels' widths are left whole (their names, and the head groups that cannot be cut)."""
    m = copy.deepcopy(model)
    names = {mod: n for n, mod in m.named_modules()}
    groups, skipped = [], []
    try:
        pruner, attentions = ranking_pruner(m, example_input, common)
        with torch.enable_grad():
            for group in pruner.DG.get_all_groups(ignored_layers=pruner.ignored_layers,
                                                  root_module_types=pruner.root_module_types):
                root = group[0].dep.target.module
                name = names.get(root, type(root).__name__)
                if pruner._is_atten_group(group)[0] or pruner._get_channel_groups(group) > 1:
                    skipped.append(name)
                    continue
                scores = pruner.estimate_importance(group)
                if scores is None:
                    skipped.append(name)
                    continue
                n = int(pruner.DG.get_out_channels(root))
                floor = max(1, math.ceil(n * (1.0 - common["max_layer_ratio"]) - 1e-9))
                groups.append(latency.Group(name, n, tuple(sorted(float(v) for v in scores)), floor))
            head_groups, no_heads = heads.head_groups(pruner, attentions, common["max_layer_ratio"])
    except PipelineError:
        raise
    except Exception as e:  # noqa: BLE001 - torch-pruning's failures are tracebacks deep in its graph code
        raise PipelineError(f"prune: torch-pruning failed while listing groups ({brief(e)})") from None
    return groups + head_groups, skipped + no_heads


def _latency_search(model, example_input, common, *, batch, threads, backend, block, speedup, latency_ms,
                    verify_processes, log, options=None) -> latency.LatencySearch:
    from edgerun.machine import simd_block
    groups, skipped = latency_groups(model, example_input, common)
    # variants differ only in shape: a cheap importance picks their channels (latency ignores which)
    cheap = {**common, "importance": "l1", "iterative_steps": 1, "taylor_batches": []}
    x = batch_of(example_input, batch)
    o = options or latency.SearchOptions()

    def build_variant(widths):
        v = copy.deepcopy(model)
        _apply_widths(v, example_input, {n: w for n, w in widths.items()}, cheap)
        return v
    opener = None
    if backend == "tensorrt":   # NOT executed here (no GPU, no TensorRT): see prune_timer.tensorrt_opener
        from pipeline.prune_timer import tensorrt_opener
        opener = tensorrt_opener(batch, tuple(x.shape[1:]))
    return latency.search(groups, build_variant=build_variant, export=lambda m, p: export_for_timing(m, x, p),
                          x=x.numpy(), block=block or simd_block(), speedup=speedup, latency_ms=latency_ms,
                          backend=backend, threads=threads, opener=opener, verify_processes=verify_processes,
                          skipped=tuple(skipped), log=log, goal_mode=o.goal, budget_s=o.budget_s, backoff=o.backoff,
                          export_shipped=o.export)
