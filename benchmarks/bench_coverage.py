"""Coverage of user architectures, end to end on MNIST: train, prune, fine-tune, ONNX, INT8.

    python -m benchmarks.bench_coverage            # all architectures, ~3-5 minutes on 2 busy cores
    python -m benchmarks.bench_coverage --only vit_mha convnext_small

For each small plain-torch architecture of pipeline.models.coverage (1x28x28 MNIST): train from
scratch (``--train`` images, ``--epochs``), prune to 40% of torch-pruning's MAC count (bisection, L2
importance, uniform), fine-tune (``--finetune-epochs``), export to ONNX with a dynamic batch and
compare with torch at batch 1 and 7, quantize with NNCF (onnxruntime target, ``--calib`` training
images), and score FP32 ONNX and INT8 ONNX on the first ``--test`` MNIST test images (top-1, and
INT8's agreement with FP32: the share of images where both predict the same class). A stage that
fails is recorded with its one-line error and the later stages are skipped. YOLO's C2f is run twice:
as written (chunk; torch-pruning 1.6.1 mis-indexes it: the expected one-line error) and with the
chunk computed by two convs (``split_free``). Writes benchmarks/coverage.md and benchmarks/coverage.json.
"""
from __future__ import annotations

import argparse
import datetime
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from edgerun.errors import EdgeError
from edgerun.io import atomic_write, write_json
from edgerun.readers import load_mnist
from pipeline.data import normalize

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
MEAN, STD = [0.1307], [0.3081]
MACS_KEEP = 0.4
# (row name, architecture, constructor kwargs, what it exercises)
ROWS = [
    ("vit_mha", "vit_mha", {}, "nn.TransformerEncoderLayer (nn.MultiheadAttention), class token, position embedding"),
    ("convnext_small", "convnext_small", {}, "depthwise 7x7, LayerNorm2d, layer scale, stochastic depth, "
                                             "Sequential(LayerNorm2d, Flatten, Linear) head"),
    ("mobilenetv3_small", "mobilenetv3_small", {}, "inverted residuals, SE, Hardswish/SiLU, stochastic depth, "
                                                   "hidden Linear in the head"),
    ("regnet_small", "regnet_small", {}, "RegNetY: group convs (group width 8), SE, projected shortcuts"),
    ("densenet_small", "densenet_small", {}, "dense blocks (concat of input and new features), transitions"),
    ("yolo_c2f_small (chunk)", "yolo_c2f_small", {}, "YOLOv8 C2f as written: chunk + concat"),
    ("yolo_c2f_small (split_free)", "yolo_c2f_small", {"split_free": True}, "C2f with the chunk as two 1x1 convs"),
]


def _top1(logits: np.ndarray, labels: np.ndarray) -> float:
    return float(100.0 * (logits.argmax(1) == labels).mean())


def _stage(record: dict, name: str, fn):
    """Run one stage; a failure is its one-line message in the record, and None for the next stages."""
    t0 = time.perf_counter()
    try:
        out = fn()
    except EdgeError as e:
        record["stages"][name] = {"ok": False, "error": str(e), "seconds": round(time.perf_counter() - t0, 2)}
        return None
    record["stages"][name] = {"ok": True, "seconds": round(time.perf_counter() - t0, 2)}
    return out if out is not None else True


def run_row(row, data, args, tmp: Path) -> dict:
    from calib.quantize import quantize_onnx
    from edgerun.ort import run_onnx
    from export.onnx_export import export_onnx
    from export.parity import compare_outputs
    from pipeline.models.coverage import COVERAGE
    from pipeline.prune import prune_model
    from pipeline.train import evaluate_top1, train

    label, arch, kwargs, what = row
    (x_tr, y_tr), (x_te, y_te), x_cal = data
    rec: dict = {"name": label, "architecture": arch, "kwargs": kwargs, "exercises": what, "stages": {}}
    t_start = time.perf_counter()
    torch.manual_seed(0)
    model = COVERAGE[arch](**kwargs)
    example = torch.zeros(1, 1, 28, 28)

    def fit(epochs):
        train(model, None, x_tr, y_tr, epochs=epochs, lr=2e-3, batch_size=64, progress=None, device="cpu",
              seed=0)
        return evaluate_top1(model, x_te, y_te)

    rec["top1_trained"] = _stage(rec, "train", lambda: fit(args.epochs))
    pruned = _stage(rec, "prune", lambda: prune_model(model.eval(), example, target="macs", macs=MACS_KEEP))
    if pruned:
        _, info = pruned
        rec.update(macs_ratio=info["macs_after"] / info["macs_before"],
                   conv_linear_macs_ratio=info["conv_linear_macs_after"] / info["conv_linear_macs_before"],
                   params_ratio=info["params_after"] / info["params_before"],
                   conv_linear_macs_before=info["conv_linear_macs_before"], params_before=info["params_before"],
                   heads={k: f"{v['num_heads_before']}x{v['head_dim_before']} -> {v['num_heads']}x{v['head_dim']}"
                          for k, v in info["heads"].items()},
                   unwrapped=info["unwrapped"])
        rec["top1_pruned"] = evaluate_top1(model, x_te, y_te)
        rec["top1_finetuned"] = _stage(rec, "finetune", lambda: fit(args.finetune_epochs))
        model.eval()
        path = tmp / f"{arch}.onnx"
        exported = _stage(rec, "export", lambda: export_onnx(model, example, path, check_batches=(1, 7, 64)))
        if exported:
            parity = {}
            for batch in (1, 7):
                with torch.no_grad():
                    want = {"logits": model(torch.from_numpy(x_te[:batch])).numpy()}
                parity[batch] = compare_outputs(want, run_onnx(path, x_te[:batch]))["max_abs"]
            rec["parity_max_abs"] = parity
            fp32 = run_onnx(path, x_te)["logits"]
            rec["top1_onnx_fp32"] = _top1(fp32, y_te)
            q = _stage(rec, "int8", lambda: quantize_onnx(path, tmp / f"{arch}_int8.onnx", x_cal,
                                                          model_type="transformer" if arch == "vit_mha" else None))
            if q:
                int8 = run_onnx(q["path"], x_te)["logits"]
                rec["top1_int8"] = _top1(int8, y_te)
                rec["int8_agreement"] = float(100.0 * (int8.argmax(1) == fp32.argmax(1)).mean())
    rec["seconds"] = round(time.perf_counter() - t_start, 1)
    rec["passed"] = all(s["ok"] for s in rec["stages"].values()) and "int8" in rec["stages"]
    return rec


def _f(v, fmt="{:.2f}"):
    return "–" if v is None else fmt.format(v)


def write_markdown(records: list[dict], meta: dict) -> str:
    order = ["train", "prune", "finetune", "export", "int8"]
    lines = ["# Coverage: user architectures through prune → ONNX → INT8", "",
             f"Generated by `python -m benchmarks.bench_coverage` on {meta['date']} ({meta['machine']}; "
             f"torch {meta['torch']}, torch-pruning {meta['torch_pruning']}, onnxruntime {meta['onnxruntime']}, "
             f"nncf {meta['nncf']}).", "",
             f"Small plain-torch re-implementations (pipeline/models/coverage.py, thousands to tens of thousands "
             f"of parameters; not torchvision's models) on MNIST 1x28x28: trained from scratch on "
             f"{meta['train']} training images for {meta['epochs']} epochs, pruned to {MACS_KEEP:.0%} of "
             f"torch-pruning's MAC count (L2, uniform, bisection on the channel ratio), fine-tuned "
             f"{meta['finetune_epochs']} epoch(s), exported with a dynamic batch (checked at batch 1/7/64 in "
             f"onnxruntime), quantized with NNCF (onnxruntime target, {meta['calib']} calibration images). "
             f"Top-1 and INT8 agreement (same predicted class as the FP32 ONNX) on the first {meta['test']} "
             "MNIST test images; parity is max |ONNX − torch| of the logits. MAC ratios: torch-pruning's op "
             "count (the pruning target) and conv/linear/attention MACs (thop's convention).", "",
             "| architecture | stages passed | MACs kept (tp / conv-linear) | params kept | top-1 trained → pruned → "
             "fine-tuned | ONNX parity b1 / b7 | top-1 FP32 / INT8 ONNX | INT8 agreement | time |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        st = r["stages"]
        passed = sum(1 for s in order if st.get(s, {}).get("ok"))
        par = r.get("parity_max_abs") or {}
        lines.append(
            f"| {r['name']} | {passed}/{len(order)} | {_f(r.get('macs_ratio'), '{:.2f}')} / "
            f"{_f(r.get('conv_linear_macs_ratio'), '{:.2f}')} | {_f(r.get('params_ratio'), '{:.2f}')} | "
            f"{_f(r.get('top1_trained'), '{:.1f}')} → {_f(r.get('top1_pruned'), '{:.1f}')} → "
            f"{_f(r.get('top1_finetuned'), '{:.1f}')} | {_f(par.get(1), '{:.1e}')} / {_f(par.get(7), '{:.1e}')} | "
            f"{_f(r.get('top1_onnx_fp32'), '{:.1f}')} / {_f(r.get('top1_int8'), '{:.1f}')} | "
            f"{_f(r.get('int8_agreement'), '{:.1f}')} % | {r['seconds']:.0f} s |")
    lines += ["", "What each exercises, and what pruning did to its unusual parts:", ""]
    for r in records:
        extra = []
        if r.get("heads"):
            shapes = sorted(set(r["heads"].values()))
            extra.append(f"heads (num x dim): {', '.join(shapes)}")
        if r.get("unwrapped"):
            extra.append("bare parameters: " + ", ".join(f"{k} {v}" for k, v in r["unwrapped"].items()))
        failed = [f"{k}: `{v['error']}`" for k, v in r["stages"].items() if not v["ok"]]
        extra += [f"**failed** {f}" for f in failed]
        lines.append(f"- **{r['name']}**: {r['exercises']}." + (" " + "; ".join(extra) + "." if extra else ""))
    n_pass = sum(r["passed"] for r in records)
    weak = [f"{r['name']} ({r['int8_agreement']:.1f} %)" for r in records if r.get("int8_agreement", 100) < 95]
    lines += ["", "MACs kept land at or below the 0.40 target (the bisection keeps the smallest channel ratio that "
              "fits; with few, narrow layers one channel step is several percent). Right after pruning, top-1 "
              "falls to near chance (no pruning-aware importance, 60 % of the MACs gone); the fine-tune recovers "
              "most of it."]
    if weak:
        lines.append(f"INT8 agreement below 95 %: {', '.join(weak)}. This is NNCF's default post-training "
                     "quantization (no accuracy control, 128 calibration images) and was not investigated "
                     "further here; the pipeline's quantize stage gates on the top-1 drop and on this agreement "
                     "(quantize.max_drop, quantize.min_agreement) and offers NNCF's accuracy control.")
    lines += ["", "## Compared with torch-pruning's own coverage", "",
              "torch-pruning's torchvision test (examples/torchvision_models) prunes 77 of 85 torchvision models "
              "at a 0.5 channel ratio and checks one forward pass; the 8 failures are RAFT, the three Swin "
              "transformers and the four ShuffleNetV2s (channel shuffle). It ignores every Linear with 1000 "
              "outputs and rounds ViT widths to the head count by hand. Here the test goes further per model "
              "(MAC-target bisection, fine-tune, ONNX export with a proved dynamic batch, INT8, onnxruntime) "
              f"but over far fewer, far smaller models: {n_pass} of {len(records)} rows pass every stage. "
              "The C2f row as written fails in pruning, as torch-pruning's own YOLOv8 example expects (it "
              "rewrites C2f the same way before pruning); the error names the layers to ignore or rewrite. "
              "Numbers are from one run on a shared machine (times are wall clock, not a benchmark of speed).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", nargs="*", help="row names or architectures to run")
    p.add_argument("--train", type=int, default=6000)
    p.add_argument("--test", type=int, default=500)
    p.add_argument("--calib", type=int, default=128)
    p.add_argument("--epochs", type=float, default=3.0)
    p.add_argument("--finetune-epochs", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=HERE)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    root = ROOT / "data" / "mnist"
    try:
        xtr, ytr = load_mnist(root, "train")
        xte, yte = load_mnist(root, "test")
    except EdgeError as e:
        print(f"FAILED | {e}")
        return 1
    x_tr, y_tr = normalize(xtr[:args.train], MEAN, STD), ytr[:args.train].astype(np.int64)
    x_te, y_te = normalize(xte[:args.test], MEAN, STD), yte[:args.test].astype(np.int64)
    x_cal = normalize(xtr[-args.calib:], MEAN, STD)  # not among the training images
    rows = [r for r in ROWS if not args.only or r[0] in args.only or r[1] in args.only]
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        for row in rows:
            rec = run_row(row, ((x_tr, y_tr), (x_te, y_te), x_cal), args, Path(tmp))
            records.append(rec)
            failed = [k for k, v in rec["stages"].items() if not v["ok"]]
            print(f"{rec['name']}: {'FAILED at ' + failed[0] if failed else 'passed'} in {rec['seconds']} s",
                  flush=True)

    from importlib.metadata import version
    meta = {"date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {platform.processor() or 'cpu'}, {args.threads} torch thread(s)",
            "python": sys.version.split()[0], "torch": torch.__version__,
            # the package's own __version__ lags its release (1.6.1 reports 1.6.0)
            "torch_pruning": version("torch-pruning"), "onnxruntime": version("onnxruntime"),
            "nncf": version("nncf"), "train": args.train, "test": args.test, "calib": args.calib,
            "epochs": args.epochs, "finetune_epochs": args.finetune_epochs, "macs_keep": MACS_KEEP}
    write_json(args.out / "coverage.json", {"meta": meta, "rows": records})
    atomic_write(args.out / "coverage.md", write_markdown(records, meta) + "\n")
    print(f"wrote {args.out / 'coverage.md'} and coverage.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
