"""What pruning targets measure: MACs two ways, and latency on onnxruntime CPU.

``count_macs`` is torch-pruning's op count (it also counts bias adds, norms and activations; the
pruning targets use it). ``conv_linear_macs`` counts multiply-accumulates of conv, linear and
attention layers only, the convention of thop/fvcore and of the seed experiment.
"""
from __future__ import annotations

import copy
import math
import statistics
import tempfile
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.nn as nn
import torch_pruning as tp

from edgerun.errors import brief
from pipeline.errors import PipelineError


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
        with torch.no_grad(), mha_fastpath_off(), warnings.catch_warnings():
            # the trace is only timed at this one batch: its "might not generalize" notices do not apply
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            try:
                torch.onnx.export(m, (x,), path, dynamo=False, opset_version=17, input_names=["input"],
                                  dynamic_axes={"input": {0: "batch"}})
            except Exception as e:  # noqa: BLE001 - the TorchScript exporter raises many types
                raise PipelineError(f"prune.latency_ms: cannot export a copy of the model to time it "
                                    f"({brief(e)})") from None
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
