"""The decoder's CUDA paths for `make gpu-check` (benchmarks/gpu_check.py runs them after the CNN's):

1. Distillation on CUDA: a tiny LLaMA-style decoder, pruned to half its MLP, distilled from the unpruned one
   for a few steps through pipeline.train (the fine-tune stage's loop and the generate task's KL + CE loss) on
   `cuda`: every loss finite, the weights changed.
2. Decode with onnxruntime's CUDA execution provider (onnxruntime-gpu): the tiny decoder exported with its KV
   cache, greedy tokens from edgerun.generate on CUDA equal to the CPU's. Skipped, with the reason printed,
   where this onnxruntime has no CUDAExecutionProvider.

Each check takes the device as an argument, so the tests run the same code on the CPU (tests/test_gpu_check.py);
on a machine without CUDA the script prints "skipped: no CUDA" and claims nothing.
"""
from __future__ import annotations

import copy
import math
import tempfile
from pathlib import Path

PROMPTS = ["what is two plus three ?", "the number before fifty is", "which is larger , twelve or twenty ?"]
CUDA_EP = "CUDAExecutionProvider"


def _tiny(seed: int = 0):
    """(model, tokenizer, train rows): a 2-layer decoder over the number task's word tokenizer."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.textdata import build_tokenizer, number_task, special_ids
    train, _ = number_task(seed=seed, n_train=96, n_test=8)
    tok = build_tokenizer([r["prompt"] + " " + r["answer"] for r in train] + PROMPTS)
    sp = special_ids(tok)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         head_dim=16, max_position_embeddings=64, pad_token_id=sp["pad"],
                                         bos_token_id=sp["bos"], eos_token_id=sp["eos"])).eval()
    return model, tok, train


def distill_step(device: str) -> dict:
    """A few distillation steps of the half-width student on ``device``; raises AssertionError when a loss is not
    finite or no weight changed."""
    import torch

    from pipeline.prune_decoder import decoder_widths, magnitude_importance, prune_decoder
    from pipeline.tasks import named
    from pipeline.textdata import encode
    from pipeline.train import train
    teacher, tok, rows = _tiny()
    student = copy.deepcopy(teacher)
    now = decoder_widths(student)
    prune_decoder(student, now.replace(intermediate=now.intermediate // 2), magnitude_importance(student),
                  target=None)
    before = {k: v.detach().cpu().clone() for k, v in student.state_dict().items()}
    batch = encode(tok, rows)
    info = train(student, teacher, batch["input_ids"].numpy(), batch["labels"].numpy(), epochs=1.0, lr=1e-3,
                 batch_size=32, kd_temperature=1.0, kd_weight=0.5, schedule="constant", seed=0, device=device,
                 progress=None, task=named("generate"))
    on = {p.device.type for p in student.parameters()}
    changed = sum(not torch.equal(before[k], v.detach().cpu()) for k, v in student.state_dict().items())
    losses = [float(x) for x in info["losses"]]
    assert losses and all(math.isfinite(x) for x in losses), f"distillation on {device}: losses {losses}"
    assert changed > 0, f"distillation on {device}: no weight changed in {info['steps']} steps"
    return {"device": device, "steps": info["steps"], "losses": losses, "tensors_changed": changed,
            "tensors": len(before), "student_on": sorted(on)}


def ort_greedy_equal(providers: tuple[str, ...]) -> dict:
    """Greedy tokens of the tiny exported decoder under ``providers`` against onnxruntime's CPU; raises
    AssertionError when they differ or when onnxruntime did not put the first provider first."""
    from edgerun.generate import DecoderSession, greedy_batch
    from export.decoder import export_decoder
    from pipeline.textdata import special_ids
    model, tok, _ = _tiny()
    sp = special_ids(tok)
    prompts = [[sp["bos"], *tok.encode(p, add_special_tokens=False).ids] for p in PROMPTS]
    with tempfile.TemporaryDirectory(prefix="edgepipe_gpu_check_") as tmp:
        path = export_decoder(model, Path(tmp) / "model.onnx")["path"]
        tokens = {}
        for name, prov in (("cpu", ("CPUExecutionProvider",)), ("device", providers)):
            session = DecoderSession(path, providers=prov)
            used = session.runner.session.get_providers()
            assert used[0] == prov[0], f"onnxruntime put {used[0]} first, not {prov[0]} (providers: {used})"
            tokens[name] = greedy_batch(session, prompts, max_new_tokens=8, eos_token_id=sp["eos_ids"],
                                        pad_token_id=sp["pad"])
    same = sum(a == b for a, b in zip(tokens["cpu"], tokens["device"], strict=True))
    assert same == len(prompts), f"greedy tokens differ from the CPU's on {len(prompts) - same} of {len(prompts)}"
    return {"providers": list(providers), "prompts": len(prompts), "greedy_equal": same, "tokens": tokens["device"]}


def decoder_checks(cuda: bool, log=print) -> dict:
    """Both checks where they can run; a skipped one is {"skipped": reason}, printed as such."""
    from edgerun.ort import available_ort_providers
    out = {}
    if cuda:
        out["distill_cuda"] = distill_step("cuda")
        log(f"decoder distillation on CUDA: {out['distill_cuda']['steps']} steps, losses "
            f"{out['distill_cuda']['losses']}, {out['distill_cuda']['tensors_changed']} tensors changed")
    else:
        out["distill_cuda"] = {"skipped": "no CUDA"}
        log("decoder distillation on CUDA: skipped: no CUDA")
    available = available_ort_providers()
    if CUDA_EP not in available:
        why = f"onnxruntime here has no {CUDA_EP} (install onnxruntime-gpu; providers: {', '.join(available)})"
        out["ort_cuda_decode"] = {"skipped": why}
        log(f"decoder decode on onnxruntime CUDA: skipped: {why}")
    elif not cuda:
        out["ort_cuda_decode"] = {"skipped": "no CUDA"}
        log("decoder decode on onnxruntime CUDA: skipped: no CUDA")
    else:
        out["ort_cuda_decode"] = ort_greedy_equal((CUDA_EP, "CPUExecutionProvider"))
        log(f"decoder decode on onnxruntime CUDA: greedy tokens equal to the CPU's on "
            f"{out['ort_cuda_decode']['greedy_equal']}/{out['ort_cuda_decode']['prompts']} prompts")
    return out
