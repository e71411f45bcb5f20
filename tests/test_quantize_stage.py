"""The quantize stage's per-layer choice (quantize.keep_fp32): "auto" picks by measured ratio (here a
fake, deterministic clock), "none" quantizes every layer, "listed" keeps exactly the named nodes."""
import onnx
import pytest
from conftest import SMALL

import pipeline
from calib.int8form import int8_weight_max
from edgerun import timing
from edgerun.errors import EdgeError
from pipeline.stages import STAGES

CONFIG = "configs/cpu.toml"
# The accuracy condition is not under test here: a loose drop keeps every variant eligible.
BASE = [*SMALL, "prune.target=ratio", "prune.ratio=0.5", "quantize.max_drop=20", "quantize.choose_val_size=200",
        "profile.threads=1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    runs = tmp_path_factory.mktemp("runs")
    result = pipeline.run(CONFIG, BASE, run_name="base", runs=runs, until="export_onnx", log=lambda m: None)
    assert result.passed, result.message
    return runs


def run_quantize(runs, name, *extra):
    result = pipeline.run(CONFIG, [*BASE, *extra], run_name=name, runs=runs, until="quantize",
                          force=["quantize"], log=lambda m: None)
    assert result.passed, result.message
    rec = next(r for r in result.records if r.name == "quantize")
    assert rec.status == "ran"
    # The stage read exactly what it declared (the fingerprint is exact in every mode).
    stage = next(s for s in STAGES if s.name == "quantize")
    assert result.reads["quantize"] == set(stage.keys(result.config))
    return rec, stage_dir(result.run_dir, "quantize") / "model_int8.onnx"


def stage_dir(run_dir, name):
    return next(run_dir.glob(f"[0-9][0-9]_{name}"))


@pytest.fixture
def fake_clock(monkeypatch):
    """timing.compare on a fake clock: each call of variant ``name`` advances it by costs[name] ms."""
    real = timing.compare
    costs: dict[str, float] = {}

    def compare(runs, *, reference, **kw):
        now = [0.0]

        def timed(name, fn):
            def call():
                fn()
                now[0] += costs[name] / 1000.0
            return call
        return real({n: timed(n, f) for n, f in runs.items()}, reference=reference, clock=lambda: now[0], **kw)
    monkeypatch.setattr(timing, "compare", compare)
    return costs


def fp32_nodes(path) -> set[str]:
    """Conv/Gemm nodes that read no dequantized tensor, i.e. run in FP32."""
    g = onnx.load(path).graph
    dq = {n.output[0] for n in g.node if n.op_type == "DequantizeLinear"}
    return {n.name for n in g.node if n.op_type in ("Conv", "Gemm") and not any(i in dq for i in n.input)}


@pytest.mark.heavy
def test_auto_picks_the_fastest_measured_variant(runs, fake_clock):
    fake_clock.update(fp32=1.0, all_int8=0.9, stem_fp32=0.6, gemm_fp32=0.8, stem_gemm_fp32=0.7)
    rec, path = run_quantize(runs, "auto")
    choice = rec.metrics["layer_choice"]
    ratios = {c["name"]: c["ratio_vs_fp32"] for c in choice["candidates"]}
    assert set(ratios) == set(fake_clock) - {"fp32"}
    for name, r in ratios.items():   # the fake clock's ratios, measured through the real protocol
        assert r == pytest.approx(fake_clock[name], rel=1e-6)
    assert choice["chosen"] == choice["written"] == "stem_fp32" and choice["pays"] is True
    stem = next(c["keep_fp32"] for c in choice["candidates"] if c["name"] == "stem_fp32")
    assert fp32_nodes(path) == set(stem) and rec.metrics["keep_fp32"] == stem
    assert "train split" in choice["val"]
    # The task's figures under the keys they had: top-1 in percent, drops in points, rounded as before.
    assert 0 <= choice["fp32_val_top1"] <= 100
    for c in choice["candidates"]:
        assert 0 <= c["val_top1"] <= 100 and c["within_drop"] is True   # quantize.max_drop=20 pt
        assert c["drop_pt"] == round(choice["fp32_val_top1"] - c["val_top1"], 3)


def test_auto_says_when_no_variant_pays(runs, fake_clock):
    fake_clock.update(fp32=1.0, all_int8=1.5, stem_fp32=1.3, gemm_fp32=1.2, stem_gemm_fp32=1.4)
    rec, path = run_quantize(runs, "slow")
    choice = rec.metrics["layer_choice"]
    assert choice["chosen"] == "fp32" and choice["pays"] is False
    assert choice["written"] == "gemm_fp32"   # the fastest INT8 form is still written, for the profile
    assert fp32_nodes(path) == set(choice["keep_fp32"]) and choice["keep_fp32"]


def test_none_quantizes_every_layer(runs):
    from calib.int8form import weight_form
    rec, path = run_quantize(runs, "none", 'quantize.keep_fp32="none"')
    assert rec.metrics["layer_choice"] == {"mode": "none", "keep_fp32": []}
    assert fp32_nodes(path) == set()
    # The record says which weight range this CPU got and why, and gates the kernels that ran here.
    m = rec.metrics
    assert {k: m["int8_form"][k] for k in ("weights", "reason")} == weight_form("onnxruntime", None)[1]
    assert m["kernels_vs_unfused"]["n"] == 300 and m["kernels_vs_unfused"]["agreement"] >= 95
    assert "kernels_vs_unfused_agreement" in [c.metric for c in rec.gate.checks]
    trt = m["forms"]["tensorrt"]
    assert trt["int8_form"]["weights"] == "full_range" and "unfused" in trt["scored"]


def test_a_cpu_without_vnni_gets_reduced_range_weights_and_the_record_says_why(runs, monkeypatch):
    """A fake AVX2-only /proc/cpuinfo: it proves the stage follows the detected form, not that it saturates."""
    from edgerun import machine
    monkeypatch.setattr(machine, "_cpuinfo", lambda: "flags\t\t: fpu sse4_2 avx avx2 fma\n")
    monkeypatch.setattr(machine.platform, "machine", lambda: "x86_64")
    rec, path = run_quantize(runs, "avx2", 'quantize.keep_fp32="none"')
    form = rec.metrics["int8_form"]
    assert form["weights"] == "reduced_range_7bit" and "without VNNI" in form["reason"]
    assert 0 < form["max_abs_weight"] <= 64 and int8_weight_max(onnx.load(path)) == form["max_abs_weight"]
    assert rec.metrics["forms"]["tensorrt"]["int8_form"]["weights"] == "full_range"   # the GPU's form


def test_listed_nodes_are_honoured(runs):
    g = onnx.load(stage_dir(runs / "base", "export_onnx") / "model.onnx").graph
    gemm = [n.name for n in g.node if n.op_type == "Gemm"]
    assert gemm
    rec, path = run_quantize(runs, "listed", 'quantize.keep_fp32="listed"', f"quantize.keep_fp32_nodes={gemm}")
    assert rec.metrics["layer_choice"] == {"mode": "listed", "keep_fp32": gemm}
    assert fp32_nodes(path) == set(gemm)


def test_listed_unknown_node_is_one_line_error(runs):
    with pytest.raises(EdgeError, match="keep_fp32: .* no node named 'nope'") as e:
        run_quantize(runs, "bad", 'quantize.keep_fp32="listed"', 'quantize.keep_fp32_nodes=["nope"]')
    assert "\n" not in str(e.value)


def test_listed_without_nodes_is_refused(runs):
    with pytest.raises(EdgeError, match="keep_fp32_nodes"):
        run_quantize(runs, "empty", 'quantize.keep_fp32="listed"')


def test_bad_mode_is_refused_before_running(runs):
    with pytest.raises(EdgeError, match="quantize.keep_fp32 = 'some'"):
        run_quantize(runs, "mode", 'quantize.keep_fp32="some"')
