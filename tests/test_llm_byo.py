"""Bring your own decoder: a tiny random Hugging Face folder of each listed family (made here with save_pretrained,
nothing downloaded) and a jsonl of prompts go through every stage; the runtime's greedy answers from the exported
file equal torch's, and the bundle's own `generate` gives the pipeline's answers.

Random weights answer nonsense, so the accuracy gates only warn here; parity is what is checked. One family runs
in CI (e2e); the others are `slow` (each run is a minute of exports on this machine)."""
import json

import pytest

import pipeline
from pipeline.models.decoder import save_decoder
from pipeline.textdata import build_tokenizer, number_task

FAMILIES = ["qwen2", "llama", "mistral", "qwen3", "gemma", "phi3"]
RUN = ["data.kind=jsonl", "task.kind=generate", "baseline.min_top1=-1", "decoder.int4_group=32",
       "decoder.calib_prompts=4", "decoder.max_new_tokens=4", "decoder.awq=false", "profile.processes=1",
       "profile.rounds=3", "profile.block_ms=5", "prune.target=ratio", "prune.ratio=0.5",
       *(f"{s}.gate=warn" for s in ("prune", "finetune", "export", "quantize")), "finetune.epochs=0.2"]


def _folder(tmp_path, family, tokenizer=None, ids=None):
    """A tiny random Hugging Face folder of ``family`` and a jsonl of number-task prompts. ``tokenizer``
    (given the training texts) replaces the word tokenizer with <pad> <s> </s> <unk>; ``ids`` the config's
    special ids (config keys); a ``generation_config`` entry in it is written as generation_config.json."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    train, test = number_task(seed=1, n_train=300, n_test=24)
    data = tmp_path / "data"
    data.mkdir()
    for name, rows in (("train", train), ("test", test)):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    texts = [r["prompt"] + " " + r["answer"] for r in train + test]
    tok = tokenizer(texts) if tokenizer else build_tokenizer(texts[:len(train)])
    ids = dict(ids or {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2})
    generation = ids.pop("generation_config", None)
    kw = dict(vocab_size=tok.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64, **ids)
    if family == "phi3":
        kw.pop("head_dim")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(family, **kw)).eval()
    if tokenizer is None:
        save_decoder(model, tok, tmp_path / family)
    else:   # a tokenizer without <pad> <s> </s>: written as a hub folder is, not through the pipeline's writer
        model.save_pretrained(tmp_path / family)
        tok.save(str(tmp_path / family / "tokenizer.json"))
    if generation is not None:
        (tmp_path / family / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path / family, data


@pytest.mark.parametrize("family", [pytest.param(f, marks=pytest.mark.e2e if f == "qwen2" else pytest.mark.slow)
                                    for f in FAMILIES])
def test_a_pretrained_folder_goes_through_every_stage(tmp_path, family):
    folder, data = _folder(tmp_path, family)
    # Phi-3's fused projections are not pruned: its widths are kept (prune.ratio = 0), every other stage runs.
    extra = ["prune.ratio=0"] if family == "phi3" else []
    result = pipeline.run("configs/llm-cpu.toml", [*RUN, *extra, f"model.pretrained={folder}", f"data.root={data}"],
                          runs=tmp_path / "runs", run_name=family, log=lambda m: None)
    assert result.passed, result.message
    rec = {r.name: r for r in result.records}
    assert rec["baseline"].metrics["pretrained"] == str(folder) and "epochs" not in rec["baseline"].metrics
    assert rec["baseline"].metrics["config"]["model_type"] == family
    assert rec["export_onnx"].metrics["parity"]["greedy_equal"] >= 99.0
    assert rec["package"].metrics["self_test"]["exact_match"] == 100.0
    if family != "phi3":
        assert rec["prune"].metrics["params"] < rec["baseline"].metrics["params"]
