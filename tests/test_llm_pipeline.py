"""The decoder through every stage (configs/llm-cpu.toml, shrunk): a tiny LLaMA-style decoder trained on the
embedded number task, pruned by ratio, distilled, exported with a KV cache, compressed to INT4 in both forms,
timed and packaged; the bundle's own `generate` gives the pipeline's answers.

A tiny model's exact-match is low, so the accuracy gates warn here (their arithmetic is tested in
test_llm_gates below); what this run proves is that every stage does its work on a decoder."""
import json
import subprocess
import sys

import pytest
from conftest import one_line

import pipeline
from pipeline.errors import PipelineError

pytestmark = pytest.mark.e2e

TINY = ["model.kwargs={hidden_size=64, num_hidden_layers=2, intermediate_size=256, num_attention_heads=4, "
        "num_key_value_heads=2, head_dim=16}",
        "data.train_subset=1500", "data.test_subset=40", "baseline.epochs=2", "baseline.lr=3e-3",
        "baseline.min_top1=-1", "prune.target=ratio", "prune.ratio=0.5", "finetune.epochs=0.5",
        "decoder.int4_group=32", "decoder.calib_prompts=4", "decoder.max_new_tokens=4",
        "profile.processes=1", "profile.rounds=3", "profile.block_ms=5",
        *(f"{s}.gate=warn" for s in ("prune", "finetune", "export", "quantize"))]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    return pipeline.run("configs/llm-cpu.toml", TINY, run_name="tiny", runs=runs, log=lambda m: None)


def record(run, name):
    return next(r for r in run.records if r.name == name)


def test_every_stage_ran_on_the_decoder(run):
    assert [r.name for r in run.records] == ["baseline", "prune", "finetune", "export_onnx", "quantize", "engine",
                                             "profile", "package"]
    assert {r.name for r in run.records if r.status == "skipped"} == {"engine"}
    for name in ("baseline", "prune", "finetune", "export_onnx", "quantize"):
        m = record(run, name).metrics
        assert m["task"] == "generate" and 0 <= m["exact_match"] <= 100 and m["perplexity"] >= 1, (name, m)
    assert record(run, "baseline").metrics["next_token_agreement"] == 100.0   # itself


def test_prune_kept_legal_widths_and_fewer_weights(run):
    base, pruned = record(run, "baseline").metrics, record(run, "prune").metrics
    assert pruned["widths"]["intermediate_size"] == 128 and pruned["widths"]["intermediate_size"] % 32 == 0
    assert pruned["params"] < base["params"]


def test_export_parity_and_int4_forms(run):
    e, q = record(run, "export_onnx").metrics, record(run, "quantize").metrics
    assert e["parity"]["greedy_equal"] >= 99.0 and e["parity"]["logits_max_abs"] < 1e-2
    assert q["int4"]["matmuls"]["int4"] > 0 and q["size_bytes"] < e["size_bytes"]
    assert "trt_form" in q and q["trt_form"]["int4"]["form"] == "trt"


def test_profile_times_prefill_and_decode_against_the_unpruned_file(run):
    rows = record(run, "profile").metrics["rows"]
    assert set(rows) == {"baseline-onnx", "onnx-fp32", "baseline-int4", "onnx-int4"}
    assert rows["baseline-onnx"]["decode"]["speedup"] == 1.0
    assert all(r["ttft_ms"] > 0 and r["decode_tokens_per_s"] > 0 for r in rows.values())
    assert all(0 < r["import_rss_mib"] <= r["peak_rss_mib"] for r in rows.values())   # a process per file


def test_the_bundle_generates_on_its_own(run):
    bundle = run.run_dir / "deploy"
    assert record(run, "package").metrics["self_test"]["exact_match"] == 100.0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert {"model.onnx", "genai_config.json", "tokenizer.json", "hf/config.json"} <= set(manifest["files"])
    prompt = json.loads((bundle / "sample" / "expected.jsonl").read_text().splitlines()[0])
    p = subprocess.run([sys.executable, "-m", "edgerun", "generate", "--bundle", ".", "--prompt", prompt["prompt"],
                        "--max-new-tokens", "4", "--format", "json"], cwd=bundle, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(p.stdout.strip().splitlines()[-1])["text"].strip() == prompt["answer"].strip()


def test_a_decoder_config_with_image_data_is_one_line(tmp_path):
    with pytest.raises(PipelineError) as e:
        pipeline.run("configs/llm-cpu.toml", [*TINY, "data.kind=mnist"], runs=tmp_path, log=lambda m: None)
    assert "a decoder reads text" in one_line(e.value)


def test_the_embedded_task_is_identified_by_what_it_generates(monkeypatch):
    """A change to the generator is a new data identity (every stage reruns), with no version to bump by hand."""
    import pipeline.textdata as textdata
    from pipeline.api import load
    from pipeline.llm.lm import TextData
    cfg, _ = load("configs/llm-cpu.toml", ["data.train_subset=50", "data.test_subset=10"])
    before = TextData(cfg).identity()
    assert TextData(cfg).identity() == before                  # deterministic
    real = textdata.number_task

    def changed(*a, **k):
        train, test = real(*a, **k)
        return [{**train[0], "answer": train[0]["answer"] + " x"}, *train[1:]], test
    monkeypatch.setattr(textdata, "number_task", changed)
    assert TextData(cfg).identity() != before
