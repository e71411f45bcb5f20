"""The one training loop: the baseline (no teacher) and the fine-tune (distilling from the teacher).

    info = train(student, teacher, x_train, y_train, epochs=2, lr=3e-3, kd_weight=0.7)

The loss, what is kept of the teacher and the figures watched are the ``task``'s (pipeline/tasks, `Task`'s
training hooks; default: classification). A classifier's loss is
``kd_weight * T^2 * KL(softmax(teacher/T) || softmax(student/T)) + (1 - kd_weight) * CE(student, y)``
(``teacher=None`` → plain cross-entropy) on the logits (``logits_of``: a model returning a tuple ends with
them); the encode task adds its own term on its other output (pipeline/tasks/encode.py).

Early stopping: with ``early_stop_top1`` and ``val=(x_val, y_val)`` the student is evaluated every
``eval_every_steps`` steps (the task's ``held_out``: top-1 for a classifier) and training stops once that
reaches the threshold. ``val`` must be a held-out slice of the TRAINING data (see :func:`split_train_val`),
never the test set: the test set is what the pipeline's gates report, and stopping on it would leak.

``epochs`` may be fractional (0.5 = half an epoch of steps). Everything is seeded. What the task keeps of the
teacher (a classifier's logits) is computed once up front (the data is not augmented, so it is the same every
epoch); a task that needs more (an encoder's projected outputs) has the teacher run beside the student
every step.

``train_ddp`` (pipeline/train_dist.py) runs the same loop in ``nproc`` processes with DistributedDataParallel or
FSDP2 (gloo on the CPU, nccl when there is one GPU per process); every process takes its own 1/nproc of
each epoch's shuffled order and ``batch_size`` is per process. ``checkpoint`` saves the run every so many steps
and resumes an interrupted one bit for bit (pipeline/train_ckpt.py).
"""
from __future__ import annotations

import dataclasses
import math
import time

import numpy as np
import torch
import torch.nn as nn

from pipeline import train_ckpt as ckpt
from pipeline.errors import PipelineError
from pipeline.progress import Progress
from pipeline.tasks import Classify, Task

# re-exported: tests, benchmarks and prune_tp import them from here
from pipeline.tasks.logits import evaluate_top1, kd_loss, logits_of  # noqa: F401

SCHEDULES = ("onecycle", "cosine", "constant")
OPTIMIZERS = ("adam", "sgd")


def split_train_val(x: np.ndarray, y: np.ndarray, val_size: int | float = 0.05, seed: int = 0):
    """Hold out a seeded slice of the TRAINING data for early stopping: ((x_tr, y_tr), (x_val, y_val))."""
    n = len(x)
    k = int(round(val_size * n)) if isinstance(val_size, float) and val_size < 1 else int(val_size)
    if not 0 < k < n:
        raise PipelineError(f"finetune.val_size: {val_size} leaves no training or no validation data (n={n})")
    perm = np.random.default_rng(seed).permutation(n)
    val, tr = np.sort(perm[:k]), np.sort(perm[k:])
    return (x[tr], y[tr]), (x[val], y[val])


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _check_args(x, y, epochs, schedule, optimizer, kd_weight, early_stop_top1, val, batch_size):
    if schedule not in SCHEDULES:
        raise PipelineError(f"finetune.schedule: unknown {schedule!r}; expected one of {', '.join(SCHEDULES)}")
    if optimizer not in OPTIMIZERS:
        raise PipelineError(f"finetune.optimizer: unknown {optimizer!r}; expected one of {', '.join(OPTIMIZERS)}")
    if not epochs > 0:
        raise PipelineError(f"finetune.epochs: must be > 0, got {epochs}")
    if not 0.0 <= kd_weight <= 1.0:
        raise PipelineError(f"finetune.kd_weight: must be in [0, 1], got {kd_weight}")
    if batch_size < 1:
        raise PipelineError(f"finetune.batch_size: must be >= 1, got {batch_size}")
    if len(x) != len(y) or len(x) == 0:
        raise PipelineError(f"finetune: {len(x)} images but {len(y)} labels")
    if early_stop_top1 is not None and val is None:
        raise PipelineError("finetune.early_stop_top1 needs val=(x_val, y_val): a held-out slice of the training data")


def _teacher_outputs(teacher, x, device, batch_size=1000, task: Task | None = None):
    """What ``task`` keeps of the teacher's output for every image of ``x`` (a classifier's logits)."""
    task = task if task is not None else Classify()
    teacher.eval().to(device)
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch_size):
            xb = torch.from_numpy(np.ascontiguousarray(x[i:i + batch_size])).to(device)
            outs.append(task.teacher_cache(teacher(xb)))
    return torch.cat(outs)


def _optimizer(model, optimizer, schedule, *, lr, weight_decay, total_steps):
    """The optimizer over the trainable parameters, and its LR schedule (None: constant)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if optimizer == "adam":
        opt = torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if schedule == "onecycle" and total_steps >= 4:  # (OneCycleLR divides by zero on shorter runs)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps,
                                                    pct_start=0.25 if total_steps >= 8 else 0.5)
    elif schedule == "cosine":
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)
    else:
        sched = None
    return opt, sched


def _teacher(teacher, x, device, task, *, kd_weight, token_weight, teacher_logits):
    """(teacher, online, kept): online = run the teacher per batch; else what the task keeps of its output
    for every image of ``x`` (given as ``teacher_logits`` or computed here), or None when nothing is distilled."""
    use_teacher = teacher is not None and (kd_weight > 0 or token_weight > 0)
    online_teacher = use_teacher and task.teacher_per_batch(kd_weight=kd_weight, token_weight=token_weight)
    t_logits = None
    if teacher_logits is not None and kd_weight > 0 and not online_teacher:
        if len(teacher_logits) != len(x):
            raise PipelineError(f"finetune.teacher_logits: {len(teacher_logits)} rows for {len(x)} images")
        t_logits = torch.as_tensor(np.asarray(teacher_logits, dtype=np.float32))
    elif use_teacher:
        teacher = teacher.to(device).eval()  # always run under no_grad: its parameters are left as they are
        if not online_teacher:
            t_logits = _teacher_outputs(teacher, x, device, task=task)
    return teacher, online_teacher, t_logits


def _batch_loss(task, model, teacher, xb, yb, kept, *, online, kd_temperature, kd_weight, token_weight):
    """(the student's output, the task's loss) for one batch; ``kept``: the cached teacher rows of the batch."""
    out = model(xb)
    if online:
        with torch.no_grad():
            t_out = teacher(xb)
    else:
        t_out = kept
        kd_weight = kd_weight if kept is not None else 0.0
    return out, task.train_loss(out, yb, t_out, temperature=kd_temperature, kd_weight=kd_weight,
                                token_weight=token_weight)


def run_shape(n: int, batch_size: int, epochs: float, world: int = 1) -> ckpt.RunShape:
    """Steps per epoch and in all of a run over ``n`` rows (each of ``world`` ranks takes its 1/world)."""
    per_rank = n // world if world > 1 else n
    steps_per_epoch = max(1, math.ceil(per_rank / batch_size))
    return ckpt.RunShape(max(1, int(math.ceil(float(epochs) * steps_per_epoch))), steps_per_epoch, world)


def _train_loop(student, teacher, x, y, *, epochs, lr, batch_size, kd_temperature, kd_weight, token_weight,
                schedule, optimizer, weight_decay, early_stop_top1, val, eval_every_steps, seed, device,
                progress, task, rank=0, world=1, dist=None, teacher_logits=None, checkpoint=None, resume=None):
    """The one training loop, used in-process and by every DDP/FSDP rank (``dist`` is torch.distributed).
    ``checkpoint``: where rank 0 saves every ``checkpoint.every`` steps and at the end (pipeline/train_ckpt.py);
    ``resume``: a verified checkpoint payload to go on from."""
    torch.manual_seed(seed)
    model = student  # possibly a DDP wrapper
    core = student.module if hasattr(student, "module") else student
    n = len(x)
    per_rank = n // world if world > 1 else n
    shape = run_shape(n, batch_size, epochs, world)
    steps_per_epoch, total_steps = shape.steps_per_epoch, shape.total_steps
    opt, sched = _optimizer(model, optimizer, schedule, lr=lr, weight_decay=weight_decay, total_steps=total_steps)
    teacher, online_teacher, t_logits = _teacher(teacher, x, device, task, kd_weight=kd_weight,
                                                 token_weight=token_weight, teacher_logits=teacher_logits)

    xt = torch.from_numpy(np.ascontiguousarray(x))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    g = torch.Generator().manual_seed(seed)
    st = ckpt.LoopState()
    if resume is not None:
        if resume["shape"] != dataclasses.asdict(shape):
            raise PipelineError(f"checkpoint: a different shape of run ({resume['shape']}) cannot be resumed here")
        st = ckpt.restore(resume, core, opt, sched, g)
    saving = checkpoint is not None and rank == 0
    bar = Progress(progress, total_steps) if progress and rank == 0 else None
    model.train()
    t0 = time.perf_counter()
    try:
        while st.step < total_steps and not st.stopped_early:
            if st.batch == 0:
                st.g_epoch = g.get_state()   # a checkpoint inside this epoch draws its order again from here
            perm = torch.randperm(n, generator=g)
            if world > 1:
                perm = perm[rank::world][:per_rank]
            for b in range(st.batch, steps_per_epoch):
                if st.step >= total_steps:
                    break
                idx = perm[b * batch_size:(b + 1) * batch_size]
                xb, yb = xt[idx].to(device, non_blocking=True), yt[idx].to(device, non_blocking=True)
                kept = t_logits[idx].to(device) if t_logits is not None else None   # None when online
                out, loss = _batch_loss(task, model, teacher, xb, yb, kept, online=online_teacher,
                                        kd_temperature=kd_temperature, kd_weight=kd_weight, token_weight=token_weight)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                _count(st, task, out, yb, float(loss.detach()))
                st.batch = b + 1
                if early_stop_top1 is not None and eval_every_steps and st.step % eval_every_steps == 0:
                    _early_stop(st, task, core, val, early_stop_top1, rank, dist, device)
                if bar is not None:
                    acc = 100.0 * st.run_correct / max(1, st.run_seen)
                    bar.update(st.step, f"loss {st.run_loss:.4f} acc {acc:5.1f} %"
                               + (f" val {st.last_val:5.2f} %" if st.last_val is not None else ""))
                if st.stopped_early:
                    break
                if saving and st.step % checkpoint.every == 0 and st.step < total_steps:
                    ckpt.save(checkpoint, st, shape, core, opt, sched, st.seconds + time.perf_counter() - t0)
            st.losses.append(st.epoch_loss / max(1, st.epoch_steps))
            st.batch, st.epoch_loss, st.epoch_steps = 0, 0.0, 0
        if saving and st.resumed_at != st.step:   # the finished run: a rerun of the stage skips it
            ckpt.save(checkpoint, st, shape, core, opt, sched, st.seconds + time.perf_counter() - t0)
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    info = {"epochs_run": st.step / steps_per_epoch, "steps": st.step, "seconds": st.seconds + time.perf_counter() - t0,
            "stopped_early": st.stopped_early, "losses": st.losses, "steps_per_epoch": steps_per_epoch,
            "train_top1": 100.0 * st.run_correct / max(1, st.run_seen)}
    if st.resumed_at is not None:
        info["resumed_at_step"] = st.resumed_at
    if st.val_history:
        info["val_top1"] = st.val_history[-1][1]
        info["val_history"] = st.val_history
    return info


def _count(st, task, out, yb, lv: float) -> None:
    """One step's loss and hits into the running figures."""
    st.step += 1
    st.epoch_loss += lv
    st.epoch_steps += 1
    st.run_loss = lv if st.step == 1 else 0.98 * st.run_loss + 0.02 * lv
    right, counted = task.train_hits(out, yb)
    st.run_correct += right
    st.run_seen += counted


def _early_stop(st, task, core, val, threshold, rank, dist, device) -> None:
    """Rank 0 evaluates the held-out slice; every rank learns whether to stop."""
    stop = torch.zeros(1)
    if rank == 0:
        st.last_val = task.held_out(core, val[0], val[1], device=device)
        st.val_history.append((st.step, st.last_val))
        stop[0] = float(st.last_val >= threshold)
    if dist is not None:
        stop = stop.to(device)
        dist.broadcast(stop, 0)
    st.stopped_early = bool(stop.item())


def train(student: nn.Module, teacher: nn.Module | None, x_train: np.ndarray, y_train: np.ndarray, *,
             epochs: float = 1.0, lr: float = 1e-3, batch_size: int = 64, kd_temperature: float = 4.0,
             kd_weight: float = 0.7, token_weight: float = 0.0, schedule: str = "onecycle",
             optimizer: str = "adam", weight_decay: float = 0.0, early_stop_top1: float | None = None,
             val: tuple[np.ndarray, np.ndarray] | None = None, eval_every_steps: int = 100, seed: int = 0,
             device: str = "auto", progress: str | None = "train", teacher_logits: np.ndarray | None = None,
             task: Task | None = None, checkpoint: ckpt.Checkpoint | None = None,
             log=None) -> dict:
    """Train ``student`` in place (``x_train``: normalized float32 NCHW). Returns
    {"epochs_run", "steps", "seconds", "stopped_early", "losses" (mean per epoch), ...}.

    ``teacher_logits`` (optional, [N, classes]): what ``task`` keeps of the teacher's output for ``x_train``
    (a classifier's logits), computed once by the caller (e.g. a benchmark that fine-tunes many students from
    one teacher) instead of here. ``task``: what is minimised and watched (default: classification).
    ``checkpoint``: save every ``checkpoint.every`` steps and resume from a verified file of the same key
    (pipeline/train_ckpt.py; ``log`` says when a file is ignored)."""
    _check_args(x_train, y_train, epochs, schedule, optimizer, kd_weight, early_stop_top1, val, batch_size)
    resume = None
    if checkpoint is not None:
        resume = ckpt.read(checkpoint, run_shape(len(x_train), batch_size, epochs), log)
    dev = pick_device(device)
    student.to(dev)
    before, threads = torch.get_num_threads(), training_threads()
    torch.set_num_threads(threads)
    try:
        info = _train_loop(student, teacher, x_train, y_train, epochs=epochs, lr=lr, batch_size=batch_size,
                           kd_temperature=kd_temperature, kd_weight=kd_weight, token_weight=token_weight,
                           schedule=schedule, optimizer=optimizer, weight_decay=weight_decay,
                           early_stop_top1=early_stop_top1, val=val, eval_every_steps=eval_every_steps,
                           seed=seed, device=dev, progress=progress, teacher_logits=teacher_logits,
                           task=task if task is not None else Classify(), checkpoint=checkpoint, resume=resume)
    finally:
        torch.set_num_threads(before)   # process-wide: the stages after this one time with their own threads
    return {**info, "threads": threads}


def training_threads() -> int:
    """Intra-op threads for training: all usable cores but one, at least one. OpenMP threads that
    outnumber the cores left free by other processes spin at their barriers, and a step then takes
    longer than on one thread (benchmarks/cold_start.md); one core left over costs little where there
    are many and keeps a shared 2-core machine from that cliff, at some speed on a quiet one."""
    from edgerun.machine import usable_cores
    return max(1, usable_cores() - 1)
