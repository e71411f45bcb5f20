"""The built-in tasks and the registry, without a pipeline run (test_task_seam.py runs one)."""
import numpy as np
import pytest
from conftest import one_line

from pipeline import tasks
from pipeline.errors import PipelineError
from pipeline.tasks import Classify, Encode, Task

LABELS = np.array([0, 1, 2, 1])
LOGITS = np.array([[5, 0, 0], [0, 5, 0], [0, 0, 5], [5, 0, 0]], np.float32)   # 3 of 4 right


def test_classify_scores_top1_and_agreement_from_the_logits():
    c = tasks.named("classify")
    assert c.metrics({"logits": LOGITS}, LABELS) == {"top1": 75.0}
    # an unnamed tuple ends with the logits: the last output is read when none is called "logits"
    assert c.metrics({"tokens": np.zeros((4, 2, 3)), "out": LOGITS}, LABELS) == {"top1": 75.0}
    flipped = LOGITS.copy()
    flipped[3] = [0, 5, 0]
    assert c.agreement({"logits": flipped}, {"logits": LOGITS}) == 75.0
    assert c.baseline_extras({"logits": LOGITS}) == {"chance_top1": pytest.approx(33.3333)}


def test_the_drop_check_points_the_way_the_task_says_is_better():
    up = Classify().drop_check(97.0, 98.0, 0.5)
    assert (up.metric, up.drop, up.passed) == ("top1", 1.0, False)

    class Error(Task):
        kind, metric, higher_is_better = "error", "mae", False
    grew = Error().drop_check(0.30, 0.10, 0.5, label="tensorrt")
    assert (grew.metric, grew.drop, grew.passed) == ("mae (tensorrt)", pytest.approx(0.2), True)
    assert not Error().drop_check(0.9, 0.1, 0.5).passed


def test_the_baseline_must_beat_chance_by_ten_points_unless_a_floor_is_given():
    c = Classify()
    check = c.baseline_check({"top1": 41.0, "chance_top1": 33.3333}, None)
    assert not check.passed and "chance is 33.3 % for 3 classes" in check.hint
    assert c.baseline_check({"top1": 41.0, "chance_top1": 33.3333}, 40.0).passed


def test_an_encoder_adds_token_fidelity_against_what_the_baseline_kept():
    e = Encode()
    tokens = np.random.default_rng(0).normal(size=(4, 3, 8)).astype(np.float32)
    m = e.metrics({"tokens": tokens, "logits": LOGITS}, LABELS, {"tokens": tokens})
    assert m["top1"] == 75.0 and m["token_cos_mean"] == pytest.approx(1.0) and m["token_cos_p1"] == pytest.approx(1.0)
    fid = e.fidelity_vs_fp32({"tokens": -tokens, "logits": LOGITS}, {"tokens": tokens, "logits": LOGITS})
    assert fid["token_cos_vs_fp32"]["token_cos_mean"] == pytest.approx(-1.0)
    (check,) = e.fidelity_checks(fid, 0.99)
    assert check.metric == "token_cos_mean_vs_fp32" and not check.passed
    assert e.keeps == ("tokens",) and Classify().keeps == ()


def test_auto_resolves_from_the_output_names_and_a_named_kind_must_exist():
    assert tasks.resolve("auto", ("tokens", "logits")).kind == "encode"
    assert tasks.resolve("auto", ("logits",)).kind == "classify"
    assert tasks.resolve("classify", ("tokens", "logits")).kind == "classify"   # the config wins over auto
    with pytest.raises(PipelineError) as e:
        tasks.resolve("detect", ("logits",))
    assert one_line(e.value) == "task.kind: unknown 'detect'; expected auto or one of generate, vlm, encode, classify"


def test_a_registered_task_is_asked_first_and_can_be_removed_again():
    class Boxes(Task):
        kind, metric = "boxes", "map"

        def claims(self, output_names):
            return "boxes" in output_names
    tasks.register(Boxes())
    try:
        assert tasks.kinds()[0] == "boxes" and tasks.resolve("auto", ("boxes", "logits")).kind == "boxes"
        assert tasks.resolve("auto", ("logits",)).kind == "classify"
    finally:
        tasks.unregister("boxes")
    assert "boxes" not in tasks.kinds()
    with pytest.raises(PipelineError):
        tasks.register(object())
    with pytest.raises(PipelineError):
        tasks.unregister("classify")


def test_a_tasks_figures_are_typed_at_the_json_edge():
    from pipeline.tasks.classify import ClassifyMetrics
    from pipeline.tasks.encode import EncodeMetrics
    c, e = Classify(), Encode()
    stage = {"task": "classify", "top1": 97.5, "macs": 10, "fp32_top1": 98.0}   # a stage's own keys beside them
    assert ClassifyMetrics.from_json(stage) == ClassifyMetrics(97.5)
    assert ClassifyMetrics(97.5).to_json() == {"top1": 97.5}
    assert c.value(stage) == 97.5 and c.value(stage, "fp32_top1") == 98.0
    assert EncodeMetrics.from_json({"top1": 1.0, "token_cos_mean": 0.5}) == EncodeMetrics(1.0, token_cos_mean=0.5)
    with pytest.raises(TypeError):   # a record without the task's figure is not read as one
        c.value({"task": "classify", "macs": 10})
    assert e.figures is EncodeMetrics and c.figures is ClassifyMetrics
