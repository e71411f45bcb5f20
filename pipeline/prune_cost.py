"""What pruning targets measure: MACs two ways, and latency on onnxruntime CPU.

``count_macs`` is torch-pruning's op count (it also counts bias adds, norms and activations; the
pruning targets use it). ``conv_linear_macs`` counts multiply-accumulates of conv, linear and
attention layers only, the convention of thop/fvcore and of the seed experiment.
"""
from __future__ import annotations

import copy
import math
import tempfile
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch_pruning as tp

from edgerun.errors import brief
from pipeline.errors import PipelineError
from pipeline.prune_store import layer_channels

RATIO_MAX = 0.98      # the highest channel ratio the search tries
BRACKET_STEP = 0.04   # first step when bracketing the ratio that meets a MAC budget
RATIO_TOL = 0.005     # bisection stops when the bracket is this narrow


@contextmanager
def mha_fastpath_off():
    """Without grad, nn.TransformerEncoderLayer / nn.MultiheadAttention in eval run one fused kernel
    (torch._transformer_encoder_layer_fwd): no module calls for hooks, no ONNX translation."""
    saved = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(saved)


# --------------------------------------------------------------------------------------------- counting
def count_macs(model: nn.Module, example_input) -> tuple[int, int]:
    """(MACs, params) for one forward of ``example_input``, torch-pruning's counter (all ops)."""
    was_training = model.training
    macs, params = tp.utils.count_ops_and_params(model, example_input)
    model.train(was_training)
    return int(macs), int(params)


def _mha_macs(m: nn.MultiheadAttention, args, kwargs) -> int:
    q = args[0] if args else kwargs["query"]
    k = args[1] if len(args) > 1 else kwargs.get("key", q)
    if q.dim() == 2:  # unbatched (L, E)
        n, lq, lk = 1, q.shape[0], k.shape[0]
    elif m.batch_first:
        n, lq, lk = q.shape[0], q.shape[1], k.shape[1]
    else:
        n, lq, lk = q.shape[1], q.shape[0], k.shape[0]
    e = m.embed_dim
    projections = lq * e * e + lk * m.kdim * e + lk * m.vdim * e + lq * e * e  # q, k, v, out
    return n * (projections + 2 * lq * lk * e)  # + q @ k^T and attn @ v over all heads


def conv_linear_macs(model: nn.Module, example_input) -> int:
    """Multiply-accumulates of conv (grouped/depthwise included), linear and nn.MultiheadAttention layers
    (projections and its two attention matmuls) for one forward of ``example_input`` (all of its batch),
    counted by forward hooks as thop/fvcore count them. Matmuls written as ``@`` in a forward are not
    layers and are not counted (as in thop)."""
    total = [0]

    def conv(m, inp, out):
        k = math.prod(m.kernel_size)
        if m.transposed:
            total[0] += inp[0].numel() * (m.out_channels // m.groups) * k
        else:
            total[0] += out.numel() * (m.in_channels // m.groups) * k

    def linear(m, _inp, out):
        total[0] += out.numel() * m.in_features

    def mha(m, args, kwargs, _out):
        total[0] += _mha_macs(m, args, kwargs)

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.modules.conv._ConvNd):
            hooks.append(m.register_forward_hook(conv))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear))
        elif isinstance(m, nn.MultiheadAttention):
            hooks.append(m.register_forward_hook(mha, with_kwargs=True))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), mha_fastpath_off():  # the fused kernel skips the calls the hooks count
            model(example_input)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return int(total[0])


# --------------------------------------------------------------------------------------------- MAC budget
def bisect_ratio(model, example_input, budget, cost, what, common, run_schedule, cost0=None) -> tuple[float, dict]:
    """Smallest channel ratio (within RATIO_TOL) whose simulated pruned copy costs <= budget; also the
    channels it gives (``run_schedule``: pipeline.prune's schedule). Each trial prunes a deepcopy,
    so trials are few: a first guess from
    cost ~ (1 - ratio)^2, a bracket grown outwards from it, then bisection of the bracket."""
    cache: dict[float, tuple[float, dict]] = {}

    def trial(r):
        r = round(min(max(r, 0.0), RATIO_MAX), 6)
        if r not in cache:
            m = copy.deepcopy(model)
            if r > 0 or common.get("layer_ratios") or common.get("head_ratio"):
                run_schedule(m, example_input, ratio=r, **common)
            cache[r] = (cost(m), layer_channels(m))
        return r, cache[r][0]

    if cost0 is None or common.get("layer_ratios") or common.get("head_ratio"):
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


# --------------------------------------------------------------------------------------------- latency
def batch_of(example_input: torch.Tensor, batch: int) -> torch.Tensor:
    """``batch`` copies of the example's first sample (the shape a latency is measured at)."""
    return example_input[:1].detach().cpu().repeat(batch, *([1] * (example_input.dim() - 1)))


def export_for_timing(model: nn.Module, x: torch.Tensor, path, *, what: str = "prune.latency_ms") -> Path:
    """A TorchScript-exported copy of ``model`` at input ``x`` (fast: timing only, never deployed)."""
    m = copy.deepcopy(model).cpu().eval()
    with torch.no_grad(), mha_fastpath_off(), warnings.catch_warnings():
        # the trace is only timed at this one batch: its "might not generalize" notices do not apply
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        try:
            torch.onnx.export(m, (x,), str(path), dynamo=False, opset_version=17, input_names=["input"],
                              dynamic_axes={"input": {0: "batch"}})
        except Exception as e:  # noqa: BLE001 - the TorchScript exporter raises many types
            raise PipelineError(f"{what}: cannot export a copy of the model to time it ({brief(e)})") from None
    return Path(path)


def measure_latency_ms(model: nn.Module, example_input: torch.Tensor, batch: int = 1, *, warmup: int = 10,
                       runs: int = 50, threads: int = 0) -> float:
    """Median latency (ms) of one batch on onnxruntime's CPU provider, from a TorchScript-exported copy,
    timed with the project's timer (edgerun.timing.measure)."""
    from edgerun.sessions import open_session
    from edgerun.timing import measure

    x = batch_of(example_input, batch)
    with tempfile.TemporaryDirectory() as tmp:
        path = export_for_timing(model, x, Path(tmp) / "model.onnx")
        session = open_session(path, "onnxruntime-cpu", threads=threads)
        try:
            feed = x.numpy()
            return float(measure(lambda: session.run(feed), warmup=warmup, iters=runs).p50_ms)
        finally:
            session.close()
