"""The VLM's export stage: the unpruned and the fine-tuned VLM each as the runtime's files (export/vlm.py:
vision.onnx, the inputs_embeds decoder with its KV cache, the embedding table; plus vlm.json and tokenizer.json:
edgerun/vlm.py's layout), each proved against torch in export/vlm.py. Gate: the runtime's greedy answers from
the fine-tuned files equal torch's on at least decoder.min_parity % of the held-out records, and the files'
exact-match drop (overall and per question type) against torch's is at most export.max_drop."""
from __future__ import annotations

import numpy as np

from pipeline import gate as gates
from pipeline.records import Artifact
from pipeline.runner import Context, Output
from pipeline.tasks import named
from pipeline.vlm import io

UNPRUNED = "unpruned"    # the unpruned VLM's files (what the profile compares with)


def export_keys(cfg):
    return ["export.opset", "decoder.max_new_tokens", "profile.threads"]


def prompt_templates(records) -> dict[str, str]:
    """Example prompts the model was trained on, per question type (up to three distinct ones each)."""
    out: dict[str, list[str]] = {}
    for r in records:
        seen = out.setdefault(r.kind, [])
        if r.prompt not in seen and len(seen) < 3:
            seen.append(r.prompt)
    return {(k if i == 0 else f"{k}.{i + 1}"): p for k, ps in sorted(out.items()) for i, p in enumerate(ps)}


def write_files(vlm, tok, folder, templates: dict, opset: int):
    """The runtime's files of ``vlm`` in ``folder`` (export.vlm.export_vlm, vlm.json, tokenizer.json)."""
    from edgerun.vlm import TOKENIZER, write_vlm_json
    from export.vlm import export_vlm, vlm_facts
    from pipeline.textdata import save_tokenizer
    files = export_vlm(vlm, folder, opset=opset)
    write_vlm_json(folder, vlm_facts(vlm), templates)
    save_tokenizer(tok, folder / TOKENIZER)
    return files


def export_onnx(ctx: Context) -> Output:
    cfg, data = ctx.cfg, ctx.data
    templates = prompt_templates(data.train)
    threads = cfg.profile.threads or 1
    teacher_next = np.load(ctx.path("baseline", io.TEST_NEXT))
    rows = {}
    for name, stage in ((UNPRUNED, "baseline"), (io.FILES_DIR, "finetune")):
        vlm, tok = io.load_vlm(ctx.path(stage, io.MODEL_DIR))
        ctx.log(f"  exporting the {stage} VLM")
        files = write_files(vlm, tok, ctx.out / name, templates, cfg.export.opset)
        rows[name] = {"vision_max_abs": files.vision_max_abs,
                      "size_bytes": sum(f.stat().st_size for f in (ctx.out / name).iterdir())}
    ctx.log("  scoring the fine-tuned VLM's files with the runtime")
    metrics, answers = io.measure_files(ctx.out / io.FILES_DIR, data.test, data.data.test_images, teacher_next,
                                        cfg.decoder.max_new_tokens, threads=threads)
    io.write_answers(ctx.out / io.ANSWERS, answers)
    import json
    torch_answers = json.loads(ctx.path("finetune", io.ANSWERS).read_text())
    same = sum(a == b for a, b in zip(answers, torch_answers, strict=True))
    metrics = {"task": "vlm", **metrics, "parity": round(100.0 * same / max(1, len(answers)), 4),
               "files": rows}
    pruned = io.pruned_parts(ctx.record("finetune").metrics.get("pruned") or {})
    return Output(metrics=metrics, artifacts=(
        Artifact("baseline-onnx", "onnx", UNPRUNED, label="unpruned FP32 (tower + decoder)"),
        Artifact("onnx-fp32", "onnx", io.FILES_DIR, label=f"FP32, {pruned}")))


def export_gate(m, inputs, cfg):
    task = named(m["task"])
    ref = inputs["finetune"].metrics
    return gates.gate(cfg.export.gate, gates.limit_check("parity", m["parity"], cfg.decoder.min_parity, at_least=True),
                      task.drop_check(m[task.metric], ref[task.metric], cfg.export.max_drop),
                      *task.per_kind_checks(m, ref, cfg.export.max_drop))
