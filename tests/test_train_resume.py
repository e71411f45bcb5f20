"""Checkpoints inside one training run (pipeline/train_ckpt.py): an interrupted run resumed from its checkpoint ends
on the same weights, bit for bit, as one never interrupted; another run's, another shape's or a damaged checkpoint
is never loaded."""
import shutil

import numpy as np
import pytest
import tiny_decoder
import torch

from pipeline import train_ckpt as ckpt
from pipeline.errors import PipelineError
from pipeline.tasks.generate import Generate
from pipeline.train import run_shape, train

pytestmark = pytest.mark.usefixtures("one_thread")


class Interrupted(Exception):
    pass


class StopsAt(Generate):
    """The generate task, interrupted (as a kill would) when the loop has counted step ``at``."""
    def __init__(self, at):
        self.at, self.calls = at, 0

    def train_hits(self, student_out, labels):
        self.calls += 1
        if self.calls == self.at:
            raise Interrupted(f"step {self.at}")
        return super().train_hits(student_out, labels)


def rows(n=24, t=10, seed=3):
    ids = np.random.default_rng(seed).integers(3, tiny_decoder.VOCAB, (n, t)).astype(np.int64)
    return ids, ids.copy()


def student():
    m = tiny_decoder.model(seed=1)
    for layer in m.model.layers:   # dropout draws from torch's global RNG: the checkpoint must restore it
        layer.self_attn.attention_dropout = 0.2
    return m


def run(model, task=None, checkpoint=None, log=None):
    x, y = rows()
    return train(model, tiny_decoder.model(seed=0), x, y, epochs=2, lr=3e-3, batch_size=4, kd_temperature=2.0,
                 kd_weight=0.5, seed=7, device="cpu", progress=None, task=task or Generate(), checkpoint=checkpoint,
                 log=log)


@pytest.fixture(scope="module")
def uninterrupted():
    m = student()
    info = run(m)
    return m.state_dict(), info


def same_weights(a, b):
    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[0]}"


def test_an_interrupted_run_resumes_to_the_same_weights_bit_for_bit(uninterrupted, tmp_path):
    ref_state, ref_info = uninterrupted
    ck = ckpt.Checkpoint(tmp_path / "run.pt", every=5, key="fp-abc/rung0")
    # 12 steps, 6 per epoch: saved at steps 5 and 10, killed in step 11 (the second epoch: its order must be
    # drawn again from the generator's state at the epoch's start, not from the seed)
    with pytest.raises(Interrupted):
        run(student(), task=StopsAt(11), checkpoint=ck)
    assert ck.path.is_file()
    resumed = student()
    info = run(resumed, checkpoint=ck)
    assert info["resumed_at_step"] == 10 and info["steps"] == 12
    same_weights(resumed.state_dict(), ref_state)
    assert info["losses"] == ref_info["losses"]
    assert not torch.equal(resumed.state_dict()["lm_head.weight"], student().state_dict()["lm_head.weight"])
    # the finished run is saved too: a rerun (the stage killed after this training run) trains nothing again
    again = student()
    info = run(again, checkpoint=ck)
    assert info["resumed_at_step"] == 12
    same_weights(again.state_dict(), ref_state)


def test_a_checkpoint_of_another_fingerprint_is_not_used(uninterrupted, tmp_path):
    ck = ckpt.Checkpoint(tmp_path / "run.pt", every=5, key="fp-abc/rung0")
    with pytest.raises(Interrupted):
        run(student(), task=StopsAt(8), checkpoint=ck)
    other = ckpt.Checkpoint(tmp_path / "other.pt", every=5, key="fp-xyz/rung0")
    shutil.copy(ck.path, other.path)
    lines = []
    m = student()
    info = run(m, checkpoint=other, log=lines.append)
    assert "resumed_at_step" not in info
    assert len(lines) == 1 and "another run" in lines[0]
    same_weights(m.state_dict(), uninterrupted[0])


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_a_damaged_checkpoint_is_ignored_with_a_line_and_removed(tmp_path, damage):
    x, _ = rows()
    shape = run_shape(len(x), 4, 2)
    ck = ckpt.Checkpoint(tmp_path / "run.pt", every=5, key="k")
    with pytest.raises(Interrupted):
        run(student(), task=StopsAt(6), checkpoint=ck)
    assert ckpt.read(ck, shape) is not None
    blob = bytearray(ck.path.read_bytes())
    if damage == "truncate":
        blob = blob[:len(blob) // 2]
    elif damage == "flip":
        blob[-100] ^= 0xFF
    else:
        blob = bytearray(b"PK\x03\x04" + bytes(200))
    ck.path.write_bytes(bytes(blob))
    lines = []
    assert ckpt.read(ck, shape, lines.append) is None
    assert len(lines) == 1 and "ignored" in lines[0] and not ck.path.exists()


def test_a_checkpoint_of_another_shape_of_run_is_refused(tmp_path):
    x, _ = rows()
    ck = ckpt.Checkpoint(tmp_path / "run.pt", every=5, key="k")
    with pytest.raises(Interrupted):
        run(student(), task=StopsAt(6), checkpoint=ck)
    lines = []
    assert ckpt.read(ck, run_shape(len(x), 8, 2), lines.append) is None
    assert "shape" in lines[0]


@pytest.mark.parametrize("every", [0, -1, 1.5, True])
def test_checkpoint_every_must_be_a_whole_number_of_steps(tmp_path, every):
    with pytest.raises(PipelineError, match="checkpoint_every"):
        ckpt.Checkpoint(tmp_path / "x.pt", every=every, key="k")
