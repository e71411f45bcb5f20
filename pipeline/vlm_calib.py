"""Calibration feeds for a VLM's INT4 decoder file (the one taking ``inputs_embeds``), from the VLM itself.

    feeds = decoder_feeds(vlm, batches, max_feeds=32)            # batches: pipeline.prune_vlm.VLMBatch
    info = calib.int4.compress_int4("decoder.onnx", "decoder.int4.onnx", form="ort", group_size=128, dataset=feeds)
    trt = calib.int4.compress_int4("decoder.onnx", "decoder.int4.trt.onnx", form="trt", group_size=128, dataset=feeds)

AWQ and scale estimation read the activations entering every linear, so the feeds must be what the decoder
sees at run time: the token embeddings with the image positions replaced by the projected image tokens
(``VLM.inputs_embeds``, the computation the runtime repeats with numpy and vision.onnx). One sample per feed,
without its padding, nothing cached (a prefill, as the text decoder's calibration in pipeline/llm/quantize.py),
and every input of the file's layout (export/decoder.py): ``inputs_embeds``, ``attention_mask``,
``position_ids``, empty ``past_key_values.{i}.key|value``.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch

from pipeline.errors import PipelineError


def empty_past(decoder, batch: int = 1) -> dict[str, np.ndarray]:
    """The empty KV cache feeds of ``decoder``'s exported file (export/decoder.py's names and layout)."""
    from pipeline.prune_decoder import decoder_widths
    w = decoder_widths(decoder)
    shape = (batch, w.kv_heads, 0, w.head_dim)
    return {f"past_key_values.{i}.{k}": np.zeros(shape, np.float32) for i in range(w.layers) for k in ("key", "value")}


def decoder_feeds(vlm, batches: Iterable, *, max_feeds: int | None = None) -> list[dict[str, np.ndarray]]:
    """One feed dict per sample of ``batches`` (objects with ``input_ids``, ``pixels``, ``attention_mask``:
    pipeline.prune_vlm.VLMBatch), at most ``max_feeds``; padding (attention_mask 0) is dropped."""
    if max_feeds is not None and (isinstance(max_feeds, bool) or not isinstance(max_feeds, int) or max_feeds < 1):
        raise PipelineError(f"decoder_feeds: max_feeds must be a positive integer or None, got {max_feeds!r}")
    past = empty_past(vlm.decoder)
    feeds: list[dict[str, np.ndarray]] = []
    was_training = vlm.training
    vlm.eval()
    try:
        with torch.no_grad():
            for b in batches:
                embeds = vlm.inputs_embeds(b.input_ids, b.pixels).float()
                mask = torch.ones_like(b.input_ids) if b.attention_mask is None else b.attention_mask
                for row, keep in zip(embeds, mask.bool(), strict=True):
                    if max_feeds is not None and len(feeds) >= max_feeds:
                        return feeds
                    x = row[keep].numpy()[None]
                    t = x.shape[1]
                    feeds.append({"inputs_embeds": np.ascontiguousarray(x, np.float32),
                                  "attention_mask": np.ones((1, t), np.int64),
                                  "position_ids": np.arange(t, dtype=np.int64)[None], **past})
    finally:
        vlm.train(was_training)
    if not feeds:
        raise PipelineError("decoder_feeds: no samples in the calibration batches")
    return feeds
