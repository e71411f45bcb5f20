"""finetune: distillation recovers a pruned model, early stopping, determinism, DDP on two CPU processes."""
import time

import numpy as np
import pytest
import torch
import torch.nn as nn

from pipeline.data import load_split, normalize
from pipeline.errors import PipelineError
from pipeline.finetune import evaluate_top1, finetune, finetune_ddp, kd_loss, split_train_val
from pipeline.models.cnn import SimpleCNN
from pipeline.prune import prune_model
from pipeline.train import train_classifier


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The CI box has 2 shared cores: one intra-op thread is several times faster than two here."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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


@pytest.fixture(scope="module")
def teacher(mnist_small):
    x, y, _, _ = mnist_small
    torch.manual_seed(0)
    model = cnn((8, 16))
    train_classifier(model, x, y, epochs=2, lr=2e-3, batch_size=32, seed=0)
    return model.eval()


def pruned_copy(teacher, x):
    student = cnn((8, 16))
    student.load_state_dict(teacher.state_dict())
    student, _ = prune_model(student, torch.from_numpy(x[:1]), target="ratio", ratio=0.75)
    return student


def test_kd_improves_the_just_pruned_model(mnist_small, teacher):
    x, y, xt, yt = mnist_small
    assert evaluate_top1(teacher, xt, yt) > 85.0
    student = pruned_copy(teacher, x)
    before = evaluate_top1(student, xt, yt)
    info = finetune(student, teacher, x, y, epochs=3, lr=3e-3, batch_size=32, kd_weight=0.7, progress=False,
                    device="cpu")
    after = evaluate_top1(student, xt, yt)
    assert after > before + 5.0, (before, after)
    assert info["steps"] == 3 * 63 and info["epochs_run"] == pytest.approx(3.0)
    assert not info["stopped_early"] and len(info["losses"]) == 3 and info["seconds"] > 0
    assert info["losses"][-1] < info["losses"][0]


def test_early_stop_on_a_train_slice(mnist_small, teacher):
    x, y, _, _ = mnist_small
    (x_tr, y_tr), val = split_train_val(x, y, val_size=200, seed=0)
    assert len(x_tr) == 1800 and len(val[0]) == 200
    student = pruned_copy(teacher, x)
    info = finetune(student, teacher, x_tr, y_tr, epochs=5, lr=3e-3, batch_size=32, early_stop_top1=60.0,
                    val=val, eval_every_steps=5, progress=False, device="cpu")
    assert info["stopped_early"]
    assert info["steps"] < 5 * 57 and info["steps"] % 5 == 0
    assert info["val_top1"] >= 60.0


def test_fractional_epochs_schedules_and_progress_flag(mnist_small):
    x, y, _, _ = mnist_small
    for schedule, optimizer, progress in [("cosine", "sgd", True), ("constant", "adam", False)]:
        model = cnn((2, 4))
        info = finetune(model, None, x[:640], y[:640], epochs=0.5, lr=1e-2, batch_size=64, schedule=schedule,
                        optimizer=optimizer, progress=progress, device="cpu")
        assert info["steps"] == 5 and info["epochs_run"] == pytest.approx(0.5)


def test_seeded_runs_are_identical(mnist_small, teacher):
    x, y, _, _ = mnist_small
    a, b = pruned_copy(teacher, x), pruned_copy(teacher, x)
    for m in (a, b):
        finetune(m, teacher, x[:320], y[:320], epochs=1, seed=3, progress=False, device="cpu")
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_precomputed_teacher_logits_match_the_teacher(mnist_small, teacher):
    x, y, _, _ = mnist_small
    with torch.no_grad():
        logits = teacher(torch.from_numpy(x[:320])).numpy()
    a, b = pruned_copy(teacher, x), pruned_copy(teacher, x)
    finetune(a, teacher, x[:320], y[:320], epochs=1, progress=False, device="cpu")
    finetune(b, None, x[:320], y[:320], epochs=1, progress=False, device="cpu", teacher_logits=logits)
    for p, q in zip(a.state_dict().values(), b.state_dict().values()):
        torch.testing.assert_close(p, q)


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
    x, y, _, _ = mnist_small
    torch.manual_seed(0)
    teacher, student = TokenNet().eval(), TokenNet()
    start = [p.clone() for p in student.parameters()]
    info = finetune(student, teacher, x[:256], y[:256], epochs=1, token_weight=0.5, progress=False, device="cpu")
    assert np.isfinite(info["losses"]).all()
    assert any(not torch.equal(p, q) for p, q in zip(start, student.parameters()))


def test_kd_loss_reduces_to_ce():
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.tensor([1, 2, 3, 4])
    assert torch.allclose(kd_loss(s, t, y, 4.0, 0.0), nn.functional.cross_entropy(s, y))
    assert kd_loss(s, s.clone(), y, 4.0, 1.0).abs() < 1e-6  # student equals teacher: no KL


def test_bad_arguments(mnist_small):
    x, y, _, _ = mnist_small
    m = cnn((2, 4))
    for kwargs in [dict(schedule="step"), dict(optimizer="lion"), dict(kd_weight=1.5), dict(epochs=0),
                   dict(early_stop_top1=90.0)]:
        with pytest.raises(PipelineError) as e:
            finetune(m, None, x[:64], y[:64], progress=False, **kwargs)
        assert "\n" not in str(e.value)


@pytest.mark.slow  # ~40 s on the shared 2-core box: two spawned interpreters import torch
def test_ddp_two_gloo_processes(mnist_small, teacher):
    x, y, _, _ = mnist_small
    student = pruned_copy(teacher, x)
    start = {k: v.clone() for k, v in student.state_dict().items()}
    t0 = time.perf_counter()
    info = finetune_ddp(student, teacher, x[:512], y[:512], nproc=2, epochs=1, batch_size=32, lr=3e-3,
                        progress=False)
    assert info["world_size"] == 2 and info["backend"] == "gloo"
    assert info["steps"] == 8  # 512 / 2 ranks / 32 per rank
    assert any(not torch.equal(start[k], v) for k, v in student.state_dict().items())
    with torch.no_grad():
        assert student(torch.from_numpy(x[:3])).shape == (3, 10)
    assert time.perf_counter() - t0 < 120
