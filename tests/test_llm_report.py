"""The decoder's report: its speed table carries each file's peak memory; its "Not executed" lines are the
decoder's (EDGE_LLM.md), not the classifier's build_engine.sh."""
from pipeline.llm.report import to_markdown


def _row(label, ms, peak, floor):
    t = {"ms": ms, "speedup": 1.0, "p10_p90": [0.9, 1.1], "reproducible": True}
    return {"label": label, "ttft_ms": ms, "prefill": t, "decode": t, "decode_tokens_per_s": 1000 / ms,
            "size_ratio": 1.0, "peak_rss_mib": peak, "import_rss_mib": floor}


def test_speed_table_shows_each_files_peak_memory_and_the_floor():
    rows = {"baseline-onnx": _row("unpruned", 2.0, 312.4, 46.5), "onnx-int4": _row("int4", 1.0, 98.9, 45.9)}
    profile = {"rows": rows,
               "prefill_tokens": 64, "decode_past": 128, "batch": 1, "backend": "onnxruntime-cpu", "threads": 1}
    md = to_markdown({"stages": [], "profile": profile, "widths": None, "answers": None})
    lines = [ln for ln in md.split("## Decoder: speed")[1].splitlines() if ln.startswith("| ")]
    assert lines[0].rstrip(" |").endswith("peak memory")
    assert lines[1].endswith("| 312 MiB |") and lines[2].endswith("| 99 MiB |")
    assert "46 MiB before a file is opened" in md


def test_not_executed_names_the_decoders_recipe_not_build_engine_sh():
    from pipeline.records import StageRecord
    from pipeline.report_summary import not_executed
    skipped = StageRecord("engine", "skipped", reason="no TensorRT here")
    decoder = not_executed([StageRecord("baseline", "ran", metrics={"task": "generate", "exact_match": 90.0}),
                            skipped], [])
    classifier = not_executed([StageRecord("baseline", "ran", metrics={"task": "classify", "top1": 98.0}),
                               skipped], [])
    engine = [n for n in decoder if n.startswith("TensorRT")]
    assert len(engine) == 1 and "EDGE_LLM.md" in engine[0] and "build_engine.sh" not in " ".join(decoder)
    assert any("build_engine.sh" in n for n in classifier) and "EDGE_LLM.md" not in " ".join(classifier)
