"""Decoders for the generate workload: a LLaMA-style one built from a config, or the user's Hugging Face folder.

    model = build_decoder(vocab_size=tok.get_vocab_size())        # the embedded default, random weights
    save_decoder(model, tok, "out/decoder")                        # config.json, model.safetensors, tokenizer.json
    model, tok = load_pretrained("out/decoder")                    # offline, weights only, no remote code

The default's shapes are ones the Jetson's kernels take (Edge-LLM: context attention head size in
{64, 72, 80, 128, 256}, decode {32, 64, 128}, query/KV head ratio 1..8, intermediate a multiple of INT4's
group size 128), sized so its FP32 weights pass 50 MB: decode at batch 1 then reads weights, not overheads.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from pipeline.errors import PipelineError
from pipeline.textdata import attach_special_ids, folder_special_ids, save_tokenizer, special_ids

# The LLaMA family: RMSNorm, RoPE, gated MLP, grouped-query attention; what transformers builds natively
# and Edge-LLM's exporter reads. model_type in config.json -> the family's name in messages.
FAMILIES = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma")

DEFAULT = dict(hidden_size=512, num_hidden_layers=4, intermediate_size=1792, num_attention_heads=8,
               num_key_value_heads=2, head_dim=64)


def build_decoder(vocab_size: int, *, hidden_size: int = DEFAULT["hidden_size"],
                  num_hidden_layers: int = DEFAULT["num_hidden_layers"],
                  intermediate_size: int = DEFAULT["intermediate_size"],
                  num_attention_heads: int = DEFAULT["num_attention_heads"],
                  num_key_value_heads: int = DEFAULT["num_key_value_heads"], head_dim: int = DEFAULT["head_dim"],
                  tie_word_embeddings: bool = True, max_position_embeddings: int = 256,
                  special: dict | None = None, seed: int = 0):
    """A ``LlamaForCausalLM`` with random (seeded) weights.

    Embeddings are tied by default: the small LLaMA-family models do the same (Llama 3.2 1B/3B, Qwen2.5 up
    to 3B), and one [vocab, hidden] matrix means one thing for a pruner to keep consistent; with a small
    vocabulary the untied head would add almost nothing to the size anyway. ``special`` gives the pad/bos/eos
    ids (textdata.special_ids)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    if num_attention_heads % num_key_value_heads:
        raise PipelineError(f"decoder: {num_attention_heads} query heads are not a multiple of "
                            f"{num_key_value_heads} key/value heads")
    sp = special or {"pad": 0, "bos": 1, "eos": 2}
    cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_hidden_layers=num_hidden_layers,
                      intermediate_size=intermediate_size, num_attention_heads=num_attention_heads,
                      num_key_value_heads=num_key_value_heads, head_dim=head_dim, hidden_act="silu",
                      max_position_embeddings=max_position_embeddings, rms_norm_eps=1e-5,
                      tie_word_embeddings=tie_word_embeddings, attention_bias=False, mlp_bias=False,
                      pad_token_id=sp["pad"], bos_token_id=sp["bos"], eos_token_id=sp["eos"])
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


def weight_bytes(model) -> int:
    """FP32 size of the distinct weights (parameters() yields a tied matrix once; works on the meta device)."""
    return 4 * sum(p.numel() for p in model.parameters())


def _one_line(e: Exception) -> str:
    return " ".join(str(e).split())[:300]


def load_pretrained(folder: str | Path):
    """(model, tokenizer) from a Hugging Face folder of the LLaMA family (config.json, *.safetensors,
    tokenizer.json), offline: no download, no remote code, safetensors only (no pickled weights). The tokenizer
    carries the folder's bos/eos/pad ids (textdata.folder_special_ids): what textdata.special_ids returns."""
    from tokenizers import Tokenizer
    d = Path(folder)
    if not d.is_dir():
        raise PipelineError(f"model: {d} is not a folder; expected a Hugging Face folder with config.json, "
                            f"*.safetensors and tokenizer.json")
    missing = [n for n in ("config.json", "tokenizer.json") if not (d / n).is_file()]
    if not any(d.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise PipelineError(f"model: {d} has no {', '.join(missing)}; a decoder folder needs config.json, "
                            f"*.safetensors (weights) and tokenizer.json")
    try:
        model_type = json.loads((d / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError) as e:
        raise PipelineError(f"model: {d / 'config.json'}: not a JSON object ({_one_line(e)})") from None
    if model_type not in FAMILIES:
        raise PipelineError(f"model: {d / 'config.json'} has model_type {model_type!r}; supported decoders are "
                            f"{', '.join(FAMILIES)}")
    from transformers import AutoModelForCausalLM
    try:
        model = AutoModelForCausalLM.from_pretrained(d, local_files_only=True, trust_remote_code=False,
                                                     use_safetensors=True)
        tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    except Exception as e:   # transformers raises many kinds; the user needs one line either way
        raise PipelineError(f"model: cannot load {model_type} from {d}: {_one_line(e)}") from None
    if tok.get_vocab_size() > model.config.vocab_size:
        raise PipelineError(f"model: {d}: tokenizer.json has {tok.get_vocab_size()} tokens, the model's "
                            f"embedding {model.config.vocab_size}")
    return model.eval(), attach_special_ids(tok, folder_special_ids(d, tok))


def save_decoder(model, tok, folder: str | Path) -> Path:
    """Write ``folder`` as a Hugging Face folder load_pretrained (and Edge-LLM's exporter) reads: config.json,
    generation_config.json, model.safetensors, tokenizer.json. Written beside it and renamed into place,
    so a crash leaves the old folder or the new one, never half of one."""
    d = Path(folder)
    d.parent.mkdir(parents=True, exist_ok=True)
    special_ids(tok)   # refuse a tokenizer without the specials before writing anything
    tmp = Path(tempfile.mkdtemp(prefix=f".{d.name}.", dir=d.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        save_tokenizer(tok, tmp / "tokenizer.json")
        if d.exists():
            old = d.parent / f".{d.name}.old.{os.getpid()}"
            os.replace(d, old)
            os.replace(tmp, d)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, d)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return d
