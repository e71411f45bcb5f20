"""Checkpoints inside one training run (pipeline/train.py's loop), so that an interrupted run resumes where it was.

A checkpoint holds everything the next step depends on: the weights, the optimizer's and the LR schedule's states,
the step and the position in the epoch, the shuffling generator's state at the start of the epoch (the epoch's
order is drawn again from it), torch's global RNG (dropout) and the running figures. Resumed on the CPU, the run
ends on the same weights, bit for bit, as one that was never interrupted (tests/test_train_resume.py).

Never silently wrong: a checkpoint carries a ``key`` (the stage's fingerprint hash and which training run of the
stage) and the sha256 of its payload in its header. A file whose hash, key or shape of run (total steps, steps per
epoch, world size) does not match is ignored with a logged line and removed, never half-loaded. Files are written
whole or not at all (edgerun.io.atomic_write). Where the file lives and when it goes is the runner's business
(pipeline/runner.py: ``<run>/.checkpoints/<stage>-<fingerprint>/``, removed once the stage finished).
"""
from __future__ import annotations

import dataclasses
import io
from pathlib import Path
from typing import Callable

import torch

from edgerun.io import atomic_write, sha256_bytes
from pipeline.errors import PipelineError

MAGIC = b"edgepipe-train-checkpoint 1\n"
FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """Where one training run keeps its checkpoint, how often, and the key a file must carry to be resumed."""
    path: Path
    every: int        # optimizer steps between saves (> 0); the run's end is saved too
    key: str          # the stage's fingerprint hash + which training run of the stage

    def __post_init__(self):
        if isinstance(self.every, bool) or not isinstance(self.every, int) or self.every < 1:
            raise PipelineError(f"finetune.checkpoint_every: must be a whole number of steps >= 1, got {self.every!r}")
        if not self.key:
            raise PipelineError("checkpoint: an empty key would match any run's checkpoint")


@dataclasses.dataclass
class LoopState:
    """The training loop's own position and running figures (what a checkpoint restores beside the states)."""
    step: int = 0
    batch: int = 0                  # next batch of the current epoch (0: the epoch has not begun)
    epoch_loss: float = 0.0
    epoch_steps: int = 0
    run_loss: float = 0.0
    run_correct: int = 0
    run_seen: int = 0
    losses: list = dataclasses.field(default_factory=list)
    val_history: list = dataclasses.field(default_factory=list)
    last_val: float | None = None
    stopped_early: bool = False
    seconds: float = 0.0            # training time of earlier attempts
    resumed_at: int | None = None   # the step this attempt resumed at (None: from the start)
    g_epoch: torch.Tensor | None = None   # the shuffling generator's state when the current epoch began


@dataclasses.dataclass(frozen=True)
class RunShape:
    """What a checkpoint must agree with beyond its key: a different shape of run cannot continue it."""
    total_steps: int
    steps_per_epoch: int
    world: int


def _payload(state: LoopState, shape: RunShape, key: str, core, opt, sched, seconds: float) -> dict:
    fields = {f.name: getattr(state, f.name) for f in dataclasses.fields(state) if f.name not in ("g_epoch",)}
    fields["seconds"] = seconds
    fields["val_history"] = [list(v) for v in state.val_history]
    return {"format": FORMAT, "key": key, "shape": dataclasses.asdict(shape), "state": fields,
            "g_epoch": state.g_epoch, "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "model": {k: v.detach().cpu() for k, v in core.state_dict().items()},
            "optimizer": opt.state_dict(), "scheduler": sched.state_dict() if sched is not None else None}


def save(ck: Checkpoint, state: LoopState, shape: RunShape, core, opt, sched, seconds: float) -> None:
    """Write the checkpoint whole (header: magic, sha256 of the payload; then torch.save's bytes)."""
    buf = io.BytesIO()
    torch.save(_payload(state, shape, ck.key, core, opt, sched, seconds), buf)
    data = buf.getvalue()
    atomic_write(ck.path, MAGIC + sha256_bytes(data).encode() + b"\n" + data)


def read(ck: Checkpoint, shape: RunShape, log: Callable[[str], None] | None = None) -> dict | None:
    """The verified payload of ``ck.path``; None when there is none, or (logged, file removed) when it is damaged,
    another run's or another shape of run's."""
    path = Path(ck.path)
    if not path.is_file():
        return None
    problem, payload = _verify(path.read_bytes(), ck.key, shape)
    if problem is None:
        return payload
    if log is not None:
        log(f"  checkpoint {path.name}: {problem}; ignored, training from the start")
    path.unlink(missing_ok=True)
    return None


def _verify(blob: bytes, key: str, shape: RunShape) -> tuple[str | None, dict | None]:
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + 65:
        return "not a training checkpoint (or truncated)", None
    digest, data = blob[len(MAGIC):len(MAGIC) + 64].decode(errors="replace"), blob[len(MAGIC) + 65:]
    if sha256_bytes(data) != digest:
        return "sha256 mismatch (truncated or damaged)", None
    try:
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as e:   # a payload that hashes right but does not load: written by something else
        return f"unreadable ({type(e).__name__})", None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        return "an unknown checkpoint format", None
    if payload.get("key") != key:
        return "written by another run (its fingerprint differs)", None
    if payload.get("shape") != dataclasses.asdict(shape):
        return f"a different shape of run ({payload.get('shape')} vs {dataclasses.asdict(shape)})", None
    return None, payload


def restore(payload: dict, core, opt, sched, g: torch.Generator) -> LoopState:
    """Load a verified payload into the model, optimizer, schedule and RNGs; the loop's state to go on from."""
    core.load_state_dict(payload["model"])
    opt.load_state_dict(payload["optimizer"])
    if sched is not None:
        sched.load_state_dict(payload["scheduler"])
    torch.set_rng_state(payload["torch_rng"])
    if payload["cuda_rng"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(payload["cuda_rng"])
    fields = dict(payload["state"])
    fields["val_history"] = [tuple(v) for v in fields["val_history"]]
    state = LoopState(**fields, g_epoch=payload["g_epoch"])
    if state.g_epoch is not None:
        g.set_state(state.g_epoch)   # the current epoch's order is drawn again from where it began
    state.resumed_at = state.step
    return state
