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
    """A bad decoder timing request."""


def decoder_feed(session, workload: str, tokens: int, *, seed: int = 0) -> dict[str, np.ndarray]:
    """The feed of one timed call on an edgerun.generate.DecoderSession: ``prefill`` of ``tokens`` prompt tokens
    with nothing cached, or ``decode`` of one token after ``tokens`` cached ones (random cache values: the time
    does not depend on them)."""
    if workload not in WORKLOADS:
        raise DecoderFileError(f"decoder timing: workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    if tokens < 1:
        raise DecoderFileError(f"decoder timing: tokens must be >= 1, got {tokens}")
    rng = np.random.default_rng(seed)
    new, past = (tokens, 0) if workload == "prefill" else (1, tokens)
    vocab = session.vocab if isinstance(session.vocab, int) else 2
    feed = {"input_ids": rng.integers(0, vocab, (1, new), dtype=np.int64),
            "attention_mask": np.ones((1, past + new), dtype=np.int64)}
    if session.positions:
        feed["position_ids"] = np.arange(past, past + new, dtype=np.int64)[None]
    for name in session.empty_past(1):
        feed[name] = rng.standard_normal((1, session.kv_heads, past, session.head_dim)).astype(session.dtype)
    return feed


def decoder_call(session, workload: str, tokens: int):
    """A zero-argument callable running one prefill or decode step (every output fetched: generation reads the
    new cache every step)."""
    feed = decoder_feed(session, workload, tokens)
    ort_session, outputs = session.runner.session, session.runner.output_names
    return lambda: ort_session.run(outputs, feed)


def open_decoder_runs(paths: dict[str, str], workload: str, tokens: int, threads: int = 0):
    """({name: call}, close) for decoder files opened once each on onnxruntime's CPU (a VLM bundle's folders
    for the vlm-* workloads: edgerun.vlm_timing)."""
    if workload.startswith("vlm-"):
        from edgerun.vlm_timing import open_vlm_runs
        return open_vlm_runs(paths, workload, tokens, threads)
    from edgerun.generate import DecoderSession
    runners = {}
    try:
        for name, path in paths.items():
            runners[name] = DecoderSession(path, threads=threads)
        runs = {name: decoder_call(r, workload, tokens) for name, r in runners.items()}
    except BaseException:
        _close(runners)
        raise
    return runs, lambda: _close(runners)


def _close(sessions: dict) -> None:
    for s in sessions.values():
        s.runner.__exit__(None, None, None)
