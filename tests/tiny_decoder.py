"""Tiny random decoders and a word-level tokenizer for the decoder tests (nothing downloaded)."""
from __future__ import annotations

import functools
import tempfile
from pathlib import Path

WORDS = ["the", "cat", "dog", "sat", "on", "mat", "a", "red", "blue", "big", "ran", "to", "home", "and", "is"]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
PAD, BOS, EOS = 0, 1, 2
VOCAB = 48  # the model's vocabulary: the tokenizer's specials and words, then filler words w19 ... w47


def tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = SPECIAL + WORDS
    vocab = {w: i for i, w in enumerate(words + [f"w{i}" for i in range(len(words), VOCAB)])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(SPECIAL)
    return tok


def model(family: str = "llama", seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                  bos_token_id=BOS, eos_token_id=EOS, pad_token_id=PAD)
    if family == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**common)).eval()
    return LlamaForCausalLM(LlamaConfig(**common)).eval()


def exported(family: str = "llama", embeds: bool = False):
    """(model, export info) for a tiny model exported once per test process (however the arguments are spelt:
    functools.cache keys exported() and exported("llama") apart)."""
    return _exported(family, embeds)


@functools.cache
def _exported(family: str, embeds: bool):
    from export.decoder import export_decoder

    m = model(family)
    folder = Path(tempfile.mkdtemp(prefix=f"tiny_{family}_"))
    return m, export_decoder(m, folder / "model.onnx", embeds=embeds)


@functools.cache
def bundle(family: str = "llama") -> Path:
    """A decoder bundle folder for the exported tiny model: genai_config.json, tokenizer files, model.onnx and
    the manifest.json listing them (what `generate` verifies)."""
    from edgerun.genai import write_genai_config, write_manifest, write_tokenizer

    _, info = exported(family)
    folder = Path(info["path"]).parent
    write_genai_config(folder, info, context_length=64, eos_token_id=EOS, bos_token_id=BOS, pad_token_id=PAD)
    write_tokenizer(folder, tokenizer(), add_bos_token=True, context_length=64, bos_token="<s>", eos_token="</s>",
                    pad_token="<pad>")
    write_manifest(folder)
    return folder
