"""What the timer calls for a VLM bundle folder (edgerun/vlm.py's layout), at batch 1: each part of answering a
question about images, and the whole answer.

    vlm-vision   vision.onnx on the images of one prompt (normalising included)
    vlm-prefill  the prompt's embeddings (table rows, image tokens in place) and the decoder's prefill
    vlm-decode   one decode step with ``tokens`` already cached (as edgerun.decode_timing's decode)
    vlm-answer   the whole answer: vision, prefill, then ``tokens`` new tokens greedily (end of sequence ignored,
                 so every model compared generates the same number of tokens)

The prompt is the bundle's own two-image template (vlm.json's ``prompt_templates``; the first template with the
most images), its images random uint8 pixels of the bundle's size: the time does not depend on their content.
"""
from __future__ import annotations

import numpy as np

from edgerun.errors import EdgeError

WORKLOADS = ("vlm-vision", "vlm-prefill", "vlm-decode", "vlm-answer")


class VLMTimingError(EdgeError):
    """A bad VLM timing request."""


def timing_prompt(session) -> tuple[list[np.ndarray], str]:
    """(images, prompt): the template with the most image placeholders, and random images for it."""
    c = session.config
    templates = dict(getattr(c, "prompt_templates", {}) or {})
    if not templates:
        raise VLMTimingError(f"{session.folder}: vlm.json has no prompt_templates to time")
    prompt = max(templates.values(), key=lambda p: (p.count(c.image_token), -len(p)))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (c.channels, *c.image_size), dtype=np.uint8)
              for _ in range(prompt.count(c.image_token))]
    return images, prompt


def vlm_call(session, workload: str, tokens: int):
    """A zero-argument callable running one timed unit of ``workload`` on an edgerun.vlm.VLMSession."""
    from edgerun.generate import generate
    if workload not in WORKLOADS:
        raise VLMTimingError(f"VLM timing: workload must be one of {', '.join(WORKLOADS)}, got {workload!r}")
    if tokens < 1:
        raise VLMTimingError(f"VLM timing: tokens must be >= 1, got {tokens}")
    images, prompt = timing_prompt(session)
    dec = session.decoder
    if workload == "vlm-vision":
        return lambda: session.image_embeds(images)
    if workload == "vlm-answer":
        def answer():
            ids, embeds = session.prompt(images, prompt)
            return generate(dec, ids, prompt_embeds=embeds, max_new_tokens=tokens, eos_token_id=None)
        return answer
    ids, embeds = session.prompt(images, prompt)
    if workload == "vlm-prefill":
        t = len(ids)
        return lambda: dec.step(session.embed(ids, session.image_embeds(images))[None], np.ones((1, t), np.int64),
                                np.arange(t)[None], dec.empty_past(1))
    rng = np.random.default_rng(0)
    past = {n: rng.standard_normal((1, dec.kv_heads, tokens, dec.head_dim)).astype(dec.dtype)
            for n in dec.empty_past(1)}
    step = dec.feed([[ids[-1]]])
    mask, pos = np.ones((1, tokens + 1), np.int64), np.array([[tokens]], np.int64)
    return lambda: dec.step(step, mask, pos, past)


def open_vlm_runs(paths: dict[str, str], workload: str, tokens: int, threads: int = 0):
    """({name: call}, close) for VLM bundle folders opened once each on onnxruntime's CPU."""
    from edgerun.vlm import VLMSession
    sessions = {name: VLMSession(path, threads=threads) for name, path in paths.items()}
    runs = {name: vlm_call(s, workload, tokens) for name, s in sessions.items()}
    return runs, lambda: sessions.clear()
