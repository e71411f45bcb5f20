"""Real tokenizers' special tokens: bos/eos/pad come from the model folder's config.json and
generation_config.json (a Qwen-style tokenizer has <|endoftext|> and <|im_end|>, no <pad> <s> </s>); the
pipeline trains and scores with them, and the bundle's runtime stops where the pipeline does."""
import json
import subprocess
import sys

import pytest
from conftest import one_line
from test_llm_byo import RUN, _folder

import pipeline
from pipeline.errors import PipelineError
from pipeline.textdata import attach_special_ids, encode, folder_special_ids, special_ids

QWEN = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]          # ids 0, 1, 2
ENDOFTEXT, IM_START, IM_END = 0, 1, 2
# Qwen2.5-Instruct's layout: config.json ends a turn at <|im_end|>, has no pad; generation stops at both ends
QWEN_IDS = {"bos_token_id": ENDOFTEXT, "eos_token_id": IM_END, "tie_word_embeddings": False,
            "generation_config": {"bos_token_id": ENDOFTEXT, "eos_token_id": [IM_END, ENDOFTEXT]}}


def qwen_tokenizer(texts):
    """Byte-level BPE with Qwen's specials only (no <unk>: bytes cover everything)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=400, special_tokens=QWEN,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok


def _config(tmp_path, config, generation=None):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "config.json").write_text(json.dumps(config))
    if generation is not None:
        (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return tmp_path


def test_ids_come_from_the_folders_configs_and_pad_falls_back_to_eos(tmp_path):
    tok = qwen_tokenizer(["one two three"])
    with pytest.raises(PipelineError, match="no <pad>, <s>, </s>, <unk>"):
        special_ids(tok)                                          # the tokenizer alone does not say
    sp = folder_special_ids(_config(tmp_path / "a", {"bos_token_id": 0, "eos_token_id": 2},
                                    {"eos_token_id": [2, 0]}), tok)
    assert sp == {"pad": IM_END, "bos": ENDOFTEXT, "eos": IM_END, "unk": None, "eos_ids": [IM_END, ENDOFTEXT]}
    sp = folder_special_ids(_config(tmp_path / "b", {"bos_token_id": 0, "eos_token_id": [2, 0], "pad_token_id": 1}),
                            tok)
    assert (sp["pad"], sp["eos"], sp["eos_ids"]) == (IM_START, IM_END, [IM_END, ENDOFTEXT])
    batch = encode(attach_special_ids(tok, sp), [{"prompt": "one", "answer": "two"}])
    row = batch["input_ids"][0].tolist()
    assert row[0] == ENDOFTEXT and row[-1] == IM_END               # <bos> prompt answer <eos>, as carried
    for config, expected in (({"bos_token_id": 0}, "gives an eos_token_id"),
                             ({"eos_token_id": 2}, "gives a bos_token_id"),
                             ({"bos_token_id": 0, "eos_token_id": 4000}, "eos_token_id = 4000 is not a token id")):
        with pytest.raises(PipelineError, match=expected) as e:
            folder_special_ids(_config(tmp_path / "c", config), tok)
        one_line(e.value)


def _always_ends_turn(folder):
    """Rewrite the random model so that every position's greedy token is <|im_end|>: every embedding shares one
    direction and the head's <|im_end|> row is that direction (RMSNorm keeps it), so an answer is empty and
    ends at once -- the eos the runtime must stop at."""
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight[IM_END] = 0.0
        model.lm_head.weight[IM_END, 0] = 5.0
    model.save_pretrained(folder)


@pytest.mark.e2e
def test_a_qwen_style_tokenizer_goes_through_and_the_bundle_stops_at_its_eos(tmp_path):
    folder, data = _folder(tmp_path, "qwen2", tokenizer=qwen_tokenizer, ids=QWEN_IDS)
    _always_ends_turn(folder)
    result = pipeline.run("configs/llm-cpu.toml", [*RUN, f"model.pretrained={folder}", f"data.root={data}"],
                          runs=tmp_path / "runs", run_name="qwen", log=lambda m: None)
    assert result.passed, result.message
    rec = {r.name: r for r in result.records}
    assert rec["finetune"].metrics["epochs"] > 0 and rec["package"].metrics["self_test"]["exact_match"] == 100.0
    bundle = result.run_dir / "deploy"
    genai = json.loads((bundle / "genai_config.json").read_text())["model"]
    assert (genai["bos_token_id"], genai["eos_token_id"], genai["pad_token_id"]) == \
        (ENDOFTEXT, [IM_END, ENDOFTEXT], IM_END)
    p = subprocess.run([sys.executable, "-m", "edgerun", "generate", "--bundle", ".", "--prompt", "what is two plus",
                        "--max-new-tokens", "5", "--format", "json"], cwd=bundle, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["stop_reason"] == "eos" and out["tokens"] == [IM_END] and out["text"] == ""
