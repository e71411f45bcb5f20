"""What the timer calls for a decoder: one prefill of N prompt tokens (time to first token), or one decode step
with P tokens already cached (time per generated token), at batch 1.

The file has onnxruntime-genai's layout (input_ids, attention_mask, position_ids, past_key_values.{i}.key|value
[batch, kv_heads, past, head_dim]; logits and present.* out). The feeds are built once, before timing, from
the file's own input shapes, so a call is exactly one onnxruntime run returning every output (the new cache
too): what generation pays per token, without the sampling or the cache bookkeeping around it (the same for
every model compared).
"""
from __future__ import annotations

import numpy as np

from edgerun.errors import EdgeError

WORKLOADS = ("prefill", "decode")


class DecoderFileError(EdgeError):
    """An ONNX file without the decoder inputs the timer feeds."""


def past_shapes(inputs) -> dict[str, tuple[int, int]]:
    """{past input name: (kv_heads, head_dim)} from onnxruntime's input metadata (NodeArg list)."""
    out = {}
    for i in inputs:
        if i.name.startswith("past_key_values."):
            shape = i.shape
            if len(shape) != 4 or not all(isinstance(d, int) for d in shape[1::2]):
                raise DecoderFileError(f"{i.name}: expected [batch, kv_heads, past, head_dim] with fixed kv_heads "
                                       f"and head_dim, got {shape}")
            out[i.name] = (shape[1], shape[3])
    return out


def decoder_feed(inputs, workload: str, tokens: int, *, vocab: int = 2, seed: int = 0) -> dict[str, np.ndarray]:
    """The feed of one timed call: ``prefill`` of ``tokens`` prompt tokens with nothing cached, or ``decode`` of one
    token after ``tokens`` cached ones (random cache values: the time does not depend on them)."""
    if workload not in WORKLOADS:
        raise DecoderFileError(f"decoder timing: workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    if tokens < 1:
        raise DecoderFileError(f"decoder timing: tokens must be >= 1, got {tokens}")
    names = {i.name for i in inputs}
    needed = {"input_ids", "attention_mask"}   # position_ids where the file has it (genai's builder omits it)
    if not needed <= names:
        raise DecoderFileError(f"not a decoder with a KV cache: inputs {sorted(names)} lack "
                               f"{sorted(needed - names)}")
    rng = np.random.default_rng(seed)
    new, past = (tokens, 0) if workload == "prefill" else (1, tokens)
    feed = {"input_ids": rng.integers(0, max(vocab, 2), (1, new), dtype=np.int64),
            "attention_mask": np.ones((1, past + new), dtype=np.int64),
            **({"position_ids": np.arange(past, past + new, dtype=np.int64)[None]} if "position_ids" in names else {})}
    for name, (heads, dim) in past_shapes(inputs).items():
        feed[name] = rng.standard_normal((1, heads, past, dim), dtype=np.float32)
    return feed


def decoder_call(runner, workload: str, tokens: int):
    """A zero-argument callable running one prefill or decode step on an open edgerun.ort.OrtRunner."""
    session = runner.session
    logits = [o.shape[-1] for o in session.get_outputs() if o.name == "logits"]
    vocab = logits[0] if logits and isinstance(logits[0], int) else 2
    feed = decoder_feed(session.get_inputs(), workload, tokens, vocab=vocab)
    outputs = runner.output_names   # the present.* tensors too: generation fetches them every step
    return lambda: session.run(outputs, feed)


def open_decoder_runs(paths: dict[str, str], workload: str, tokens: int, threads: int = 0):
    """({name: call}, close) for decoder files opened once each on onnxruntime's CPU."""
    from edgerun.ort import OrtRunner
    runners = {}
    try:
        for name, path in paths.items():
            runners[name] = OrtRunner(path, threads=threads)
        runs = {name: decoder_call(r, workload, tokens) for name, r in runners.items()}
    except BaseException:
        _close(runners)
        raise
    return runs, lambda: _close(runners)


def _close(runners: dict) -> None:
    for r in runners.values():
        r.__exit__(None, None, None)
