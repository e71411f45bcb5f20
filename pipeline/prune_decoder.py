"""Width pruning of a Hugging Face LLaMA-family causal LM, to shapes the target's kernels accept.

What goes: MLP channels (the same count in every layer, since an HF config holds one intermediate_size;
which channels go is chosen per layer), whole query heads inside each GQA group (the same number of query
heads per KV head in every group and layer; KV heads and head_dim stay, so the KV cache layout and the
attention kernels' head size are unchanged), and optionally whole layers. The model stays a valid HF model:
``model.config`` is updated (``head_dim`` written explicitly, since hidden/heads no longer gives it), so
``save_pretrained`` / ``from_pretrained`` reproduce it.

Importance is first-order Taylor on the task's own loss (|w * dL/dw| summed over each channel's or head's
weights, over a few calibration batches): a channel the task never uses scores zero however large its
weights. ``prune_magnitude_uniform`` is the peer recipe (torch-pruning's LLM example: L2 magnitude, the
same widths, no data) for the benchmark to compare against. It is a plain L2 selection written here, not
torch-pruning itself: torch-pruning's graph does not see the k/v repeat of grouped-query attention (see
pipeline/prune_heads.py), and on these modules its selection reduces to the same per-group L2 norms.

Families: LlamaForCausalLM, Qwen2ForCausalLM, MistralForCausalLM (separate q/k/v/o and gate/up/down
Linears). Phi-3's fused qkv_proj / gate_up_proj are refused with one line.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from edgerun import llm_preflight
from edgerun.errors import EdgeError, brief
from pipeline.errors import PipelineError

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
FUSED = ("qkv_proj", "gate_up_proj")      # Phi-3's layout


@dataclass(frozen=True)
class DecoderWidths:
    """The widths pruning can change (intermediate, q_heads, layers) and those it keeps."""
    hidden: int
    layers: int
    intermediate: int
    q_heads: int
    kv_heads: int
    head_dim: int

    @property
    def q_per_kv(self) -> int:
        return self.q_heads // self.kv_heads

    def replace(self, **changes) -> DecoderWidths:
        return dataclasses.replace(self, **changes)

    def config_dict(self) -> dict:
        """The Hugging Face config keys these widths set (what llm_preflight.check_decoder_shapes reads)."""
        return {"hidden_size": self.hidden, "intermediate_size": self.intermediate,
                "num_attention_heads": self.q_heads, "num_key_value_heads": self.kv_heads,
                "head_dim": self.head_dim, "num_hidden_layers": self.layers}


@dataclass
class Importance:
    """Per-layer scores, higher = keep: ``mlp[i]`` one per MLP channel, ``heads[i]`` one per query head,
    ``layers`` one per decoder layer. ``kind``: "taylor" or "magnitude"."""
    kind: str
    mlp: list[torch.Tensor]
    heads: list[torch.Tensor]
    layers: torch.Tensor


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The model's decoder layers, after checking it has the modules this pruner rewrites."""
    name = type(model).__name__
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not len(layers) or getattr(model, "config", None) is None:
        raise PipelineError(f"prune: {name} is not a Hugging Face causal LM with model.layers and a config; "
                            "decoder pruning takes LlamaForCausalLM, Qwen2ForCausalLM or MistralForCausalLM")
    first = layers[0]
    attn, mlp = getattr(first, "self_attn", None), getattr(first, "mlp", None)
    fused = [f for f in FUSED if hasattr(attn, f) or hasattr(mlp, f)]
    if fused:
        raise PipelineError(f"prune: {name} has fused {' and '.join(fused)} (Phi-3 layout), which decoder pruning "
                            "does not split; use a LLaMA, Qwen2 or Mistral model")
    missing = [f"self_attn.{p}" for p in ATTN if not isinstance(getattr(attn, p, None), nn.Linear)]
    missing += [f"mlp.{p}" for p in MLP if not isinstance(getattr(mlp, p, None), nn.Linear)]
    if missing:
        raise PipelineError(f"prune: {name} cannot be decoder-pruned: its layers lack Linear {', '.join(missing)}")
    return layers


def _layer_widths(layer: nn.Module, head_dim: int) -> tuple[int, int, int]:
    a, m = layer.self_attn, layer.mlp
    return m.gate_proj.out_features, a.q_proj.out_features // head_dim, a.k_proj.out_features // head_dim


def decoder_widths(model: nn.Module) -> DecoderWidths:
    """The model's widths as its weights say; a model whose layers differ is refused (an HF config holds one
    number per width)."""
    layers = _decoder_layers(model)
    cfg = model.config
    head_dim = int(getattr(layers[0].self_attn, "head_dim", 0) or getattr(cfg, "head_dim", 0)
                   or cfg.hidden_size // cfg.num_attention_heads)
    shapes = {_layer_widths(layer, head_dim) for layer in layers}
    if len(shapes) != 1:
        raise PipelineError(f"prune: the layers of {type(model).__name__} differ in (intermediate, q heads, kv heads): "
                            f"{sorted(shapes)}; an HF config holds one width for all layers")
    inter, q, kv = shapes.pop()
    return DecoderWidths(hidden=int(cfg.hidden_size), layers=len(layers), intermediate=inter, q_heads=q,
                         kv_heads=kv, head_dim=head_dim)


def _config_with(model: nn.Module, w: DecoderWidths) -> dict:
    d = model.config.to_dict()
    d.update(w.config_dict())
    if isinstance(d.get("layer_types"), list):
        d["layer_types"] = d["layer_types"][: w.layers]    # only the length matters for validation
    return d


def width_problems(model: nn.Module, w: DecoderWidths, target: str | None, *, int4_group: int | None) -> list[str]:
    """Why the model cannot be pruned to ``w`` (for ``target``'s kernels when given); empty when it can."""
    now = decoder_widths(model)
    kept = [k for k in ("hidden", "kv_heads", "head_dim") if getattr(w, k) != getattr(now, k)]
    if kept:
        return [f"{', '.join(kept)} cannot change ({now}); only intermediate, q_heads and layers are pruned"]
    problems = [f"{k} {getattr(w, k)} is not between {low} and the model's {getattr(now, k)}"
                for k, low in (("intermediate", 1), ("q_heads", now.kv_heads), ("layers", 1))
                if not low <= getattr(w, k) <= getattr(now, k)]
    if w.q_heads % w.kv_heads:
        problems.append(f"q_heads {w.q_heads} is not a multiple of the {w.kv_heads} KV heads "
                        "(every KV group keeps the same number of query heads)")
    if problems:
        return problems
    try:    # the family's own rules (transformers 5's LlamaConfig wants hidden_size % num_attention_heads == 0)
        type(model.config).from_dict(_config_with(model, w))
    except Exception as e:  # noqa: BLE001 - transformers raises its own validation error types
        problems.append(f"{type(model.config).__name__} refuses these widths ({brief(e)})")
    if target is not None:
        problems += llm_preflight.check_decoder_shapes(w.config_dict(), target, int4_group=int4_group)
    return problems


def legal_widths(model: nn.Module, target: str, *, int4_group: int | None, mlp_steps: int = 8,
                 layers: int | None = None) -> list[DecoderWidths]:
    """Candidate widths for a latency search, each one ``prune_decoder`` accepts for ``target``: MLP widths
    at ``mlp_steps`` even fractions of the model's, rounded down to a multiple of the INT4 group (of 64
    without INT4), times every whole query-heads-per-KV-head ratio; ``layers`` kept (default: all).
    Widest first. Empty when nothing fits (e.g. a hidden size that is not a multiple of the group)."""
    try:
        llm_preflight.limits(target)
    except EdgeError as e:
        raise PipelineError(f"prune: {e}") from None
    if not (isinstance(mlp_steps, int) and mlp_steps >= 1):
        raise PipelineError(f"prune: mlp_steps must be a positive integer, got {mlp_steps!r}")
    now = decoder_widths(model)
    unit = int4_group or 64
    inters = sorted({now.intermediate * k // mlp_steps // unit * unit for k in range(1, mlp_steps + 1)} - {0},
                    reverse=True)
    out = []
    for inter in inters:
        for ratio in range(now.q_per_kv, 0, -1):
            w = now.replace(intermediate=inter, q_heads=ratio * now.kv_heads, layers=layers or now.layers)
            if not width_problems(model, w, target, int4_group=int4_group):
                out.append(w)
    return out


def _head_sum(t: torch.Tensor, heads: int, dim: int) -> torch.Tensor:
    """Per-head sums of a q_proj (dim 0: rows) or o_proj (dim 1: columns) weight-sized tensor."""
    if dim == 0:
        return t.reshape(heads, -1).sum(1)
    return t.reshape(t.shape[0], heads, -1).sum((0, 2))


def _scores(model: nn.Module, score: Callable[[torch.Tensor], torch.Tensor | None], kind: str) -> Importance:
    """Per-channel, per-head and per-layer sums of ``score(param)`` (an elementwise tensor or None)."""
    w = decoder_widths(model)
    mlp, heads, per_layer = [], [], []
    for layer in _decoder_layers(model):
        m, a = layer.mlp, layer.self_attn
        s = torch.zeros(w.intermediate)
        # (tensor, the axis that is not the channel's): gate/up rows and biases, down columns
        for p, other in ((m.gate_proj.weight, 1), (m.up_proj.weight, 1), (m.down_proj.weight, 0),
                         (m.gate_proj.bias, None), (m.up_proj.bias, None)):
            v = score(p) if p is not None else None
            if v is not None:
                s += (v if other is None else v.sum(other)).float().cpu()
        mlp.append(s)
        h = torch.zeros(w.q_heads)
        for p, dim in ((a.q_proj.weight, 0), (a.q_proj.bias, 0), (a.o_proj.weight, 1)):
            v = score(p) if p is not None else None
            if v is not None:
                h += _head_sum(v, w.q_heads, dim).float().cpu()
        heads.append(h)
        total = [score(p) for p in layer.parameters()]
        per_layer.append(float(sum(v.sum().item() for v in total if v is not None)))
    return Importance(kind, mlp, heads, torch.tensor(per_layer))


def taylor_importance(model: nn.Module, loss_fn: Callable[[nn.Module, object], torch.Tensor],
                      batches: Iterable, *, owner: nn.Module | None = None) -> Importance:
    """First-order Taylor importance on the task's loss: for each batch, ``loss_fn(owner, batch)`` (a scalar
    tensor) is backpropagated and |w * grad| is summed per MLP channel, query head and layer of ``model``,
    over batches. Per-batch absolute values, so gradients of different batches cannot cancel.
    ``owner``: the module ``loss_fn`` runs, ``model`` by default; a vision-language model holding ``model`` as
    its decoder, so that the loss is the VLM's own answer loss with image embeddings in the decoder's input.
    It must contain ``model``. Leaves no gradients behind, on ``owner`` either."""
    _decoder_layers(model)
    owner = model if owner is None else owner
    if not any(m is model for m in owner.modules()):
        raise PipelineError(f"prune: the owner ({type(owner).__name__}) given to Taylor importance does not contain "
                            f"the decoder ({type(model).__name__}) it scores")
    total: Importance | None = None
    n = 0
    was_training = owner.training
    owner.eval()       # dropout off: the scores are about the model that will run
    try:
        for batch in batches:
            owner.zero_grad(set_to_none=True)
            with torch.enable_grad():
                loss = loss_fn(owner, batch)
                if not (isinstance(loss, torch.Tensor) and loss.numel() == 1 and loss.requires_grad):
                    raise PipelineError("prune: loss_fn must return a scalar tensor that depends on the model's "
                                        f"weights, got {type(loss).__name__}")
                if not torch.isfinite(loss.detach()):
                    raise PipelineError(f"prune: the calibration loss is not finite ({loss.item()}) on batch {n}")
                loss.backward()
            step = _scores(model, lambda p: None if p.grad is None else (p.detach() * p.grad).abs(), "taylor")
            total = step if total is None else Importance(
                "taylor", [a + b for a, b in zip(total.mlp, step.mlp, strict=True)],
                [a + b for a, b in zip(total.heads, step.heads, strict=True)], total.layers + step.layers)
            n += 1
    finally:
        owner.zero_grad(set_to_none=True)
        owner.train(was_training)
    if total is None:
        raise PipelineError("prune: Taylor importance needs at least one calibration batch, got none")
    return total


def magnitude_importance(model: nn.Module) -> Importance:
    """Squared L2 norm of each channel's and head's weights (what torch-pruning's magnitude importance sums)."""
    with torch.no_grad():
        return _scores(model, lambda p: p.detach() ** 2, "magnitude")


def _take(lin: nn.Linear, idx: torch.Tensor, dim: int) -> None:
    """Keep rows (dim 0: outputs, and the bias) or columns (dim 1: inputs) ``idx`` of ``lin``, in place."""
    idx = idx.to(lin.weight.device)
    lin.weight = nn.Parameter(lin.weight.detach().index_select(dim, idx).clone(),
                              requires_grad=lin.weight.requires_grad)
    if dim == 0:
        lin.out_features = len(idx)
        if lin.bias is not None:
            lin.bias = nn.Parameter(lin.bias.detach()[idx].clone(), requires_grad=lin.bias.requires_grad)
    else:
        lin.in_features = len(idx)


def _top(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the ``k`` highest scores, in their original order (ties keep the earlier index)."""
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    return torch.tensor(sorted(order[:k]), dtype=torch.long)


def _prune_heads(attn: nn.Module, scores: torch.Tensor, now: DecoderWidths, ratio: int) -> None:
    groups = scores.reshape(now.kv_heads, now.q_per_kv)     # repeat_kv: query head h reads KV head h // ratio
    heads = torch.cat([g * now.q_per_kv + _top(groups[g], ratio) for g in range(now.kv_heads)])
    rows = (heads[:, None] * now.head_dim + torch.arange(now.head_dim)).reshape(-1)
    _take(attn.q_proj, rows, 0)
    _take(attn.o_proj, rows, 1)
    attn.num_key_value_groups = ratio
    for name in ("num_heads", "num_attention_heads"):
        if isinstance(getattr(attn, name, None), int):
            setattr(attn, name, ratio * now.kv_heads)


def _layers_to_drop(importance: Importance, now: DecoderWidths, want: int, drop: Sequence[int] | None) -> list[int]:
    if drop is None:
        return sorted(_top(-importance.layers, now.layers - want).tolist()) if want < now.layers else []
    drop = sorted(drop)
    if len(set(drop)) != len(drop) or not all(isinstance(i, int) and 0 <= i < now.layers for i in drop):
        raise PipelineError(f"prune: drop_layers must be distinct layer indices 0-{now.layers - 1}, got {drop}")
    if now.layers - len(drop) != want:
        raise PipelineError(f"prune: dropping {len(drop)} of {now.layers} layers leaves {now.layers - len(drop)}, "
                            f"but the target widths keep {want}")
    return drop


def prune_decoder(model: nn.Module, widths: DecoderWidths, importance: Importance, *, target: str | None,
                  int4_group: int | None = None, drop_layers: Sequence[int] | None = None) -> nn.Module:
    """Prune ``model`` in place to ``widths`` keeping what ``importance`` ranks highest: per layer the top
    MLP channels, in each KV group the top query heads; then drop ``drop_layers`` (default, when
    ``widths.layers`` is below the model's: the lowest-importance layers). Updates ``model.config``.
    Refused (one line): widths the family or ``target``'s kernels do not accept (``target`` None: only the
    family's rules), or wider than the model. Returns the model."""
    now = decoder_widths(model)
    problems = width_problems(model, widths, target, int4_group=int4_group)
    if problems:
        raise PipelineError(f"prune: cannot prune {type(model).__name__} to {widths.config_dict()}: {problems[0]}"
                            + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
    layers = _decoder_layers(model)
    if len(importance.mlp) != now.layers or any(len(s) != now.intermediate for s in importance.mlp) or any(
            len(s) != now.q_heads for s in importance.heads) or len(importance.layers) != now.layers:
        raise PipelineError("prune: the importance scores were computed on a model of other widths; recompute them")
    drop = _layers_to_drop(importance, now, widths.layers, drop_layers)
    with torch.no_grad():
        for i, layer in enumerate(layers):
            if widths.intermediate < now.intermediate:
                keep = _top(importance.mlp[i], widths.intermediate)
                _take(layer.mlp.gate_proj, keep, 0)
                _take(layer.mlp.up_proj, keep, 0)
                _take(layer.mlp.down_proj, keep, 1)
                if isinstance(getattr(layer.mlp, "intermediate_size", None), int):
                    layer.mlp.intermediate_size = widths.intermediate
            if widths.q_heads < now.q_heads:
                _prune_heads(layer.self_attn, importance.heads[i], now, widths.q_per_kv)
    if drop:
        kept = [layer for i, layer in enumerate(layers) if i not in set(drop)]
        model.model.layers = nn.ModuleList(kept)
        for i, layer in enumerate(kept):     # the KV cache is indexed by layer_idx
            layer.self_attn.layer_idx = i
            if hasattr(layer, "layer_idx"):
                layer.layer_idx = i
        types = getattr(model.config, "layer_types", None)
        if isinstance(types, list):
            model.config.layer_types = [t for i, t in enumerate(types) if i not in set(drop)]
    cfg = model.config
    cfg.intermediate_size, cfg.num_attention_heads = widths.intermediate, widths.q_heads
    cfg.head_dim, cfg.num_hidden_layers = widths.head_dim, widths.layers
    got = decoder_widths(model)
    if got != widths:       # a bug here, not the user's: the weights must say what the config says
        raise AssertionError(f"decoder pruning produced {got}, asked {widths}")
    return model


def prune_magnitude_uniform(model: nn.Module, widths: DecoderWidths, *, target: str | None = None,
                            int4_group: int | None = None) -> nn.Module:
    """The peer recipe (torch-pruning's LLM example): the same widths chosen by L2 magnitude alone, no data,
    no distillation. Layers are not dropped (that recipe keeps depth). Prunes in place; returns the model."""
    if widths.layers != decoder_widths(model).layers:
        raise PipelineError("prune: the magnitude recipe keeps every layer; set layers to the model's count")
    return prune_decoder(model, widths, magnitude_importance(model), target=target, int4_group=int4_group)
