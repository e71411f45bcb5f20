"""Text generation with a KV cache on an ONNX decoder (export.decoder's layout, onnxruntime-genai's).

Torch-free: numpy and onnxruntime (through edgerun.ort). ``generate`` prefills the prompt in one run,
then feeds one token per run with the previous run's ``present`` tensors as ``past``; ``greedy_batch``
decodes many prompts at once, left-padded, and gives each prompt the tokens it gets alone.

A decoder file whose first input is ``inputs_embeds`` (a vision-language model's) runs through the same loop:
``DecoderSession(path, embed_tokens=table)`` turns ids into rows of the token embedding table
(``DecoderSession.feed``), and the prompt may come as embeddings (``prompt_embeds``: image tokens mixed in).
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np

from edgerun.errors import EdgeError
from edgerun.ort import OrtRunner

PAST = re.compile(r"past_key_values\.(\d+)\.(key|value)$")
ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64}


class GenerateError(EdgeError):
    """A decoder file without the KV-cache layout, or a bad generation option."""


def exact_match(predicted: str, answer: str) -> bool:
    """The one exact-match of the pipeline and the runtime: equal after stripping surrounding whitespace;
    case-sensitive ("Paris" is not "paris"), inner whitespace and punctuation count."""
    return predicted.strip() == answer.strip()


@dataclass(frozen=True)
class Generation:
    """One prompt's generation. ``tokens``: the new ids (the eos id last when it stopped there);
    ``text``: their decoding (special tokens skipped) when a tokenizer was given; ``ttft_s``: prefill and
    first token; ``decode_tokens_per_s``: the tokens after the first over their time (0 when there is one);
    ``stop_reason``: "eos", "max_new_tokens" or "context_length"."""
    tokens: list[int]
    text: str | None
    ttft_s: float
    decode_tokens_per_s: float
    stop_reason: str

    def as_dict(self) -> dict:
        return {"tokens": self.tokens, "text": self.text, "ttft_s": self.ttft_s,
                "decode_tokens_per_s": self.decode_tokens_per_s, "stop_reason": self.stop_reason}


class DecoderSession:
    """An onnxruntime session on a decoder file; its layers, kv heads, head size and cache dtype are read
    from the file's ``past_key_values.{i}.key|value`` inputs. Its first input is ``input_ids`` or
    ``inputs_embeds`` (``embeds``); the latter needs ``embed_tokens``, the token embedding table
    [vocab, hidden], to feed generated ids."""

    def __init__(self, path, *, threads: int = 0, embed_tokens: np.ndarray | None = None,
                 providers=("CPUExecutionProvider",)):
        self.runner = OrtRunner(path, providers=providers, threads=threads)
        self.name = self.runner.name
        inputs = {i.name: i for i in self.runner.session.get_inputs()}
        # position_ids is optional: onnxruntime-genai's own builder writes files that derive them from the mask
        self.first = "inputs_embeds" if "inputs_embeds" in inputs else "input_ids"
        past = {m.groups(): i for n, i in inputs.items() if (m := PAST.match(n))}
        if not {self.first, "attention_mask"} <= set(inputs) or not past or "logits" not in self.runner.output_names:
            raise GenerateError(f"{self.name}: not a decoder with a KV cache (expected inputs input_ids or "
                                f"inputs_embeds, attention_mask, [position_ids,] past_key_values.N.key|value and "
                                f"output logits; it has {', '.join(inputs)})")
        self.num_layers = len({int(i) for i, _ in past})
        key = past[("0", "key")] if ("0", "key") in past else next(iter(past.values()))
        kv_heads, head_dim = _cache_dims(self.runner.path, key.shape)
        if not all(isinstance(d, int) for d in (kv_heads, head_dim)) or len(past) != 2 * self.num_layers:
            raise GenerateError(f"{self.name}: past_key_values inputs are not [batch, kv_heads, past, head_dim] for "
                                f"every layer (found {len(past)} tensors, shape {key.shape})")
        self.kv_heads, self.head_dim = kv_heads, head_dim
        self.dtype = ORT_TYPES.get(key.type, np.float32)
        self.vocab = self.runner.session.get_outputs()[0].shape[-1]
        self.positions = "position_ids" in inputs
        self.embeds = self.first == "inputs_embeds"
        self.first_dtype = ORT_TYPES.get(inputs[self.first].type, np.float32) if self.embeds else np.int64
        self.table = self._table(inputs[self.first], embed_tokens) if self.embeds else None
        if embed_tokens is not None and not self.embeds:
            raise GenerateError(f"{self.name}: takes input_ids; an embedding table is for an inputs_embeds decoder")

    def _table(self, first, table) -> np.ndarray | None:
        if table is None:
            return None
        hidden = first.shape[-1] if len(first.shape) == 3 else None
        table = np.asarray(table)
        if (table.ndim != 2 or not np.issubdtype(table.dtype, np.floating)
                or (isinstance(hidden, int) and table.shape[1] != hidden)
                or (isinstance(self.vocab, int) and table.shape[0] != self.vocab)):
            raise GenerateError(f"{self.name}: the embedding table is {table.dtype} {list(table.shape)}, expected "
                                f"float [vocab {self.vocab}, hidden {hidden}]")
        return table.astype(self.first_dtype, copy=False)

    def feed(self, ids) -> np.ndarray:
        """The first input for token ids [batch, sequence]: the ids, or their rows of the embedding table."""
        ids = np.asarray(ids, np.int64)
        if not self.embeds:
            return ids
        if self.table is None:
            raise GenerateError(f"{self.name}: takes inputs_embeds; generating needs the token embedding table "
                                f"(embed_tokens)")
        return self.table[ids]

    def empty_past(self, batch: int) -> dict:
        shape = (batch, self.kv_heads, 0, self.head_dim)
        return {f"past_key_values.{i}.{k}": np.zeros(shape, self.dtype)
                for i in range(self.num_layers) for k in ("key", "value")}

    def step(self, first, attention_mask, position_ids, past: dict) -> tuple[np.ndarray, dict]:
        """One run on ``first`` (input_ids [batch, sequence], or inputs_embeds [batch, sequence, hidden] for an
        embeds decoder): (logits [batch, sequence, vocab], the next run's past)."""
        out = self.runner.infer({self.first: np.asarray(first, self.first_dtype),
                                 "attention_mask": np.asarray(attention_mask, np.int64),
                                 **({"position_ids": np.asarray(position_ids, np.int64)} if self.positions else {}),
                                 **past})
        present = {n.replace("present.", "past_key_values.", 1): v for n, v in out.items() if n.startswith("present.")}
        return out["logits"], present


def _cache_dims(path, shape) -> tuple:
    """(kv_heads, head_dim) of a past tensor; where the file leaves them symbolic (onnxruntime-genai's builder
    names head_dim "kv_cache_dim"), from the genai_config.json beside it."""
    kv_heads, head_dim = (shape[1], shape[3]) if len(shape) == 4 else (None, None)
    if all(isinstance(d, int) for d in (kv_heads, head_dim)) or path is None:
        return kv_heads, head_dim
    import json
    config = path.parent / "genai_config.json"
    try:
        decoder = json.loads(config.read_text())["model"]["decoder"]
        return int(decoder["num_key_value_heads"]), int(decoder["head_size"])
    except (OSError, ValueError, KeyError, TypeError):
        return kv_heads, head_dim


def _eos_set(eos_token_id) -> set[int]:
    if eos_token_id is None:
        return set()
    return {int(eos_token_id)} if isinstance(eos_token_id, (int, np.integer)) else {int(e) for e in eos_token_id}


def check_sampling(*, max_new_tokens: int, temperature: float, top_k: int, top_p: float) -> None:
    """One line for an out-of-range option (the CLI and the library share the ranges)."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise GenerateError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not (np.isfinite(temperature) and temperature >= 0):
        raise GenerateError(f"temperature must be >= 0 (0: greedy), got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0:
        raise GenerateError(f"top_k must be an integer >= 0 (0: no limit), got {top_k!r}")
    if not (0 < top_p <= 1):
        raise GenerateError(f"top_p must be in (0, 1], got {top_p!r}")


def choose(logits: np.ndarray, *, temperature: float, top_k: int, top_p: float, rng: np.random.Generator) -> int:
    """The next token from one row of logits: argmax at temperature 0, else a sample from the softmax of
    logits / temperature restricted to the top_k most likely and to the smallest set holding top_p."""
    if temperature == 0:
        return int(np.argmax(logits))
    scaled = logits.astype(np.float64) / temperature
    order = np.argsort(-scaled, kind="stable")
    if top_k:
        order = order[:top_k]
    probs = np.exp(scaled[order] - scaled[order[0]])
    probs /= probs.sum()
    if top_p < 1:
        keep = int(np.searchsorted(np.cumsum(probs), top_p)) + 1   # the first token that reaches top_p stays
        order, probs = order[:keep], probs[:keep] / probs[:keep].sum()
    return int(order[rng.choice(len(order), p=probs)])


def generate(session: DecoderSession, prompt_ids: Sequence[int], *, max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
             eos_token_id: int | Sequence[int] | None = None, context_length: int | None = None,
             on_token: Callable[[int], object] | None = None, tokenizer=None,
             prompt_embeds: np.ndarray | None = None) -> Generation:
    """Generate after ``prompt_ids`` (batch 1): prefill, then one token per run with the KV cache.

    Stops at an id of ``eos_token_id`` (included in the result), after ``max_new_tokens``, or when the
    sequence reaches ``context_length``. ``on_token(id)`` is called with each new id as it comes.
    ``tokenizer`` (a tokenizers.Tokenizer) decodes the ids into ``text``. ``prompt_embeds`` [len(prompt_ids),
    hidden] (an embeds decoder only): the prompt's embeddings as prefilled, instead of the table's rows of
    ``prompt_ids`` (a vision-language prompt, image tokens mixed in).
    """
    check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p)
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise GenerateError(f"{session.name}: the prompt has no tokens")
    feed = session.feed([ids]) if prompt_embeds is None else _prompt_embeds(session, prompt_embeds, len(ids))[None]
    if context_length is not None and len(ids) >= context_length:
        raise GenerateError(f"{session.name}: the prompt has {len(ids)} tokens, the context holds {context_length}")
    eos, rng = _eos_set(eos_token_id), np.random.default_rng(seed)
    new: list[int] = []
    start = time.perf_counter()
    past, first_at = session.empty_past(1), None
    stop = "max_new_tokens"
    while len(new) < max_new_tokens:
        total = len(ids) + len(new)
        logits, past = session.step(feed, np.ones((1, total), np.int64),
                                    np.arange(total - feed.shape[1], total)[None], past)
        token = choose(logits[0, -1], temperature=temperature, top_k=top_k, top_p=top_p, rng=rng)
        new.append(token)
        first_at = first_at or time.perf_counter()
        if on_token is not None:
            on_token(token)
        if token in eos:
            stop = "eos"
            break
        if context_length is not None and total + 1 >= context_length:
            stop = "context_length"
            break
        feed = session.feed([[token]])
    decode_s = time.perf_counter() - first_at
    rate = (len(new) - 1) / decode_s if len(new) > 1 and decode_s > 0 else 0.0
    text = tokenizer.decode(new, skip_special_tokens=True) if tokenizer is not None else None
    return Generation(new, text, first_at - start, rate, stop)


def _prompt_embeds(session: DecoderSession, embeds, length: int) -> np.ndarray:
    embeds = np.asarray(embeds)
    if not session.embeds or embeds.ndim != 2 or len(embeds) != length:
        raise GenerateError(f"{session.name}: prompt embeddings {list(embeds.shape)} for {length} prompt ids "
                            f"(expected [{length}, hidden] for an inputs_embeds decoder; it takes {session.first})")
    return embeds.astype(session.first_dtype, copy=False)


def greedy_batch(session: DecoderSession, prompts_ids: Sequence[Sequence[int]], *, max_new_tokens: int,
                 eos_token_id: int | Sequence[int] | None, pad_token_id: int, batch_size: int = 16,
                 prompts_embeds: Sequence[np.ndarray] | None = None) -> list[list[int]]:
    """Greedy new ids of every prompt (the eos id last where it stopped), as ``generate`` gives each alone.

    Prompts are decoded ``batch_size`` at a time, similar lengths together, left-padded with
    ``pad_token_id``: the attention mask hides the pads and position ids count real tokens only, so a
    prompt's tokens do not depend on its neighbours (up to float rounding in a near tie). ``prompts_embeds``
    (an embeds decoder): each prompt's embeddings, as ``generate``'s ``prompt_embeds``.
    """
    check_sampling(max_new_tokens=max_new_tokens, temperature=0.0, top_k=0, top_p=1.0)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise GenerateError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    prompts = [[int(i) for i in p] for p in prompts_ids]
    if any(not p for p in prompts):
        raise GenerateError(f"{session.name}: prompt {next(i for i, p in enumerate(prompts) if not p)} has no tokens")
    if prompts_embeds is not None and len(prompts_embeds) != len(prompts):
        raise GenerateError(f"{session.name}: {len(prompts_embeds)} prompt embeddings for {len(prompts)} prompts")
    embeds = None if prompts_embeds is None else [_prompt_embeds(session, e, len(p))
                                                  for e, p in zip(prompts_embeds, prompts, strict=True)]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    results: list[list[int]] = [[] for _ in prompts]
    for at in range(0, len(order), batch_size):
        chunk = order[at:at + batch_size]
        chunk_embeds = None if embeds is None else [embeds[i] for i in chunk]
        for i, new in zip(chunk, _greedy_padded(session, [prompts[i] for i in chunk], max_new_tokens,
                                                _eos_set(eos_token_id), pad_token_id, chunk_embeds), strict=True):
            results[i] = new
    return results


def _greedy_padded(session: DecoderSession, prompts: list[list[int]], max_new_tokens: int, eos: set[int],
                   pad: int, embeds: list[np.ndarray] | None) -> list[list[int]]:
    width = max(len(p) for p in prompts)
    ids = np.array([[pad] * (width - len(p)) + p for p in prompts], np.int64)
    first = session.feed(ids)
    for row, e in enumerate(embeds or ()):
        first[row, width - len(e):] = e
    mask = (np.arange(width)[None] >= width - np.array([len(p) for p in prompts])[:, None]).astype(np.int64)
    # A pad's position is irrelevant (masked); 0 keeps it a valid index of the rotary table.
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    past, new = session.empty_past(len(prompts)), [[] for _ in prompts]
    done = np.zeros(len(prompts), bool)
    for _ in range(max_new_tokens):
        logits, past = session.step(first, mask, positions, past)
        tokens = np.argmax(logits[:, -1], axis=-1)
        for row, token in enumerate(tokens):
            if not done[row]:
                new[row].append(int(token))
                done[row] = int(token) in eos
        if done.all():
            break
        # A finished row goes on (the batch moves together) on pads; its output is no longer read.
        first = session.feed(np.where(done, pad, tokens)[:, None])
        mask = np.concatenate([mask, np.ones((len(prompts), 1), np.int64)], axis=1)
        positions = positions[:, -1:] + 1
    return new
