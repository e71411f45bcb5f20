"""The decoder's export stage: the fine-tuned model to one ONNX file with a KV cache (export.decoder, the layout of
onnxruntime-genai), proved by greedy decoding: the runtime's own loop on the file must give torch's answers on
`decoder.min_parity` percent of the held-out prompts; logits max-abs on the test rows is recorded. The unpruned
model is exported too, as the reference the profile times against."""
from __future__ import annotations

import numpy as np

from pipeline import gate as gates
from pipeline.llm import lm
from pipeline.llm.stage_io import measure_onnx
from pipeline.records import Artifact
from pipeline.runner import Context, Output
from pipeline.tasks import named

BASELINE_ONNX = "baseline_fp32.onnx"


def export_keys(cfg):
    return ["export.opset", "profile.baseline_onnx", "decoder.max_new_tokens", "decoder.eval_prompts"]


def export_onnx(ctx: Context) -> Output:
    from export.decoder import export_decoder
    cfg = ctx.cfg
    model, tok = lm.load_model(ctx.path("finetune", lm.MODEL_DIR))
    path = ctx.out / "model.onnx"
    info = export_decoder(model, path, opset=cfg.export.opset)
    metrics, answers = measure_onnx(ctx, path, tok)
    torch_answers = lm.torch_answers(model, tok, ctx.data.test, cfg.decoder.max_new_tokens)
    same = sum(a == b for a, b in zip(answers, torch_answers, strict=True))
    ids, _ = lm.token_rows(tok, ctx.data.test[:64])
    max_abs = float(np.abs(lm.onnx_logits(path, ids) - lm.torch_logits(model, ids)).max())
    metrics = {"task": "generate", **metrics, "size_bytes": path.stat().st_size, "opset": info["opset"],
               "parity": {"greedy_equal": round(100.0 * same / len(answers), 4), "logits_max_abs": max_abs},
               "weight_bytes": ctx.record("finetune").metrics["weight_bytes"]}
    artifacts = [Artifact("onnx-fp32", "onnx", "model.onnx", "fp32", "ONNX fp32 (pruned)")]
    if cfg.profile.baseline_onnx:
        base, _ = lm.load_model(ctx.path("baseline", lm.MODEL_DIR))
        export_decoder(base, ctx.out / BASELINE_ONNX, opset=cfg.export.opset)
        artifacts.append(Artifact("baseline-onnx", "onnx", BASELINE_ONNX, "fp32", "baseline ONNX fp32 (unpruned)"))
    return Output(metrics=metrics, artifacts=tuple(artifacts))


def export_gate(m, inputs, cfg):
    task = named(m["task"])
    return gates.gate(cfg.export.gate,
                      task.drop_check(m[task.metric], inputs["finetune"].metrics[task.metric], cfg.export.max_drop),
                      gates.limit_check("greedy_parity", m["parity"]["greedy_equal"], cfg.decoder.min_parity,
                                        at_least=True))
