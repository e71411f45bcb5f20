"""`make gpu-check`: the torch-CUDA paths, in one short script (<= 8 minutes on one GPU).

1. Fine-tune on CUDA: the pruned default SimpleCNN distilled from its teacher for 1 epoch on the
   MNIST train split, on `cuda` (and, as a reference, the same steps on the CPU for 200 steps).
2. torch-CUDA latency of each torch artifact (unpruned baseline, pruned) at batch 1/8/64, with
   `torch.cuda.synchronize` inside the timed region, beside torch-CPU.
3. The decoder's CUDA paths (benchmarks/gpu_check_llm.py): a distillation step of a tiny decoder on CUDA, and
   greedy decode on onnxruntime's CUDA execution provider against its CPU (where onnxruntime-gpu is installed).
Writes benchmarks/gpu_check.json and prints a table. Where no CUDA device is present it prints one
line saying so, writes a JSON with "cuda": false, and exits 0: nothing is claimed that did not run.
"""
from __future__ import annotations

import argparse
import copy
import platform
import sys
import time
from pathlib import Path

OUT = Path(__file__).with_name("gpu_check.json")


def _models(data):
    import torch

    from pipeline.models.cnn import SimpleCNN
    from pipeline.prune import prune_model
    from pipeline.train import train
    torch.manual_seed(0)
    teacher = SimpleCNN()
    train(teacher, None, data["x"][:20000], data["y"][:20000], epochs=1, lr=1e-3, batch_size=128, seed=0,
          schedule="constant", device="cpu", progress=None)
    student = SimpleCNN()
    student.load_state_dict(teacher.state_dict())
    student, _ = prune_model(student, torch.zeros(1, 1, 28, 28), target="macs", macs=0.1, importance="l2")
    return teacher, student


def _latency(model, device: str, batch: int, iters: int = 200) -> dict:
    import torch

    from edgerun.timing import measure
    model = model.to(device).eval()
    x = torch.randn(batch, 1, 28, 28, device=device)
    sync = torch.cuda.synchronize if device == "cuda" else None
    with torch.no_grad():
        stats = measure(lambda: model(x), warmup=20, iters=iters, sync=sync)
    return {"device": device, "batch": batch, "p50_ms": stats.p50_ms, "p99_ms": stats.p99_ms, "iters": stats.iters}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--output", default=str(OUT))
    args = ap.parse_args(argv)
    import torch

    from benchmarks.gpu_check_llm import decoder_checks
    from edgerun.io import write_json
    from edgerun.readers import load_mnist
    from pipeline.data import normalize
    result = {"cuda": torch.cuda.is_available(), "torch": torch.__version__, "host": platform.node(),
              "when": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if not result["cuda"]:
        decoder = decoder_checks(cuda=False)
        write_json(args.output, {**result, "decoder": decoder, "note": "no CUDA device here: nothing was run"})
        print(f"SKIPPED | no CUDA device on this machine: the torch-CUDA paths were not run ({args.output})")
        return 0
    from pipeline.train import train
    images, labels = load_mnist(Path(__file__).resolve().parent.parent / "data/mnist", "train")
    data = {"x": normalize(images, (0.1307,), (0.3081,)), "y": labels}
    teacher, student = _models(data)
    result["gpu"] = torch.cuda.get_device_name(0)
    runs = {}
    for device, epochs in (("cuda", 1.0), ("cpu", 200 * 128 / len(labels))):
        s = copy.deepcopy(student)   # the same pruned start on each device
        t0 = time.perf_counter()
        info = train(s, teacher, data["x"], data["y"], epochs=epochs, lr=3e-3, batch_size=128, kd_weight=0.5,
                     kd_temperature=2.0, seed=0, device=device, progress=None)
        runs[device] = {"steps": info["steps"], "seconds": round(time.perf_counter() - t0, 2),
                        "ms_per_step": round(1000 * (time.perf_counter() - t0) / max(1, info["steps"]), 3),
                        "train_top1": round(info["train_top1"], 2)}
    result["finetune"] = runs
    result["latency"] = [{"model": name, **_latency(m, device, b)} for name, m in (("baseline", teacher),
                         ("pruned", student)) for device in ("cuda", "cpu") for b in (1, 8, 64)]
    result["decoder"] = decoder_checks(cuda=True)
    write_json(args.output, result)
    for row in result["latency"]:
        print(f"{row['model']:<9} {row['device']:<5} batch {row['batch']:>3}  p50 {row['p50_ms']:.4f} ms  "
              f"p99 {row['p99_ms']:.4f} ms")
    print(f"fine-tune ms/step: cuda {runs['cuda']['ms_per_step']}, cpu {runs['cpu']['ms_per_step']}")
    print(f"PASSED | torch-CUDA paths ran on {result['gpu']} ({args.output})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
