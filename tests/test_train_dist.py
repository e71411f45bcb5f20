"""The one training loop over two gloo processes on a tiny decoder (pipeline/train_dist.py): DDP and FSDP2 give what
one process gives with both ranks' batches together (so the ranks saw disjoint halves of every batch, and rank 0's
weights came back), and an interrupted DDP run resumes from rank 0's checkpoint to the same weights."""
import math

import numpy as np
import pytest
import tiny_decoder
import torch

from pipeline import train_ckpt as ckpt
from pipeline.errors import PipelineError
from pipeline.tasks.generate import Generate
from pipeline.train import train
from pipeline.train_dist import train_ddp

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.slow]   # ~20 s a spawn: two interpreters start

N, T = 16, 8
# SGD: Adam's first steps are about lr * sign(gradient), which turns a rounding difference on a gradient that is
# nearly zero into a whole step; with SGD the two ways of summing the same gradient agree to rounding
KW = dict(epochs=2, lr=0.05, optimizer="sgd", kd_temperature=2.0, kd_weight=0.5, seed=5, progress=None)


class StopsAt(Generate):
    """Interrupted when a rank has counted step ``at`` (module level: it travels to the ranks)."""
    def __init__(self, at):
        self.at, self.calls = at, 0

    def train_hits(self, student_out, labels):
        self.calls += 1
        if self.calls == self.at:
            raise RuntimeError(f"interrupted at step {self.at}")
        return super().train_hits(student_out, labels)


def rows():
    # every row trains on all its positions, so the mean over both ranks' batches is the mean of the ranks' means
    ids = np.random.default_rng(4).integers(3, tiny_decoder.VOCAB, (N, T)).astype(np.int64)
    return ids, ids.copy()


@pytest.fixture(scope="module")
def one_process():
    """The reference: one process, batch 8 = the two ranks' batches of 4 together."""
    m = tiny_decoder.model(seed=1)
    info = train(m, tiny_decoder.model(seed=0), *rows(), batch_size=8, device="cpu", task=Generate(), **KW)
    return m.state_dict(), info


def close(state, ref, atol=1e-6):
    worst = max(float((state[k] - ref[k]).abs().max()) for k in ref)
    assert worst < atol, f"largest difference {worst:.2e}"


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_ranks_give_what_one_process_gives_with_their_batches_together(one_process, sharding):
    ref, ref_info = one_process
    start = tiny_decoder.model(seed=1)
    m = tiny_decoder.model(seed=1)
    info = train_ddp(m, tiny_decoder.model(seed=0), *rows(), nproc=2, sharding=sharding, batch_size=4,
                     task=Generate(), **KW)
    assert (info["world_size"], info["backend"], info["sharding"], info["steps"]) == (2, "gloo", sharding, 4)
    assert all(math.isfinite(v) for v in info["losses"]) and info["losses"][1] < info["losses"][0]
    assert any(not torch.equal(v, start.state_dict()[k]) for k, v in m.state_dict().items())
    close(m.state_dict(), ref)


def test_an_interrupted_ddp_run_resumes_from_rank_0s_checkpoint(tmp_path):
    x, y = rows()
    kw = dict(nproc=2, batch_size=2, **{**KW, "epochs": 1, "optimizer": "adam", "lr": 3e-3})   # 4 steps a rank
    ck = ckpt.Checkpoint(tmp_path / "ddp.pt", every=2, key="fp/ddp")
    whole = tiny_decoder.model(seed=1)
    train_ddp(whole, tiny_decoder.model(seed=0), x, y, task=Generate(), **kw)
    with pytest.raises(Exception, match="interrupted at step 3"):
        train_ddp(tiny_decoder.model(seed=1), tiny_decoder.model(seed=0), x, y, task=StopsAt(3), checkpoint=ck, **kw)
    m = tiny_decoder.model(seed=1)
    info = train_ddp(m, tiny_decoder.model(seed=0), x, y, task=Generate(), checkpoint=ck, **kw)
    assert info["resumed_at_step"] == 2 and info["steps"] == 4
    for k, v in whole.state_dict().items():
        assert torch.equal(m.state_dict()[k], v), k


def test_fsdp_refuses_checkpoints_and_early_stopping_in_one_line(tmp_path):
    x, y = rows()
    ck = ckpt.Checkpoint(tmp_path / "f.pt", every=2, key="k")
    with pytest.raises(PipelineError, match="checkpoint_every") as e:
        train_ddp(tiny_decoder.model(), None, x, y, sharding="fsdp", checkpoint=ck, task=Generate())
    assert "\n" not in str(e.value)
    with pytest.raises(PipelineError, match="early_stop"):
        train_ddp(tiny_decoder.model(), None, x, y, sharding="fsdp", early_stop_top1=50.0, val=(x, y))
    with pytest.raises(PipelineError, match="sharding"):
        train_ddp(tiny_decoder.model(), None, x, y, sharding="zero3")
