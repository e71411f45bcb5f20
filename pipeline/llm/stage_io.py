"""What the decoder stages read from the baseline the same way: its teacher-forced next tokens, the reference
answers of exact-match, and the task's figures of a torch model or an ONNX file measured against them."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from pipeline.llm import lm
from pipeline.runner import Context

ANSWERS = "test_answers.json"   # the unpruned model's greedy answers (the baseline's folder)


def reference_answers(ctx: Context) -> list[str] | None:
    """None when the data has answers (exact-match compares with them); else the unpruned model's own."""
    if ctx.data.has_answers:
        return None
    return json.loads(ctx.path("baseline", ANSWERS).read_text())


def measure_torch(ctx: Context, model, tok) -> dict:
    """The task's figures of a torch model on the held-out prompts (transformers' greedy loop)."""
    data = ctx.data
    ids, labels = lm.token_rows(tok, data.test)
    answers = lm.torch_answers(model, tok, data.test, ctx.cfg.decoder.max_new_tokens)
    return lm.measure(lm.torch_logits(model, ids), answers, data.test, labels,
                      np.load(ctx.path("baseline", lm.TEST_NEXT)), reference_answers(ctx))


def measure_onnx(ctx: Context, path: Path, tok) -> tuple[dict, list[str]]:
    """(figures, greedy answers) of a decoder file on the held-out prompts, with the runtime's generation loop."""
    return lm.score_onnx(path, tok, ctx.data.test, ctx.cfg.decoder.max_new_tokens,
                         np.load(ctx.path("baseline", lm.TEST_NEXT)), reference_answers(ctx))
