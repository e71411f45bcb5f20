"""What pruning may touch: the layers whose outputs are the model's outputs (kept), bare parameters
(a class token, position embeddings, layer scales), and the hint for graphs torch-pruning mis-indexes.

The rule for outputs: only the output channels of the layers that produce the model's outputs are
fixed. They are found by walking autograd back from each output to the nearest modules that own
parameters (parameter-free steps such as flatten, pooling, activations and dropout are walked
through), so a classifier ``Sequential`` keeps only its last layer's width: its hidden Linears and
norms stay prunable. After pruning, the output shapes are compared with the unpruned ones anyway.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch_pruning as tp

from pipeline.errors import PipelineError

WALK_LIMIT = 100_000  # autograd nodes visited per output before giving up (a graph that large is a bug)


def _tensors(out) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for o in out for t in _tensors(o)]
    return []


def output_shapes(model: nn.Module, example_input) -> list[tuple[int, ...]]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            return [tuple(t.shape) for t in _tensors(model(example_input))]
    finally:
        model.train(was_training)


def output_producers(model: nn.Module, example_input) -> list:
    """The modules (and bare parameters) whose output channels are the model's output channels."""
    # Leaf layers that own weights (and MHA, whose out_proj is never called as a module): stopping at a
    # container with a parameter of its own (a block's layer scale) would freeze the whole container.
    owners = [m for m in model.modules() if any(True for _ in m.parameters(recurse=False))
              and (isinstance(m, nn.MultiheadAttention) or not any(True for _ in m.children()))]
    produced: dict = {}  # autograd node of a module's output -> the module (innermost first)
    keep: list = []      # the outputs themselves, so that their autograd nodes stay alive

    def hook(mod, _inp, out):
        for t in _tensors(out):
            keep.append(t)
            if t.grad_fn is not None:
                produced.setdefault(t.grad_fn, mod)

    hooks = [m.register_forward_hook(hook) for m in owners]
    params = {id(p): p for p in model.parameters()}
    was_training = model.training
    try:
        model.eval()
        with torch.enable_grad():
            outputs = _tensors(model(example_input))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    found: list = []
    for out in outputs:
        stack, seen = [out.grad_fn], set()
        while stack and len(seen) < WALK_LIMIT:
            fn = stack.pop()
            if fn is None or fn in seen:
                continue
            seen.add(fn)
            if fn in produced:
                if produced[fn] not in found:
                    found.append(produced[fn])
                continue
            var = getattr(fn, "variable", None)  # AccumulateGrad: a parameter used directly
            if var is not None and id(var) in params:
                if not any(var is f for f in found):
                    found.append(params[id(var)])
                continue
            stack.extend(nxt for nxt, _ in fn.next_functions)
    return found


# ------------------------------------------------------------------------------------- bare parameters
def _wrapped_ids(model: nn.Module) -> set[int]:
    """Parameters that belong to a layer type torch-pruning prunes itself (its own test, repeated)."""
    registered = set(tp.pruner.function.PrunerBox)
    ids: set[int] = set()
    for m in model.modules():
        if tp.ops.module2type(m) in registered:
            ids.update(id(p) for p in m.parameters())
    return ids


def unwrapped_dims(model: nn.Module, overrides: dict[str, int] | None = None) -> dict[str, int | None]:
    """{name: channel dim} of every parameter outside the layers torch-pruning knows (a class token,
    position embeddings, layer scales). The default dim is torch-pruning's own: the last one larger
    than 1 (None: a scalar-like parameter, never pruned). ``overrides`` ({name: dim}) replace it."""
    wrapped = _wrapped_ids(model)
    dims: dict[str, int | None] = {}
    for name, p in model.named_parameters():
        if id(p) not in wrapped:
            big = [i for i, s in enumerate(p.shape) if s > 1]
            dims[name] = big[-1] if big else None
    for name, dim in (overrides or {}).items():
        if name not in dims:
            known = dict(model.named_parameters())
            why = "it belongs to a layer torch-pruning prunes itself" if name in known else "no such parameter"
            raise PipelineError(f"prune.unwrapped_parameters: {name!r} is not a bare parameter of the model ({why}); "
                                f"bare parameters: {', '.join(dims) or 'none'}")
        ndim = dict(model.named_parameters())[name].dim()
        if isinstance(dim, bool) or not isinstance(dim, int) or not -ndim <= dim < ndim:
            raise PipelineError(f"prune.unwrapped_parameters: {name} has {ndim} dims; got dim {dim!r}")
        dims[name] = dim % ndim
    return dims


def unwrapped_for_torch_pruning(model: nn.Module, dims: dict[str, int | None]) -> list[tuple]:
    params = dict(model.named_parameters())
    return [(params[n], d) for n, d in dims.items() if d is not None and n in params]


def unwrapped_report(before: dict[str, tuple], model: nn.Module) -> dict[str, str]:
    """How each bare parameter was treated: "pruned along dim d" or "kept"."""
    after = {n: tuple(p.shape) for n, p in model.named_parameters()}
    out = {}
    for name, shape in before.items():
        new = after.get(name, shape)
        dims = [i for i, (a, b) in enumerate(zip(shape, new, strict=False)) if a != b]
        out[name] = f"pruned along dim {dims[0]}" if dims else "kept"
    return out


# ------------------------------------------------------------------------------------- failure hints
def split_hint(dg) -> str:
    """When torch-pruning failed on a graph with split/chunk/slice: name the layers whose outputs are split."""
    if dg is None:
        return ""
    kinds = {tp.ops.OPTYPE.SPLIT, tp.ops.OPTYPE.SLICE}
    names: list[str] = []
    for node in dg.module2node.values():
        if node.type not in kinds:
            continue
        stack, seen = list(node.inputs), set()
        while stack:  # back to the nearest conv/linear: the layer whose channels are split
            n = stack.pop()
            if id(n) in seen:
                continue
            seen.add(id(n))
            if isinstance(n.module, (nn.modules.conv._ConvNd, nn.Linear)) and n.module in dg._module2name:
                if dg._module2name[n.module] not in names:
                    names.append(dg._module2name[n.module])
                break
            stack.extend(n.inputs)
    if not names:
        return ""
    listed = ", ".join(sorted(names))
    return (f"; the outputs of {listed} are split (chunk/split/slicing) and the parts used apart, which "
            "torch-pruning 1.6.1 mis-indexes (its issues #147, #360): list them in prune.ignored_layers, "
            "or compute the parts with separate layers")
