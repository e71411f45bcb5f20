"""The baseline stage: build the model, load its weights or train it, and record what every later gate
compares against: the task it is (resolved here from `task.kind` or its outputs), its metrics on the test
set, the outputs the task keeps (`Task.keeps`), and the fixed reference batch of every parity check."""
from __future__ import annotations

import numpy as np

from edgerun.io import write_json
from pipeline import gate as gates
from pipeline import modelio
from pipeline.records import Artifact
from pipeline.runner import Context, Output
from pipeline.stage_io import model_keys, np_write
from pipeline.tasks import named, resolve


def baseline_keys(cfg):
    # task.kind is read here only: the baseline resolves the task and records it; later stages read the record
    keys = [*model_keys(cfg), "task.kind", "model.weights", "data.reference_batch"]
    if cfg.model.weights:
        return [*keys, "model.unsafe_pickle", "model.weights_strict"]
    return [*keys, "baseline.epochs", "baseline.lr", "baseline.batch_size", "baseline.schedule"]


def baseline(ctx: Context) -> Output:
    import torch

    from pipeline.data import resolve_root
    from pipeline.models import probe_model
    cfg, data = ctx.cfg, ctx.data
    torch.manual_seed(cfg.run.seed)  # the initial weights too, so a rerun trains the same model
    model = modelio.build(cfg.model, cfg.data)
    probe_model(model, cfg.data.channels, tuple(cfg.data.size), cfg.model.num_classes)  # before any training
    # resolved before any training, from the names torch_outputs gives the outputs below: the task trains it
    task = resolve(cfg.task.kind, modelio.output_names(model))
    notices = []
    if cfg.model.weights:
        loaded = modelio.load_state(model, resolve_root(cfg.model.weights), unsafe_pickle=cfg.model.unsafe_pickle,
                                    strict=cfg.model.weights_strict)
        trained = {"weights": cfg.model.weights, "weights_load": loaded}
        if any(loaded.values()):
            counts = ", ".join(f"{len(v)} {k}" for k, v in loaded.items())
            notices.append(f"model.weights loaded non-strictly: {counts}")
    else:
        from pipeline.train import train
        ctx.log(f"  training {cfg.model.factory or cfg.model.name} for {cfg.baseline.epochs} epochs "
                f"on {len(data.train.labels)} images")
        info = train(model, None, data.x_train, data.train.labels, epochs=cfg.baseline.epochs, lr=cfg.baseline.lr,
                     batch_size=cfg.baseline.batch_size, seed=cfg.run.seed, schedule=cfg.baseline.schedule,
                     progress="baseline", task=task)
        trained = {"epochs": cfg.baseline.epochs, "losses": info["losses"]}
    modelio.save_weights(model, ctx.out / "model.pt")
    outs = modelio.torch_outputs(model, data.x_test)
    for name in task.keeps:   # what later stages compare against
        np_write(ctx.out / f"test_{name}.npy", np.save, outs[name])
    metrics = {"task": task.kind, **task.metrics(outs, data.test.labels)}
    gap = modelio.train_eval_gap(model, data.x_train, data.train.labels, task)
    if gap is not None and abs(gap) > TRAIN_EVAL_GAP:
        notices.append(f"train-mode vs eval-mode {task.label} differ by {gap:+.1f}{task.drop_unit}: BatchNorm "
                       "running statistics have not settled (raise BatchNorm momentum, train longer, or recompute "
                       "the statistics)")
    # The reference batch: a fixed, seeded slice of the test set that every parity check reuses.
    rng = np.random.default_rng(cfg.run.seed)
    idx = np.sort(rng.permutation(len(data.test.labels))[:cfg.data.reference_batch])
    arrays = {"inputs": data.x_test[idx], "labels": data.test.labels[idx],
              **{f"out_{k}": v[idx] for k, v in outs.items()}}
    np_write(ctx.out / "reference.npz", np.savez, **arrays)
    write_json(ctx.out / "model.json", {"model": cfg.model.factory or cfg.model.name, "kwargs": cfg.model.kwargs,
                                        "outputs": list(modelio.output_names(model))})
    metrics.update(**modelio.count(model, cfg.data), size_bytes=(ctx.out / "model.pt").stat().st_size,
                   **task.baseline_extras(outs), train_eval_gap=gap, **trained)
    return Output(metrics=metrics, notices=tuple(notices),
                  artifacts=(Artifact("baseline-torch", "torch", "model.pt", label="baseline (torch)"),))


TRAIN_EVAL_GAP = 10.0   # pt: beyond this the baseline's BatchNorm statistics are reported as unsettled


def baseline_gate(m, inputs, cfg):
    check = named(m["task"]).baseline_check(m, cfg.baseline.min_top1 if cfg.baseline.min_top1 >= 0 else None)
    return gates.gate(cfg.baseline.gate, check) if check is not None else None
