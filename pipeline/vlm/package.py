"""The VLM's package stage: a bundle folder that is all a target needs (edgerun/vlm.py's layout).

    vlm.json, vision.onnx, model.onnx, embed_tokens.npy, tokenizer.json   the shipped files (W8A8 vision + INT4
                               decoder when quantized, else the pruned FP32 files); vlm.json lists the prompt
                               templates the model was trained on, per question type
    edgerun/                   the torch-free runtime (`python3 -m edgerun generate --bundle . --image a.png ...`)
    sample.jsonl, sample/      held-out records with their images (PNG) and ground-truth answers
    expected.jsonl             the same records with the pipeline's own greedy answers from the shipped files
    trt/                       the TensorRT-valid forms (vision Q/DQ, INT4 blocked DequantizeLinear)
    hf/                        the pruned, distilled decoder as a Hugging Face folder (TensorRT Edge-LLM's input)
    JETSON.md                  how to build both engines on the device (NOT executed here: no TensorRT)
    preflight.json             the decoder's widths against each target's kernel limits
    manifest.json              every file with its sha256

Before the run may pass, the bundle's own runtime, in a fresh process inside the bundle, scores expected.jsonl:
every answer must be the pipeline's (100 %).
"""
from __future__ import annotations

import json
import shutil

from edgerun.io import atomic_write, write_json
from pipeline.runner import Context, Output
from pipeline.vlm import io

SAMPLE = 40
JETSON = """# The VLM on a Jetson (not executed here: no TensorRT or GPU on this machine)

Two engines, as NVILA deploys it: the vision tower W8A8 with TensorRT, the decoder W4A16 with TensorRT Edge-LLM.

1. Vision: `trt/vision.onnx` is the tower's signed symmetric INT8 Q/DQ form (checked against TensorRT 10 and 11's
   documented operator support here; explicit Q/DQ, so no calibration on the device). Build it there:

       python3 -m edgerun check trt/vision.onnx        # the static pre-flight against the installed TensorRT
       trtexec --onnx=trt/vision.onnx --saveEngine=vision.plan --minShapes=pixels:1x{c}x{h}x{w} \\
               --optShapes=pixels:2x{c}x{h}x{w} --maxShapes=pixels:3x{c}x{h}x{w}

2. Decoder: `hf/` is the pruned, distilled decoder ({family}, {widths}) as a Hugging Face folder; with TensorRT
   Edge-LLM installed, export it on an x86 host and build on the device:

       tensorrt-edgellm-export --model_dir hf --output_dir onnx_edgellm --quantization int4_awq
       llm_build --onnxDir onnx_edgellm --engineDir engine --maxBatchSize 1

   The decoder takes `inputs_embeds` (the token table's rows with the vision engine's outputs in place of each
   `<image>`'s {tpi} tokens, as edgerun/vlm.py does); Edge-LLM's multimodal runner must be given those embeddings.

The command names follow the tools' documentation as read when this was written; check them against the versions
you install. `preflight.json` says whether the decoder's widths fit Edge-LLM's attention and INT4 kernels.
"""


def package_keys(cfg):
    return ["run.target", "decoder.int4_group", "decoder.max_new_tokens"]


def package_environment() -> dict:
    from pipeline.package import package_environment as runtime
    return runtime()


def package_stage(ctx: Context) -> Output:
    from edgerun.genai import write_manifest
    from edgerun.vlm import read_vlm_config
    from edgerun.vlm_sample import write_sample
    from pipeline.llm.package import _preflight, _runtime
    bundle, data = ctx.out, ctx.data
    q = ctx.record("quantize")
    shipped = ctx.path("quantize", "files") if q.status != "skipped" else ctx.path("export_onnx", io.FILES_DIR)
    for f in shipped.iterdir():
        shutil.copy2(f, bundle / f.name)
    if q.status != "skipped" and ctx.path("quantize", "trt").is_dir():
        shutil.copytree(ctx.path("quantize", "trt"), bundle / "trt")
    vlm, tok = io.load_vlm(ctx.path("finetune", io.MODEL_DIR))
    shutil.copytree(ctx.path("finetune", io.MODEL_DIR) / "decoder", bundle / "hf")
    _runtime(bundle)
    sample = _sample(data.test)
    images = data.data.test_images
    write_sample(bundle, [r.as_dict() for r in sample], images)
    answers = _answers(bundle, sample, images, ctx.cfg.decoder.max_new_tokens)
    expected = [json.dumps({"images": [f"sample/{i}.png" for i in r.images], "prompt": r.prompt, "answer": a,
                            "kind": r.kind}) for r, a in zip(sample, answers, strict=True)]
    atomic_write(bundle / "expected.jsonl", "\n".join(expected) + "\n")
    preflight = _preflight(vlm.decoder.config, ctx.cfg.decoder.int4_group)
    write_json(bundle / "preflight.json", preflight)
    c = read_vlm_config(bundle)
    widths = ctx.record("prune").metrics["pruned"]["decoder_after"]
    (bundle / "JETSON.md").write_text(JETSON.format(family=vlm.decoder.config.model_type, widths=widths,
                                                    tpi=c.tokens_per_image, c=c.channels, h=c.image_size[0],
                                                    w=c.image_size[1]))
    files = write_manifest(bundle, task="vlm")["files"]   # what the runtime verifies before it reads anything
    check = _self_test(bundle, ctx.cfg.decoder.max_new_tokens)
    size = sum((bundle / f).stat().st_size for f in ("vision.onnx", "model.onnx", "embed_tokens.npy"))
    metrics = {"task": "vlm", "shipped": shipped.name, "size_bytes": size, "self_test": check,
               "preflight": preflight, "files": len(files), "sample": len(sample)}
    return Output(metrics=metrics)


def _sample(records):
    """Up to SAMPLE held-out records, every question type in turn."""
    by_kind: dict[str, list] = {}
    for r in records:
        by_kind.setdefault(r.kind, []).append(r)
    out, i = [], 0
    while len(out) < SAMPLE and any(i < len(v) for v in by_kind.values()):
        out += [v[i] for v in by_kind.values() if i < len(v)][:SAMPLE - len(out)]
        i += 1
    return out


def _answers(bundle, sample, images, max_new_tokens: int) -> list[str]:
    from edgerun.vlm import VLMSession
    session = VLMSession(bundle, threads=1)
    eos = set(session.config.eos_token_id)
    new = session.greedy([([images[i] for i in r.images], r.prompt) for r in sample], max_new_tokens=max_new_tokens)
    return [session.decode([t for t in ids if t not in eos]) for ids in new]


def _self_test(bundle, max_new_tokens: int) -> dict:
    """The bundle's own runtime, in a fresh process inside it, must give the pipeline's answers."""
    from pipeline.llm.package import bundle_self_test
    return bundle_self_test(bundle, ["eval", "--bundle", ".", "--data", "expected.jsonl", "--max-new-tokens",
                                     str(max_new_tokens), "--threads", "1", "--format", "json"])
