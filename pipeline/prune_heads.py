"""Whole attention heads as candidates of the latency search (prune.target = "speedup" | "latency_ms").

A head group is a ``prune_latency.Group`` whose "channels" are heads: named ``<attention module>#heads``,
its width is the number of heads kept (head_dim stays whole), and each head's importance is the sum of
its channels' scores under the pruner's importance (prune_attention.head_importance, the ranking
``remove_heads`` uses for ``prune.head_ratio``). The search times head widths in the same whole-model
tables as channel widths, so a transformer's speed comes from heads and MLP widths together.

Forms (prune_attention.find_attention):
  * qkv and q/k/v modules: one head group per attention module;
  * ``nn.MultiheadAttention``: its embed_dim is also the residual width, so every MHA on one residual
    stream loses the same heads; one head group per stream, named after its first MHA.
Not candidates (listed in the search's skipped groups): heads an output the pruner keeps depends on,
and grouped-query attention (fewer key/value heads than query heads): removing a query head there must
remove its whole key/value group, which torch-pruning's graph does not map (the k/v repeat is opaque
to it); asking for such a head width is an error.
"""
from __future__ import annotations

import math

import torch.nn as nn

from edgerun.errors import brief
from pipeline import prune_attention as attn
from pipeline.errors import PipelineError
from pipeline.prune_greedy import HEADS_SUFFIX as SUFFIX
from pipeline.prune_greedy import Group
from pipeline.prune_store import json_history

KV_HEAD_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads", "kv_heads")


def grouped_query(a: attn.Attention) -> str | None:
    """Why ``a`` is grouped-query attention (its key/value heads differ from its query heads), or None."""
    for key in KV_HEAD_ATTRS:
        kv = getattr(a.module, key, None)
        if isinstance(kv, int) and kv != a.module.num_heads:
            return f"{kv} key/value heads for {a.module.num_heads} query heads"
    if a.kind == "q_k_v" and len({lin.out_features for lin in a.projections}) > 1:
        q, k, v = (lin.out_features for lin in a.projections)
        return f"q/k/v widths {q}/{k}/{v}"
    return None


def head_groups(pruner, attentions: list[attn.Attention], max_layer_ratio: float) -> tuple[list[Group], list[str]]:
    """A head group per attention the pruner may cut (importance per head, ascending), and the names of
    those it may not, with why. ``max_layer_ratio`` bounds heads as it bounds channels (>= 1 head)."""
    groups, skipped = [], []
    for site in attn.head_sites(pruner, attentions):
        name = site.attention.name + SUFFIX
        why = grouped_query(site.attention) or ("an output the pruner keeps reads them" if site.kept else None)
        if why:
            skipped.append(f"{name} ({why})")
            continue
        floor = max(1, math.ceil(site.heads * (1.0 - max_layer_ratio) - 1e-9))
        groups.append(Group(name, site.heads, tuple(sorted(attn.head_importance(pruner, site))), floor))
    return groups, skipped


def keep_heads(model: nn.Module, pruner, attentions: list[attn.Attention], keep: dict[str, int]) -> list:
    """Cut each head group in ``keep`` ({"<module>#heads": heads kept}) to that many heads, the least
    important ones going (by ``pruner``'s importance); returns the replayable history of the cuts."""
    sites = {}
    try:
        for site in attn.head_sites(pruner, attentions):
            name = site.attention.name + SUFFIX
            sites[name] = site.heads
            if name not in keep:
                continue
            want = keep[name]
            why = grouped_query(site.attention) or ("an output the pruner keeps reads them" if site.kept else None)
            if why:
                raise PipelineError(f"prune: the heads of {site.attention.name} cannot be removed ({why}); "
                                    "list it in prune.ignored_layers")
            if not (isinstance(want, int) and 1 <= want <= site.heads):
                raise PipelineError(f"prune: {name} must keep 1 to {site.heads} heads, got {want!r}")
            attn.cut_heads(pruner, site, site.heads - want)
        attn.sync_attributes(model, attentions, pruner.num_heads)
        attn.check_consistent(attentions)
    except PipelineError:
        raise
    except Exception as e:  # noqa: BLE001 - torch-pruning's failures are tracebacks deep in its graph code
        raise PipelineError(f"prune: torch-pruning failed while removing heads ({brief(e)})") from None
    unknown = sorted(set(keep) - set(sites))
    if unknown:
        raise PipelineError(f"prune: no attention heads to prune named {unknown[0]!r} "
                            f"(head groups: {', '.join(sorted(sites)) or 'none'})")
    got = {n: h[0] for n, h in _heads_now(attentions).items() if n in keep}
    if got != keep:
        raise PipelineError(f"prune: torch-pruning kept {got} heads where the latency search chose {keep}")
    model.zero_grad(set_to_none=True)  # Taylor's gradients ranked the heads; nothing after may read them
    return json_history(pruner.pruning_history())


def _heads_now(attentions: list[attn.Attention]) -> dict[str, tuple[int, int]]:
    return {a.name + SUFFIX: a.heads() for a in attentions}
