"""`make gpu-check` on a machine without CUDA: it runs, says what it skipped and why, and claims nothing; the
decoder's checks it would run on a GPU take the device as an argument and pass here on the CPU."""
import json

import pytest

from benchmarks import gpu_check
from benchmarks.gpu_check_llm import decoder_checks, distill_step, ort_greedy_equal


def test_without_cuda_it_runs_and_prints_skipped(tmp_path, capsys, one_thread):
    import torch
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: `make gpu-check` runs the checks instead")
    out = tmp_path / "gpu_check.json"
    assert gpu_check.main(["--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "decoder distillation on CUDA: skipped: no CUDA" in printed
    assert "decoder decode on onnxruntime CUDA: skipped:" in printed and "SKIPPED | no CUDA" in printed
    doc = json.loads(out.read_text())
    assert doc["cuda"] is False and all("skipped" in c for c in doc["decoder"].values())


@pytest.mark.slow
def test_the_decoder_checks_pass_on_the_cpu(one_thread):
    d = distill_step("cpu")
    assert d["steps"] >= 3 and d["tensors_changed"] > 0 and d["student_on"] == ["cpu"]
    o = ort_greedy_equal(("CPUExecutionProvider",))
    assert o["greedy_equal"] == o["prompts"] == 3 and all(len(t) >= 1 for t in o["tokens"])


def test_a_missing_provider_is_a_skip_with_its_reason(monkeypatch):
    import edgerun.ort
    monkeypatch.setattr(edgerun.ort, "available_ort_providers", lambda: ["CPUExecutionProvider"])
    lines = []
    checks = decoder_checks(cuda=False, log=lines.append)
    assert checks["ort_cuda_decode"]["skipped"].startswith("onnxruntime here has no CUDAExecutionProvider")
    assert lines[1].startswith("decoder decode on onnxruntime CUDA: skipped: onnxruntime here has no")
