"""What a decoder run reports: the task's figures per stage (exact-match, next-token agreement with the unpruned
model, perplexity), time to first token and decode tokens/s per file against the unpruned FP32 file, and the last
line's headline. report.json carries it as "decoder"; report.md as its own sections."""
from __future__ import annotations

FIGURES = (("exact_match", "exact-match", "{:.2f} %"), ("next_token_agreement", "next-token agreement", "{:.2f} %"),
           ("perplexity", "perplexity", "{:.3f}"))


def decoder_section(records) -> dict | None:
    """None for a run that is not a decoder's."""
    recs = {r.name: r for r in records}
    base = recs.get("baseline")
    if base is None or base.metrics.get("task") != "generate":
        return None
    stages = []
    for r in records:
        m = r.metrics
        stages.append({"stage": r.name, "status": r.status, "seconds": r.seconds,
                       **{k: m.get(k) for k, _, _ in FIGURES}, "params": m.get("params"),
                       "size_bytes": m.get("size_bytes"), "gate": r.gate.to_json() if r.gate is not None else None})
    profile = recs.get("profile")
    rows = profile.metrics.get("rows") if profile is not None and profile.status != "skipped" else None
    return {"stages": stages, "profile": rows and {k: profile.metrics[k] for k in (
        "rows", "prefill_tokens", "decode_past", "batch", "backend", "threads")},
            "widths": (recs["prune"].metrics.get("widths") if "prune" in recs else None),
            "answers": base.metrics.get("answers")}


def to_markdown(section: dict) -> str:
    lines = ["## Decoder: the task's figures per stage", "",
             f"Held-out prompts scored against {section.get('answers') or 'their answers'}; next-token agreement "
             "is teacher-forced against the unpruned model.", "",
             "| stage | status | " + " | ".join(label for _, label, _ in FIGURES) + " | params | size |",
             "|---|---|" + "---:|" * (len(FIGURES) + 2)]
    for s in section["stages"]:
        figs = [fmt.format(s[k]) if s.get(k) is not None else "–" for k, _, fmt in FIGURES]
        lines.append(f"| {s['stage']} | {s['status']} | " + " | ".join(figs)
                     + f" | {s['params'] or '–'} | {_size(s['size_bytes'])} |")
    p = section.get("profile")
    if p:
        lines += ["", f"## Decoder: speed (batch {p['batch']}, {p['backend']}, {p['threads'] or 'default'} "
                  f"thread(s); prefill of {p['prefill_tokens']} tokens, decode after {p['decode_past']} cached)", "",
                  "| file | time to first token | vs unpruned (p10–p90) | decode | vs unpruned (p10–p90) "
                  "| size ratio | peak memory |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for role, r in p["rows"].items():
            lines.append(f"| {r['label'] or role} | {r['ttft_ms']:.3f} ms | {_ratio(r['prefill'])} | "
                         f"{r['decode_tokens_per_s']:.1f} tokens/s | {_ratio(r['decode'])} | {r['size_ratio']:.2f}x "
                         f"| {_mib(r.get('peak_rss_mib'))} |")
        lines += ["", "Peak memory: the peak resident set of a fresh process that opens the file alone and runs the "
                  "prefill and decode above (Python, numpy and onnxruntime included: "
                  f"{_mib(_floor(p['rows']))} before a file is opened)."]
    return "\n".join(lines) + "\n"


def _ratio(t: dict) -> str:
    lo, hi = t["p10_p90"]
    flag = "" if t.get("reproducible") is not False else " (not reproducible)"
    return f"{t['speedup']:.2f}x ({lo:.2f}–{hi:.2f}){flag}"


def _mib(v) -> str:
    return "–" if v is None else f"{v:.0f} MiB"


def _floor(rows: dict):
    values = [r["import_rss_mib"] for r in rows.values() if r.get("import_rss_mib") is not None]
    return min(values) if values else None


def _size(n) -> str:
    return "–" if n is None else f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.1f} MiB"


def is_run(result) -> bool:
    base = result.record("baseline")
    return base is not None and base.metrics.get("task") == "generate"


def headline(result) -> str:
    """The last line's: the shipped file, its exact-match, its decode speed and TTFT against the unpruned file."""
    pkg, prof = result.record("package"), result.record("profile")
    if pkg is None or pkg.metrics.get("task") != "generate":
        return ""
    shipped = "onnx-int4" if pkg.metrics.get("shipped", "").endswith("int4.onnx") else "onnx-fp32"
    stage = result.record("quantize" if shipped == "onnx-int4" else "export_onnx")
    what = [f"exact-match {stage.metrics['exact_match']:.2f} %"]
    row = ((prof.metrics.get("rows") or {}).get(shipped) if prof is not None else None)
    if row:
        what.append(f"decode {row['decode_tokens_per_s']:.0f} tokens/s = {_ratio(row['decode'])}, time to first "
                    f"token {_ratio(row['prefill'])} vs the unpruned FP32 ONNX at batch 1, {row['size_ratio']:.1f}x "
                    "smaller")
    return f" | ship model.onnx ({', '.join(what)})"


def next_block(result) -> str:
    import json
    import shlex
    bundle = result.bundle
    first = (bundle / "sample" / "prompts.jsonl").read_text().splitlines()[0]
    prompt = shlex.quote(json.loads(first)["prompt"])
    return "\n".join(["", "Next:", f"  ship the folder {bundle}/ (model.onnx, genai_config.json, tokenizer.json; hf/ "
                      "for TensorRT Edge-LLM on a Jetson: EDGE_LLM.md, not executed here)",
                      "  on the target (python3 with numpy, onnxruntime and tokenizers):", f"    cd {bundle.name}",
                      f"    python3 -m edgerun generate --bundle . --prompt {prompt}",
                      "    python3 -m edgerun generate --bundle . --eval sample/prompts.jsonl --format json "
                      f"--max-new-tokens {result.config.decoder.max_new_tokens}", ""])
