"""pipeline.train: one loop for the baseline (no teacher) and the fine-tune (distillation), early stopping on a
train slice, determinism, progress lines in logs, DDP on two CPU processes."""
import io

import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline.data import load_split, normalize
from pipeline.errors import PipelineError
from pipeline.models.cnn import SimpleCNN
from pipeline.progress import LOG_EVERY_S, Progress
from pipeline.prune import prune_model
from pipeline.tasks import Encode
from pipeline.train import evaluate_top1, kd_loss, logits_of, split_train_val, train
from pipeline.train_dist import train_ddp

pytestmark = pytest.mark.usefixtures("one_thread")


def shrink(x):
    """28×28 → 14×14 (2×2 mean): real MNIST digits at a quarter of the compute."""
    return x.reshape(len(x), 1, 14, 2, 14, 2).mean(axis=(3, 5))


@pytest.fixture(scope="module")
def mnist_small():
    tr = load_split("mnist", "data/mnist", "train", subset=2000, seed=1)
    te = load_split("mnist", "data/mnist", "test", subset=500, seed=1)
    norm = lambda s: shrink(normalize(s.images, [0.1307], [0.3081]))  # noqa: E731
    return norm(tr), tr.labels.astype(np.int64), norm(te), te.labels.astype(np.int64)


def cnn(channels):
    return SimpleCNN(channels=channels, image_size=14)


def same_weights(a, b) -> bool:
    return all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


@pytest.fixture(scope="module")
def teacher(mnist_small):
    """The baseline, trained by the same loop as the fine-tune: no teacher, constant lr."""
    x, y, _, _ = mnist_small
    torch.manual_seed(0)
    model = cnn((8, 16))
    info = train(model, None, x, y, epochs=2, lr=2e-3, batch_size=32, seed=0, schedule="constant",
                 progress=None, device="cpu")
    assert info["steps"] == 2 * 63 and len(info["losses"]) == 2 and info["losses"][1] < info["losses"][0]
    assert not model.training   # returned ready to evaluate
    return model


def pruned_copy(teacher, x):
    student = cnn((8, 16))
    student.load_state_dict(teacher.state_dict())
    student, _ = prune_model(student, torch.from_numpy(x[:1]), target="ratio", ratio=0.75)
    return student


def test_the_baseline_trains_well_above_chance(mnist_small, teacher):
    _, _, xt, yt = mnist_small
    assert evaluate_top1(teacher, xt, yt) > 85.0   # chance is 10 %


def test_kd_improves_the_just_pruned_model(mnist_small, teacher):
    x, y, xt, yt = mnist_small
    student = pruned_copy(teacher, x)
    before = evaluate_top1(student, xt, yt)
    info = train(student, teacher, x, y, epochs=3, lr=3e-3, batch_size=32, kd_weight=0.7, progress=None,
                 device="cpu")
    after = evaluate_top1(student, xt, yt)
    assert after > before + 5.0, (before, after)
    assert info["steps"] == 3 * 63 and info["epochs_run"] == pytest.approx(3.0)
    assert not info["stopped_early"] and len(info["losses"]) == 3 and info["seconds"] > 0
    assert info["losses"][-1] < info["losses"][0]


def test_one_loop_no_teacher_is_plain_cross_entropy(mnist_small, teacher):
    """A teacher with kd_weight 0, or kd_weight without a teacher, trains exactly as the baseline does."""
    x, y, _, _ = mnist_small
    models = [cnn((2, 4)) for _ in range(3)]
    for m in models[1:]:
        m.load_state_dict(models[0].state_dict())
    common = dict(epochs=0.5, lr=1e-2, batch_size=64, seed=5, progress=None, device="cpu")
    train(models[0], None, x[:640], y[:640], kd_weight=0.0, **common)
    train(models[1], teacher, x[:640], y[:640], kd_weight=0.0, **common)
    train(models[2], None, x[:640], y[:640], kd_weight=0.9, **common)
    assert same_weights(models[0], models[1]) and same_weights(models[0], models[2])


def test_early_stop_on_a_train_slice(mnist_small, teacher):
    x, y, _, _ = mnist_small
    (x_tr, y_tr), val = split_train_val(x, y, val_size=200, seed=0)
    assert len(x_tr) == 1800 and len(val[0]) == 200
    student = pruned_copy(teacher, x)
    info = train(student, teacher, x_tr, y_tr, epochs=5, lr=3e-3, batch_size=32, early_stop_top1=60.0,
                 val=val, eval_every_steps=5, progress=None, device="cpu")
    assert info["stopped_early"]
    assert info["steps"] < 5 * 57 and info["steps"] % 5 == 0
    assert info["val_top1"] >= 60.0 and info["val_history"][-1] == (info["steps"], info["val_top1"])


def test_split_train_val_refuses_an_empty_side(mnist_small):
    x, y, _, _ = mnist_small
    (x_tr, _), (x_val, _) = split_train_val(x[:100], y[:100], val_size=0.1, seed=0)
    assert len(x_tr) == 90 and len(x_val) == 10
    for size in (0, 100, 500):
        with pytest.raises(PipelineError, match="finetune.val_size"):
            split_train_val(x[:100], y[:100], val_size=size)


@pytest.mark.parametrize("schedule,optimizer", [("cosine", "sgd"), ("constant", "adam"), ("onecycle", "adam")])
def test_fractional_epochs_and_schedules(mnist_small, schedule, optimizer):
    x, y, _, _ = mnist_small
    model = cnn((2, 4))
    info = train(model, None, x[:640], y[:640], epochs=0.5, lr=1e-2, batch_size=64, schedule=schedule,
                 optimizer=optimizer, progress=None, device="cpu")
    assert info["steps"] == 5 and info["epochs_run"] == pytest.approx(0.5)
    assert np.isfinite(info["losses"]).all()


def test_seeded_runs_are_identical(mnist_small, teacher):
    x, y, _, _ = mnist_small
    a, b = pruned_copy(teacher, x), pruned_copy(teacher, x)
    for m in (a, b):
        train(m, teacher, x[:320], y[:320], epochs=1, seed=3, progress=None, device="cpu")
    assert same_weights(a, b)
    c = pruned_copy(teacher, x)
    train(c, teacher, x[:320], y[:320], epochs=1, seed=4, progress=None, device="cpu")
    assert not same_weights(a, c)   # the seed is what made them equal


def test_precomputed_teacher_logits_match_the_teacher(mnist_small, teacher):
    x, y, _, _ = mnist_small
    with torch.no_grad():
        logits = teacher(torch.from_numpy(x[:320])).numpy()
    a, b = pruned_copy(teacher, x), pruned_copy(teacher, x)
    train(a, teacher, x[:320], y[:320], epochs=1, progress=None, device="cpu")
    train(b, None, x[:320], y[:320], epochs=1, progress=None, device="cpu", teacher_logits=logits)
    for p, q in zip(a.state_dict().values(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(p, q)
    with pytest.raises(PipelineError, match="320 images"):
        train(b, None, x[:320], y[:320], epochs=1, progress=None, device="cpu", teacher_logits=logits[:10])


class TokenNet(nn.Module):
    """Returns (tokens, logits) like the vision tower."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(1, 8, 7, 7)  # 14×14 → 2×2 = 4 tokens
        self.classifier = nn.Linear(8, 10)

    def forward(self, x):
        tokens = self.embed(x).flatten(2).transpose(1, 2)
        return tokens, self.classifier(tokens.mean(1))


def test_token_distillation_for_tuple_outputs(mnist_small):
    x, y, xt, yt = mnist_small
    torch.manual_seed(0)
    teacher, student = TokenNet().eval(), TokenNet()
    start = [p.clone() for p in student.parameters()]
    info = train(student, teacher, x[:256], y[:256], epochs=1, token_weight=0.5, progress=None, device="cpu",
                 task=Encode())   # the token term is the encode task's: a classifier has no tokens
    assert np.isfinite(info["losses"]).all()
    assert any(not torch.equal(p, q) for p, q in zip(start, student.parameters(), strict=True))
    assert 0.0 <= evaluate_top1(student, xt, yt) <= 100.0   # evaluation reads the logits of the tuple


def test_logits_of_and_evaluate_restore_the_mode(mnist_small):
    x, y, _, _ = mnist_small
    t = torch.zeros(2, 3)
    assert logits_of(t) is t and logits_of((torch.ones(1), t)) is t
    model = cnn((2, 4)).train()
    evaluate_top1(model, x[:50], y[:50])
    assert model.training


def test_kd_loss_reduces_to_ce():
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    assert torch.allclose(kd_loss(s, t, y, 4.0, 0.0), nn.functional.cross_entropy(s, y))
    assert torch.allclose(kd_loss(s, None, y, 4.0, 0.7), nn.functional.cross_entropy(s, y))
    assert kd_loss(s, s.clone(), y, 4.0, 1.0).abs() < 1e-6  # student equals teacher: no KL


def test_bad_arguments_are_one_line(mnist_small):
    x, y, _, _ = mnist_small
    m = cnn((2, 4))
    for kwargs, what in [(dict(schedule="step"), "finetune.schedule"), (dict(optimizer="lion"), "finetune.optimizer"),
                         (dict(kd_weight=1.5), "finetune.kd_weight"), (dict(epochs=0), "finetune.epochs"),
                         (dict(batch_size=0), "finetune.batch_size"), (dict(early_stop_top1=90.0), "val=")]:
        with pytest.raises(PipelineError, match=what) as e:
            train(m, None, x[:64], y[:64], progress=None, **kwargs)
        assert "\n" not in str(e.value)
    with pytest.raises(PipelineError, match="64 images but 10 labels"):
        train(m, None, x[:64], y[:10], progress=None)


# ------------------------------------------------------------------ progress in logs

class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_progress_prints_elapsed_and_eta_lines_when_not_a_terminal():
    clock, stream = FakeClock(), io.StringIO()   # StringIO.isatty() is False: a log file, CI, `tee`
    bar = Progress("fine-tune", 4, stream=stream, clock=clock)
    clock.t += 1.0
    bar.update(1, "loss 2.0")
    assert stream.getvalue() == ""               # at most one line every LOG_EVERY_S seconds
    clock.t += LOG_EVERY_S + 7.0                 # 13 s after the start
    bar.update(2, "loss 1.5")
    clock.t += 65.0                              # 78 s after the start
    bar.update(3, "loss 1.0")
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines == ["  fine-tune: 2/4 (50 %) 00:13 elapsed, ETA 00:13  loss 1.5",
                     "  fine-tune: 3/4 (75 %) 01:18 elapsed, ETA 00:26  loss 1.0",
                     "  fine-tune: 3/4 (75 %) 01:18 elapsed, ETA 00:26  loss 1.0"]   # close: the final state


def test_progress_before_any_step_has_no_eta():
    clock, stream = FakeClock(), io.StringIO()
    Progress("baseline", 10, stream=stream, clock=clock).close()
    assert stream.getvalue().strip() == "baseline: 0/10 (0 %) 00:00 elapsed, ETA --:--"


def test_train_reports_progress_to_a_non_terminal_stderr(mnist_small, capsys):
    x, y, _, _ = mnist_small
    train(cnn((2, 4)), None, x[:640], y[:640], epochs=0.5, batch_size=64, progress="baseline", device="cpu")
    err = capsys.readouterr().err   # pytest's captured stderr is not a terminal
    last = err.rstrip().splitlines()[-1]
    assert last.startswith("  baseline: 5/5 (100 %)") and "elapsed, ETA" in last and "loss" in last
    train(cnn((2, 4)), None, x[:640], y[:640], epochs=0.5, batch_size=64, progress=None, device="cpu")
    assert capsys.readouterr().err == ""


@pytest.mark.slow  # ~40 s on the shared 2-core box: two spawned interpreters import torch
def test_ddp_two_gloo_processes(mnist_small, teacher):
    x, y, _, _ = mnist_small
    student = pruned_copy(teacher, x)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    info = train_ddp(student, teacher, x[:512], y[:512], nproc=2, epochs=1, batch_size=32, lr=3e-3, progress=None)
    assert info["world_size"] == 2 and info["backend"] == "gloo"
    assert info["steps"] == 8  # 512 / 2 ranks / 32 per rank
    assert any(not torch.equal(start[k], v) for k, v in student.state_dict().items())
    with torch.no_grad():
        assert student(torch.from_numpy(x[:3])).shape == (3, 10)
