"""What a VLM run reports: exact-match per question type at every stage (the gates compare each), the
end-to-end answer latency and each part of it per variant against the unpruned FP32 VLM, and the last line's
headline. report.json carries it as "vlm"; report.md as its own sections."""
from __future__ import annotations

from pipeline.llm.report import _ratio, _size

PARTS = (("answer", "whole answer"), ("vision", "vision"), ("prefill", "prefill"), ("decode", "decode step"))


def vlm_section(records) -> dict | None:
    """None for a run that is not a VLM's."""
    recs = {r.name: r for r in records}
    base = recs.get("baseline")
    if base is None or base.metrics.get("task") != "vlm":
        return None
    stages = []
    for r in records:
        m = r.metrics
        if m.get("per_kind") is None:
            continue
        stages.append({"stage": r.name, "status": r.status, "exact_match": m.get("exact_match"),
                       "per_kind": m["per_kind"], "next_token_agreement": m.get("next_token_agreement"),
                       "params": m.get("params"), "size_bytes": m.get("size_bytes"),
                       "gate": r.gate.to_json() if r.gate is not None else None})
    profile = recs.get("profile")
    rows = profile.metrics.get("rows") if profile is not None and profile.status in ("ran", "cached") else None
    return {"stages": stages, "counts": base.metrics.get("counts"), "steps": base.metrics.get("steps"),
            "profile": rows and {k: profile.metrics[k] for k in ("rows", "new_tokens", "decode_past", "batch",
                                                                   "backend", "threads")}}


def to_markdown(section: dict) -> str:
    kinds = sorted({k for s in section["stages"] for k in s["per_kind"]})
    counts = section.get("counts") or {}
    lines = ["## VLM: exact-match per question type at every stage", "",
             "Held-out records (MNIST test images); " + ", ".join(f"{k} {counts.get(k, '?')}" for k in kinds)
             + ". Every type's drop is gated, not only the overall figure.", "",
             "| stage | overall | " + " | ".join(kinds) + " | next-token agreement | size |",
             "|---|---:|" + "---:|" * (len(kinds) + 2)]
    for s in section["stages"]:
        per = [f"{s['per_kind'][k]:.2f}" if k in s["per_kind"] else "–" for k in kinds]
        agree = s.get("next_token_agreement")
        tail = f"{agree:.2f} % | {_size(s.get('size_bytes'))}" if agree is not None else "– | –"
        lines.append(f"| {s['stage']} | {s['exact_match']:.2f} % | " + " | ".join(per) + f" | {tail} |")
    p = section.get("profile")
    if p:
        lines += ["", f"## VLM: answer latency (batch {p['batch']}, {p['backend']}, {p['threads'] or 'default'} "
                  f"thread(s); the whole answer = the images of the bundle's template with the most images encoded, "
                  f"the prompt prefilled, {p['new_tokens']} new tokens; decode step after {p['decode_past']} "
                  "cached)", "",
                  "| variant | " + " | ".join(f"{label} (ms) | vs unpruned" for _, label in PARTS) + " | size ratio |",
                  "|---|" + "---:|---:|" * len(PARTS) + "---:|"]
        for role, r in p["rows"].items():
            cells = [f"{r[k]['ms']:.2f} | {_ratio(r[k])}" for k, _ in PARTS if k in r]
            lines.append(f"| {r['label'] or role} | " + " | ".join(cells) + f" | {r['size_ratio']:.2f}x |")
    return "\n".join(lines) + "\n"


def is_run(result) -> bool:
    base = result.record("baseline")
    return base is not None and base.metrics.get("task") == "vlm"


def headline(result) -> str:
    pkg, prof = result.record("package"), result.record("profile")
    if pkg is None or pkg.metrics.get("task") != "vlm":
        return ""
    shipped = "onnx-int4" if pkg.metrics.get("shipped") == "files" and result.record("quantize").status != "skipped" \
        else "onnx-fp32"
    stage = result.record("quantize" if shipped == "onnx-int4" else "export_onnx")
    what = [f"exact-match {stage.metrics['exact_match']:.2f} %"]
    row = (prof.metrics.get("rows") or {}).get(shipped) if prof is not None else None
    if row:
        what.append(f"answer {_ratio(row['answer'])} faster than the unpruned FP32 VLM at batch 1, "
                    f"{row['size_ratio']:.1f}x smaller")
    return f" | ship the VLM bundle ({', '.join(what)})"


def next_block(result) -> str:
    import json
    import shlex
    bundle = result.bundle
    first = json.loads((bundle / "sample.jsonl").read_text().splitlines()[0])
    images = " ".join(f"--image {shlex.quote(i)}" for i in first["images"])
    return "\n".join(["", "Next:", f"  ship the folder {bundle}/ (vlm.json, vision.onnx, model.onnx, "
                      "embed_tokens.npy, tokenizer.json; trt/ and hf/ for the Jetson: JETSON.md, not executed here)",
                      "  on the target (python3 with numpy, onnxruntime, tokenizers and pillow):",
                      f"    cd {bundle.name}",
                      f"    python3 -m edgerun generate --bundle . {images} --prompt {shlex.quote(first['prompt'])}",
                      "    python3 -m edgerun eval --bundle . --format json "
                      f"--max-new-tokens {result.config.decoder.max_new_tokens}", ""])
