"""Attention heads for torch-pruning: find them wherever they live, keep every width a multiple of the
head count, remove whole heads, and keep the modules' head attributes true.

Three forms are recognised:
  * ``"mha"``: torch's ``nn.MultiheadAttention`` (also inside ``nn.TransformerEncoderLayer``). Its
    ``embed_dim`` is both the residual width and the attention width, so torch-pruning puts every MHA
    on one residual stream into one group. torch-pruning 1.6.1's own MHA pruner keeps ``num_heads`` and
    asserts divisibility, which fails on the first odd channel count. ``MhaPruner`` replaces it: it
    declares ``num_heads`` channel groups (so each head loses the same number of dims), and when the
    removed dims are whole heads it lowers ``num_heads`` instead. Because the pruner itself derives the
    heads from the indices it is given, replaying a pruning history reproduces them.
  * ``"qkv"``: a module with an int ``num_heads`` and one fused ``qkv`` ``nn.Linear`` (timm's ViT).
  * ``"q_k_v"``: a module with an int ``num_heads`` and separate q/k/v Linears (``q``/``k``/``v``,
    ``q_proj``/``k_proj``/``v_proj`` or ``query``/``key``/``value``).
For the last two, torch-pruning is told the heads (``num_heads={linear: heads}``), which makes it
narrow every head alike; the module's ``num_heads``/``head_dim``/``embed_dim`` attributes are
rewritten after every step (forward must reshape with -1 or these attributes, never with stored
widths). Whole heads of every form are removed by ``remove_heads`` below.

Narrowing heads changes nn.MultiheadAttention's softmax scale (it is 1/sqrt(head_dim), computed at
run time); removing whole heads keeps it. Fine-tuning absorbs either.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.pruner.function import MultiheadAttentionPruner

from pipeline.errors import PipelineError

SEPARATE_NAMES = (("q", "k", "v"), ("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))


@dataclass(frozen=True)
class Attention:
    """One attention module: its name, the module, its form and the Linears (or the MHA) that hold its heads."""
    name: str
    module: nn.Module
    kind: str                           # "mha" | "qkv" | "q_k_v"
    projections: tuple[nn.Module, ...]  # (the MHA,) | (qkv,) | (q, k, v)

    def heads(self) -> tuple[int, int]:
        """(num_heads, head_dim) as the weights say."""
        m = self.module
        if self.kind == "mha":
            return int(m.num_heads), int(m.embed_dim) // int(m.num_heads)
        width = self.projections[0].out_features // (3 if self.kind == "qkv" else 1)
        return int(m.num_heads), width // int(m.num_heads)


def find_attention(model: nn.Module) -> list[Attention]:
    out = []
    for name, m in model.named_modules():
        if isinstance(m, nn.MultiheadAttention):
            out.append(Attention(name, m, "mha", (m,)))
            continue
        if not isinstance(getattr(m, "num_heads", None), int):
            continue
        if isinstance(getattr(m, "qkv", None), nn.Linear):
            out.append(Attention(name, m, "qkv", (m.qkv,)))
            continue
        for names in SEPARATE_NAMES:
            linears = tuple(getattr(m, n, None) for n in names)
            if all(isinstance(lin, nn.Linear) for lin in linears):
                out.append(Attention(name, m, "q_k_v", linears))
                break
    return out


def check_supported(attentions: list[Attention]) -> None:
    for a in attentions:
        if a.kind == "mha" and not a.module._qkv_same_embed_dim:
            raise PipelineError(f"prune: {a.name or 'the model'} is an nn.MultiheadAttention with kdim/vdim "
                                f"({a.module.kdim}/{a.module.vdim}) different from embed_dim ({a.module.embed_dim}), "
                                "which torch-pruning cannot prune; list it in prune.ignored_layers")


class MhaPruner(MultiheadAttentionPruner):
    """torch-pruning's nn.MultiheadAttention pruner, made head-aware (see the module docstring)."""

    @staticmethod
    def new_heads(layer: nn.MultiheadAttention, idxs) -> tuple[int, int]:
        """(num_heads, head_dim) after removing ``idxs`` from ``embed_dim``: the same number of dims from
        every head (narrowing) or whole heads; anything else would leave heads of different widths."""
        heads, head_dim = layer.num_heads, layer.embed_dim // layer.num_heads
        per_head = [0] * heads
        for i in set(int(i) for i in idxs):
            per_head[i // head_dim] += 1
        if all(c in (0, head_dim) for c in per_head) and any(per_head):
            return heads - per_head.count(head_dim), head_dim
        if len(set(per_head)) == 1:
            return heads, head_dim - per_head[0]
        raise PipelineError(f"prune: removing {len(set(idxs))} of the {layer.embed_dim} channels of an "
                            f"nn.MultiheadAttention with {heads} heads would leave heads of different widths "
                            f"(per head: {per_head})")

    def check(self, layer, idxs, to_output):
        tp.pruner.function.BasePruningFunc.check(self, layer, idxs, to_output)
        self.new_heads(layer, idxs)

    def prune_out_channels(self, layer: nn.MultiheadAttention, idxs: list) -> nn.Module:
        heads, _ = self.new_heads(layer, idxs)
        layer.num_heads = heads  # before the parent's surgery: it derives head_dim from num_heads
        super().prune_out_channels(layer, idxs)
        layer._qkv_same_embed_dim = layer.kdim == layer.embed_dim and layer.vdim == layer.embed_dim
        return layer

    prune_in_channels = prune_out_channels  # one dimension: torch-pruning's intra-layer dependency

    def get_out_channel_groups(self, layer):
        return layer.num_heads

    def get_in_channel_groups(self, layer):
        return layer.num_heads


def customized_pruners() -> dict:
    """For torch-pruning's ``customized_pruners``: a fresh instance (torch-pruning sets state on it)."""
    return {nn.MultiheadAttention: MhaPruner()}


def torch_pruning_heads(attentions: list[Attention]) -> dict[nn.Module, int]:
    """``num_heads`` for torch-pruning: every q/k/v/qkv Linear with its module's head count, so that
    narrowing removes the same dims from every head (MHA declares its groups in MhaPruner instead)."""
    return {lin: int(a.module.num_heads) for a in attentions if a.kind != "mha" for lin in a.projections}


def sync_attributes(model: nn.Module, attentions: list[Attention], tp_heads: dict | None = None) -> None:
    """Rewrite num_heads/head_dim/embed_dim of qkv and q/k/v modules from their (pruned) Linears, and the
    model-level mirror (ViTSmall.num_heads/head_dim) when there is one; MhaPruner keeps MHAs true itself."""
    for a in attentions:
        if a.kind == "mha":
            continue
        m = a.module
        if tp_heads is not None and a.projections[0] in tp_heads:
            m.num_heads = int(tp_heads[a.projections[0]])
        _, m.head_dim = a.heads()
        if isinstance(getattr(m, "embed_dim", None), int):
            m.embed_dim = m.num_heads * m.head_dim
    if attentions and not any(a.module is model for a in attentions):
        first = attentions[0]
        for attr, value in zip(("num_heads", "head_dim"), first.heads(), strict=True):
            if isinstance(getattr(model, attr, None), int):
                setattr(model, attr, value)


def check_consistent(attentions: list[Attention]) -> None:
    """Every attention's widths are whole heads (a pruner bug or an odd round_to would show here)."""
    for a in attentions:
        m, (heads, head_dim) = a.module, a.heads()
        if a.kind == "mha":
            e = m.embed_dim
            ok = (heads * head_dim == e and m.in_proj_weight is not None
                  and tuple(m.in_proj_weight.shape) == (3 * e, e) and m.out_proj.in_features == e)
        else:
            widths = [lin.out_features for lin in a.projections]
            ok = heads >= 1 and all(w % heads == 0 for w in widths) and getattr(m, "head_dim", head_dim) == head_dim
        if not ok:
            raise PipelineError(f"prune: after pruning, {a.name} ({type(m).__name__}) has widths that are not whole "
                                f"heads ({heads} heads); try round_to=1 or list it in prune.ignored_layers")


def head_table(attentions: list[Attention]) -> dict[str, dict]:
    return {a.name: dict(zip(("num_heads", "head_dim"), a.heads(), strict=True), kind=a.kind) for a in attentions}


def restore_attributes(model: nn.Module, saved: dict[str, dict]) -> None:
    """After a history replay: put back the saved num_heads/head_dim of qkv and q/k/v modules."""
    modules = dict(model.named_modules())
    for name, attrs in saved.items():
        m = modules.get(name)
        if m is None or isinstance(m, nn.MultiheadAttention):
            continue  # MhaPruner replays MHA heads from the indices themselves
        for k in ("num_heads", "head_dim"):
            if k in attrs:
                setattr(m, k, int(attrs[k]))
        if isinstance(getattr(m, "embed_dim", None), int):
            m.embed_dim = m.num_heads * m.head_dim


# ------------------------------------------------------------------------------------- whole heads
# Whole heads are removed here for every form, not by torch-pruning: its own head removal (qkv and
# q/k/v only) silently does nothing when the width ratio of the step is 0, and compounds over
# iterative steps (0.25 of 4 heads in two steps removed 2). The removals go through the pruner's
# dependency graph, so they are in its pruning history and replay like any other.
def heads_to_remove(heads0: int, head_ratio: float, step: int, steps: int) -> int:
    """Heads removed in total after ``step`` (0-based) of ``steps``: a linear schedule, rounded up,
    never all of them."""
    return min(heads0 - 1, math.ceil(head_ratio * heads0 * (step + 1) / steps - 1e-9))


def _kept_out(dg, group, ignored) -> bool:
    return any(dg.is_out_channel_pruning_fn(dep.handler) and dep.target.module in ignored for dep, _ in group)


@dataclass(frozen=True)
class HeadSite:
    """Where whole heads of one attention are cut: the dependency group over all its heads' channels,
    rooted at the MHA or at the layer reading a qkv / q-k-v attention's output (where torch-pruning's
    index mapping from heads to qkv rows is right), and every MHA sharing those channels."""
    attention: Attention
    root: nn.Module
    fn: object                      # the root's pruning function
    group: object                   # torch-pruning's group over every head channel
    heads: int
    head_dim: int
    mhas: tuple[nn.Module, ...]     # one residual stream's MHAs (they lose the same heads); () otherwise
    kept: bool                      # an output the pruner keeps (or a layer the user froze) reads them


def head_site(pruner, a: Attention, names: dict) -> HeadSite:
    dg = pruner.DG
    if a.kind == "mha":
        root, fn = a.module, dg.get_pruner_of_module(a.module).prune_out_channels
        group = dg.get_pruning_group(root, fn, list(range(root.embed_dim)))
        mhas = tuple(dep.target.module for dep, _ in group if isinstance(dep.target.module, nn.MultiheadAttention))
        shapes = {(m.num_heads, m.embed_dim) for m in mhas}
        if len(shapes) != 1:
            listed = ", ".join(f"{names.get(m, '?')} ({m.num_heads} heads)" for m in mhas)
            raise PipelineError(f"prune: these nn.MultiheadAttention share their channels but not their head count, "
                                f"so whole heads cannot be removed: {listed}")
        heads, embed = shapes.pop()
        head_dim = embed // heads
    else:
        (heads, head_dim), mhas = a.heads(), ()
        root = _output_projection(dg, a)
        fn = dg.get_pruner_of_module(root).prune_in_channels
        group = dg.get_pruning_group(root, fn, list(range(heads * head_dim)))
    return HeadSite(a, root, fn, group, heads, head_dim, mhas, _kept_out(dg, group, pruner.ignored_layers))


def head_importance(pruner, site: HeadSite) -> list[float]:
    """Each head's importance: the sum of its channels' scores under the pruner's importance (a head
    removed loses head_dim channels, so it weighs against channel groups channel for channel)."""
    return pruner.estimate_importance(site.group).view(site.heads, -1).sum(1).tolist()


def cut_heads(pruner, site: HeadSite, n: int) -> None:
    """Remove the ``n`` least important whole heads at ``site`` (none where it is kept)."""
    if n <= 0 or site.kept:
        return
    dg, a = pruner.DG, site.attention
    drop = sorted(torch.topk(torch.tensor(head_importance(pruner, site)), k=n, largest=False).indices.tolist())
    pruned = dg.get_pruning_group(site.root, site.fn, [h * site.head_dim + j for h in drop
                                                       for j in range(site.head_dim)])
    if not dg.check_pruning_group(pruned):
        return
    pruned.prune()  # MhaPruner lowers num_heads of every MHA in the group
    for m in site.mhas:  # later steps group channels by the new head count
        pruner.out_channel_groups[m] = pruner.in_channel_groups[m] = m.num_heads
    if not site.mhas:
        a.module.num_heads = site.heads - n
        for lin in a.projections:
            pruner.num_heads[lin] = pruner.out_channel_groups[lin] = a.module.num_heads


def _output_projection(dg, a: Attention):
    """The layer reading the attention's output (timm's proj, HF's out_proj), found in the graph."""
    lin = a.projections[0]
    group = dg.get_pruning_group(lin, dg.get_pruner_of_module(lin).prune_out_channels, list(range(lin.out_features)))
    for dep, _ in group:
        target = dep.target.module
        if (isinstance(target, (nn.Linear, nn.modules.conv._ConvNd)) and target not in a.projections
                and dg.is_in_channel_pruning_fn(dep.handler)):
            return target
    raise PipelineError(f"prune: cannot remove whole heads of {a.name}: no layer reads its output "
                        "(expected an output projection after the attention)")


def head_sites(pruner, attentions: list[Attention]):
    """One HeadSite per attention the pruner may touch (one per residual stream for MHAs), made when
    reached: a site made before an earlier one was cut would hold stale indices."""
    names = {a.module: a.name for a in attentions}
    done: set[nn.Module] = set()
    for a in attentions:
        if a.module in done or a.module in pruner.ignored_layers or a.projections[0] not in pruner.DG.module2node:
            continue
        site = head_site(pruner, a, names)
        done.update(site.mhas)
        yield site


def remove_heads(pruner, attentions: list[Attention], heads0: dict[nn.Module, int], head_ratio: float,
                 step: int, steps: int) -> None:
    """Remove the least important whole heads of every attention (by the pruner's importance), as far
    as the schedule asks for ``step`` of ``steps``. ``heads0``: each module's head count before pruning."""
    for site in head_sites(pruner, attentions):
        h0 = heads0[site.attention.module]
        cut_heads(pruner, site, heads_to_remove(h0, head_ratio, step, steps) - (h0 - site.heads))
