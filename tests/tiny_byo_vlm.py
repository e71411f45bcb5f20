"""Tiny random parts for bringing your own VLM (nothing downloaded): a vision tower factory of the contract in
pipeline/vlm/byo.py (RGB, its own normalisation), broken factories for the refusals, and a tiny LLaMA folder
whose word-level tokenizer holds <image> (made from the embedded task's words, saved with save_pretrained)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn


class PatchTower(nn.Module):
    """Not pipeline's VisionTower: 7x7 patches (16 tokens of a 28x28 image), a linear patch embedding, one MLP
    block; takes RGB normalised with its own mean/std."""

    def __init__(self, in_channels: int = 3, image_size: int = 28, patch: int = 7, dim: int = 24):
        super().__init__()
        self.in_channels, self.image_size, self.patch = in_channels, image_size, patch
        self.num_tokens = (image_size // patch) ** 2
        self.mean, self.std = (0.5, 0.5, 0.5)[:in_channels], (0.25, 0.25, 0.25)[:in_channels]
        self.embed = nn.Linear(in_channels * patch * patch, dim)
        self.pos = nn.Parameter(torch.randn(1, self.num_tokens, dim) * 0.5)
        self.mlp = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def encode(self, pixels):
        n, c, h, w = pixels.shape
        p = self.patch
        x = pixels.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5).reshape(n, -1, c * p * p)
        x = self.embed(x) + self.pos
        return x + self.mlp(x)


def tower(**kwargs):
    return PatchTower(**kwargs)


def not_a_module():
    return 3


def no_encode():
    return nn.Linear(2, 2)


def raises():
    raise RuntimeError("no GPU here")


class _Flat(PatchTower):
    def encode(self, pixels):
        return super().encode(pixels).mean(1)   # [n, dim]: no tokens


def flat():
    return _Flat()


DECODER = dict(hidden_size=128, num_hidden_layers=2, intermediate_size=256, num_attention_heads=2,
               num_key_value_heads=1, head_dim=64, max_position_embeddings=128)


def task_texts() -> list:
    """The embedded task's records (every question type): what the folder's tokenizer is made from."""
    from pipeline.vlmdata import mnist_vlm_task
    labels = np.tile(np.arange(10), 20)
    train, test = mnist_vlm_task(labels, labels, seed=0, n_train=200, n_test=50)
    return train + test


def decoder_folder(folder: Path, *, image: str = "special", seed: int = 0) -> Path:
    """A tiny random LlamaForCausalLM folder (config.json, model.safetensors, tokenizer.json); its tokenizer
    holds <image> as a special token (``image="special"``), as a word its pre-tokenizer splits ("word"), or not
    at all ("none")."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.models.decoder import save_decoder
    from pipeline.textdata import build_tokenizer, special_ids
    from pipeline.vlmdata import build_vlm_tokenizer
    records = task_texts()
    texts = [" ".join(w for w in f"{r.prompt} {r.answer}".split() if w != "<image>") for r in records]
    tok = build_vlm_tokenizer(records) if image == "special" else build_tokenizer(texts + ["<image>"] * (
        image == "word"))
    if image == "word":   # in the vocabulary, but a prompt's "<image>" is split into "<", "image", ">"
        from tokenizers import pre_tokenizers
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    sp = special_ids(tok)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_act="silu", rms_norm_eps=1e-5,
                                         pad_token_id=sp["pad"], bos_token_id=sp["bos"], eos_token_id=sp["eos"],
                                         tie_word_embeddings=False, **DECODER)).eval()
    return save_decoder(model, tok, folder)


def tower_weights(path: Path, seed: int = 1, **kwargs) -> Path:
    """The tower's weights as a file (.safetensors or .pt by the suffix)."""
    torch.manual_seed(seed)
    state = tower(**kwargs).state_dict()
    if path.suffix == ".safetensors":
        from safetensors.torch import save_file
        save_file(state, str(path))
    else:
        torch.save(state, path)
    return path
