"""pipeline/train.py's one loop over several processes: DistributedDataParallel, or FSDP2 where a model (a
decoder) does not fit one device.

    info = train_ddp(student, teacher, x, y, nproc=2, sharding="ddp", epochs=1, ...)

torch.multiprocessing spawns ``nproc`` ranks that meet through a file:// rendezvous in a temporary folder (gloo on
the CPU, nccl with one GPU per rank). The data travels as .npy files that every rank maps copy-on-write, in its own
dtype (token ids stay int64). Every rank takes its own 1/nproc of each epoch's shuffled order.

``sharding = "fsdp"``: torch's FSDP2 (``torch.distributed.fsdp.fully_shard``) shards every block of the model's
ModuleLists (a decoder's layers) and then the rest, on a 1-D mesh of the ranks; the teacher is sharded the same way
(it runs forward only, under no_grad). FSDP2 runs on the CPU with gloo (torch >= 2.6), which is how the tests run
it. Rank 0 gathers the full weights (``get_model_state_dict(full_state_dict=True)``, a collective every rank
joins) and they are loaded back into the caller's model.

Checkpoints: rank 0 writes (the weights and optimizer state are the same on every DDP rank), every rank resumes
from the same verified file. Under FSDP each rank holds a shard of the optimizer state, so checkpoints are refused
there in one line.
"""
from __future__ import annotations

import copy
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from pipeline import train_ckpt as ckpt
from pipeline.errors import PipelineError
from pipeline.tasks import Classify, Task
from pipeline.train import _check_args, _train_loop, run_shape

SHARDINGS = ("ddp", "fsdp")
DEFAULTS = dict(epochs=1.0, lr=1e-3, batch_size=64, kd_temperature=4.0, kd_weight=0.7, token_weight=0.0,
                schedule="onecycle", optimizer="adam", weight_decay=0.0, early_stop_top1=None,
                eval_every_steps=100, seed=0, progress="train")


def shard_fsdp(model: nn.Module, mesh) -> nn.Module:
    """FSDP2 in place: each block of every ModuleList (a decoder's layers) its own unit, then the root."""
    from torch.distributed.fsdp import fully_shard
    for lst in [m for m in model.modules() if isinstance(m, nn.ModuleList)]:
        for block in lst:
            fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _wrap(student, teacher, sharding: str, backend: str, rank: int, world: int, device):
    """(the model the loop trains, the teacher it runs)."""
    if sharding == "ddp":
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(student, device_ids=[rank] if backend == "nccl" else None), teacher
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh(device.type, (world,))
    if teacher is not None:
        teacher = shard_fsdp(teacher.eval(), mesh)
    return shard_fsdp(student, mesh), teacher


def _full_state(student, sharding: str) -> dict:
    """The full weights on the CPU: on every rank under DDP; gathered (every rank joins) under FSDP."""
    if sharding == "fsdp":
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        return get_model_state_dict(student, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().cpu() for k, v in student.state_dict().items()}


def _worker(rank: int, world: int, tmp: str, backend: str, sharding: str, student, teacher, kwargs: dict):
    import torch.distributed as dist

    torch.set_num_threads(max(1, (os.cpu_count() or world) // world))
    dist.init_process_group(backend, init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=world)
    try:
        if backend == "nccl":
            device = torch.device("cuda", rank)
            torch.cuda.set_device(device)
        else:
            device = torch.device("cpu")
        x = np.load(Path(tmp) / "x.npy", mmap_mode="c")  # copy-on-write: shared pages, writable for torch
        y = np.load(Path(tmp) / "y.npy")
        val = None
        if (Path(tmp) / "xv.npy").is_file():
            val = (np.load(Path(tmp) / "xv.npy"), np.load(Path(tmp) / "yv.npy"))
        # torch.multiprocessing hands the ranks the pickled model in SHARED memory: on the CPU every rank's
        # optimizer would step the same storage (the update applied world times over, or lost in a race), so
        # each rank trains its own copy. The teacher is only read, and sharing it saves its memory per rank.
        student = copy.deepcopy(student).to(device)
        teacher = teacher.to(device) if teacher is not None else None
        checkpoint, resume = kwargs.pop("checkpoint"), None
        if checkpoint is not None and kwargs.pop("resume"):
            shape = run_shape(len(x), kwargs["batch_size"], kwargs["epochs"], world)
            resume = ckpt.read(checkpoint, shape)
            if resume is None:   # verified by the parent a moment ago: changed since, so nothing is trusted
                raise PipelineError(f"{checkpoint.path}: changed while the ranks started; run again")
        kwargs.pop("resume", None)
        model, teacher = _wrap(student, teacher, sharding, backend, rank, world, device)
        info = _train_loop(model, teacher, np.asarray(x), y, val=val, device=device, rank=rank, world=world,
                           dist=dist, checkpoint=checkpoint, resume=resume, **kwargs)
        state = _full_state(student, sharding)
        if rank == 0:
            torch.save(state, Path(tmp) / "weights.pt")
            (Path(tmp) / "info.json").write_text(json.dumps(info))
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _check(nproc: int, sharding: str, kwargs: dict) -> None:
    _check_args(np.empty(1), np.empty(1), kwargs.get("epochs", 1.0), kwargs.get("schedule", "onecycle"),
                kwargs.get("optimizer", "adam"), kwargs.get("kd_weight", 0.7), kwargs.get("early_stop_top1"),
                kwargs.get("val"), kwargs.get("batch_size", 64))
    if isinstance(nproc, bool) or not isinstance(nproc, int) or nproc < 1:
        raise PipelineError(f"finetune.nproc: must be a whole number >= 1, got {nproc!r}")
    if sharding not in SHARDINGS:
        raise PipelineError(f"finetune.sharding: unknown {sharding!r}; expected one of {', '.join(SHARDINGS)}")
    if sharding == "fsdp" and kwargs.get("early_stop_top1") is not None:
        raise PipelineError("finetune.sharding = 'fsdp': early stopping evaluates on rank 0 alone, which a sharded "
                            "model cannot; set finetune.early_stop = false")
    if sharding == "fsdp" and kwargs.get("checkpoint") is not None:
        raise PipelineError("finetune.checkpoint_every: checkpoints are written for DDP and one process only (FSDP "
                            "shards the optimizer state); set finetune.checkpoint_every = 0 with sharding = 'fsdp'")
    unknown = set(kwargs) - set(DEFAULTS) - {"val", "device", "checkpoint"}
    if unknown:
        raise PipelineError(f"train_ddp: unknown arguments {sorted(unknown)}")


def train_ddp(student: nn.Module, teacher: nn.Module | None, x_train: np.ndarray, y_train: np.ndarray, *,
              nproc: int = 2, backend: str | None = None, task: Task | None = None, sharding: str = "ddp",
              log=None, **kwargs) -> dict:
    """:func:`pipeline.train.train` in ``nproc`` processes with DistributedDataParallel (``sharding = "ddp"``) or
    FSDP2 (``"fsdp"``); rank 0's (gathered) weights are loaded back into ``student``. ``backend``: gloo on the CPU,
    nccl when CUDA has >= nproc GPUs (default picks); ``task`` travels to every rank, so it must pickle (a
    module-level class). ``checkpoint`` (a pipeline.train_ckpt.Checkpoint): as in ``train``, DDP only. Returns
    rank 0's info plus ``world_size``, ``backend`` and ``sharding``."""
    import torch.multiprocessing as mp

    _check(nproc, sharding, kwargs)
    if len(x_train) != len(y_train) or len(x_train) == 0:
        raise PipelineError(f"finetune: {len(x_train)} rows but {len(y_train)} labels")
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and torch.cuda.device_count() >= nproc else "gloo"
    val = kwargs.pop("val", None)
    kwargs.pop("device", None)
    cfg = {**DEFAULTS, **kwargs, "task": task if task is not None else Classify()}
    cfg.setdefault("checkpoint", None)
    cfg["resume"] = cfg["checkpoint"] is not None and ckpt.read(
        cfg["checkpoint"], run_shape(len(x_train), cfg["batch_size"], cfg["epochs"], nproc), log) is not None
    with tempfile.TemporaryDirectory(prefix="train_ddp_") as tmp:
        # each in its own dtype: a decoder's token ids are int64 and must stay so
        np.save(Path(tmp) / "x.npy", np.ascontiguousarray(x_train))
        np.save(Path(tmp) / "y.npy", np.asarray(y_train, dtype=np.int64))
        if val is not None:
            np.save(Path(tmp) / "xv.npy", np.ascontiguousarray(val[0]))
            np.save(Path(tmp) / "yv.npy", np.asarray(val[1], dtype=np.int64))
        s_cpu = copy.deepcopy(student).cpu()
        t_cpu = copy.deepcopy(teacher).cpu() if teacher is not None else None
        mp.start_processes(_worker, args=(nproc, tmp, backend, sharding, s_cpu, t_cpu, cfg), nprocs=nproc,
                           join=True, start_method="spawn")
        state = torch.load(Path(tmp) / "weights.pt", map_location="cpu", weights_only=True)
        info = json.loads((Path(tmp) / "info.json").read_text())
    dev = next(student.parameters()).device
    student.load_state_dict(state)
    student.to(dev)
    return {**info, "world_size": nproc, "backend": backend, "sharding": sharding}
