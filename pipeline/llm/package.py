"""The decoder's package stage: a bundle folder that is all a target needs, and that runs under edgerun's
`generate` and onnxruntime-genai alike.

    genai_config.json, tokenizer.json, tokenizer_config.json   one description of the model for both runtimes
    model.onnx                 the shipped file: INT4 (MatMulNBits) when quantized, else the pruned FP32 file
    edgerun/                   the torch-free runtime (`python3 -m edgerun generate --bundle .`)
    sample/prompts.jsonl       held-out prompts with their answers (ground truth where the data has it)
    sample/expected.jsonl      the same prompts with the pipeline's own greedy answers from model.onnx
    hf/                        the pruned, fine-tuned decoder as a Hugging Face folder, for TensorRT Edge-LLM's
                               exporter on the Jetson; EDGE_LLM.md says how (NOT executed here: no TensorRT)
    preflight.json             the widths against each target's kernel limits (edgerun/llm_limits.json)
    manifest.json              every file with its kind and sha256 (edgerun.genai.write_manifest);
                               `generate` verifies the bundle against it before it runs

Before the run may pass, the bundle's own runtime, in a fresh process inside the bundle, scores
sample/expected.jsonl: every answer must be the pipeline's (100 %).
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

from edgerun.io import copy_file, write_json
from pipeline.errors import PipelineError
from pipeline.llm import lm
from pipeline.runner import Context, Output

SAMPLE = 32
SELF_TEST = ("generate", "--bundle", ".", "--eval", "sample/expected.jsonl", "--format", "json")
EDGE_LLM = """# The decoder on a Jetson with TensorRT Edge-LLM (not executed here: no TensorRT or GPU on this machine)

`hf/` is the pruned, fine-tuned decoder as a Hugging Face folder ({family}, {widths}). TensorRT Edge-LLM's
exporter reads such a folder on an x86 host; its engine builder runs on the device:

    # on the x86 host, with TensorRT Edge-LLM installed (quantize to INT4 AWQ through its ModelOpt step)
    tensorrt-edgellm-export --model_dir hf --output_dir onnx_edgellm --quantization int4_awq
    # on the Jetson (JetPack 7.2, or 6.2+)
    llm_build --onnxDir onnx_edgellm --engineDir engine --maxBatchSize 1
    llm_inference --engineDir engine --inputFile prompts.json --outputFile out.json

The command names follow Edge-LLM's documentation as read when this was written; check them against the
version you install. `preflight.json` says whether these widths fit Edge-LLM's attention and INT4 kernels.
"""


def package_keys(cfg):
    return ["run.target", "decoder.int4_group", "decoder.max_new_tokens"]


def package_environment() -> dict:
    from pipeline.package import package_environment as runtime
    return runtime()


def package_stage(ctx: Context) -> Output:
    from edgerun.genai import write_genai_config, write_manifest, write_tokenizer
    from export.decoder import decoder_facts
    bundle = ctx.out
    model, tok = lm.load_model(ctx.path("finetune", lm.MODEL_DIR))
    q = ctx.record("quantize")
    shipped = (ctx.path("quantize", "model_int4.onnx") if q.status != "skipped"
               else ctx.path("export_onnx", "model.onnx"))
    copy_file(shipped, bundle / "model.onnx")
    sp = lm.specials(tok)
    info = {**decoder_facts(model), "path": "model.onnx", "embeds": False}
    context = int(getattr(model.config, "max_position_embeddings", 256))
    # the runtime stops where the pipeline's own generation does: at every eos of the model's folder
    write_genai_config(bundle, info, context_length=context, eos_token_id=sp["eos_ids"], bos_token_id=sp["bos"],
                       pad_token_id=sp["pad"])
    write_tokenizer(bundle, tok, add_bos_token=True, context_length=context)
    shutil.copytree(ctx.path("finetune", lm.MODEL_DIR), bundle / "hf")
    _runtime(bundle)
    sample = ctx.data.test[:SAMPLE]
    answers = lm.onnx_answers(bundle / "model.onnx", tok, sample, ctx.cfg.decoder.max_new_tokens)
    _jsonl(bundle / "sample" / "prompts.jsonl", sample)
    _jsonl(bundle / "sample" / "expected.jsonl", [{"prompt": r["prompt"], "answer": a}
                                                  for r, a in zip(sample, answers, strict=True)])
    preflight = _preflight(model.config, ctx.cfg.decoder.int4_group)
    write_json(bundle / "preflight.json", preflight)
    widths = ctx.record("prune").metrics["widths"]
    (bundle / "EDGE_LLM.md").write_text(EDGE_LLM.format(family=model.config.model_type, widths=widths))
    files = write_manifest(bundle, model="model.onnx")["files"]
    check = _self_test(bundle, ctx.cfg.decoder.max_new_tokens)
    metrics = {"task": "generate", "shipped": shipped.name, "size_bytes": (bundle / "model.onnx").stat().st_size,
               "self_test": check, "preflight": preflight, "files": len(files)}
    return Output(metrics=metrics)


def _runtime(bundle) -> None:
    from pipeline.package import runtime_files
    for p in runtime_files():
        copy_file(p, bundle / "edgerun" / p.name)


def _jsonl(path, records) -> None:
    from edgerun.io import atomic_write
    atomic_write(path, "".join(json.dumps(r) + "\n" for r in records))


def _preflight(config, group: int) -> dict:
    from edgerun.llm_preflight import check_decoder_shapes, targets
    return {t: check_decoder_shapes(lm.widths_of(config), t, int4_group=group) for t in targets()}


def _self_test(bundle, max_new_tokens: int) -> dict:
    """The bundle's own runtime, in a fresh process inside it, must give the pipeline's answers (cut at the same
    length: an answer that reached decoder.max_new_tokens without the end token goes on otherwise)."""
    return bundle_self_test(bundle, [*SELF_TEST, "--max-new-tokens", str(max_new_tokens)])


def bundle_self_test(bundle, args: list[str]) -> dict:
    """``python -m edgerun ARGS`` in a fresh process inside ``bundle`` (its own runtime), whose last line is the
    JSON of an evaluation of the pipeline's own answers: every one must be matched (100 %)."""
    verb = args[0]
    p = subprocess.run([sys.executable, "-m", "edgerun", *args], cwd=bundle, capture_output=True, text=True,
                       timeout=600)
    if p.returncode != 0:
        raise PipelineError(f"package: the bundle's {verb} failed in {bundle} "
                            f"({(p.stdout.strip() or p.stderr.strip()).splitlines()[-1:]})")
    result = json.loads(p.stdout.strip().splitlines()[-1])
    if result.get("exact_match") != 100.0:
        raise PipelineError(f"package: the bundle's {verb} answered {result.get('exact_match')} % of its sample "
                            "as the pipeline did; expected 100 %")
    return result
