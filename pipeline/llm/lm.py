"""The decoder's workload and its measurements: the text data a run reads, the model folder every stage hands on,
and the task's figures of a torch model or an ONNX file (exact-match of greedy answers, next-token agreement with
the unpruned model, perplexity on the answers).

Every figure of an ONNX file is measured with the runtime's own generation loop (edgerun.generate), the one the
bundle ships, so the gates judge what the device will run.
"""
from __future__ import annotations

import hashlib
import json
from functools import cached_property
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

MODEL_DIR = "model"              # a stage's Hugging Face folder (config.json, model.safetensors, tokenizer.json)
TEST_NEXT = "test_next.npy"      # the unpruned model's teacher-forced next tokens on the test rows


class TextData:
    """The run's prompts and answers, read once per process and only when a stage reads them."""

    def __init__(self, cfg):
        self.cfg = cfg

    @cached_property
    def _splits(self) -> tuple[list[dict], list[dict]]:
        from pipeline.data import resolve_root
        from pipeline.textdata import number_task, read_jsonl
        d = self.cfg.data
        if d.kind == "text-task":
            train, test = number_task(seed=self.cfg.run.seed, n_train=d.train_subset or 20000,
                                      n_test=d.test_subset or 600)
        else:
            train, test = read_jsonl(resolve_root(d.root))
            train, test = train[:d.train_subset or None], test[:d.test_subset or None]
        return train, test

    @property
    def train(self) -> list[dict]:
        return self._splits[0]

    @property
    def test(self) -> list[dict]:
        n = self.cfg.decoder.eval_prompts
        return self._splits[1][:n or None]

    @property
    def has_answers(self) -> bool:
        return all("answer" in r for r in self.train + self.test)

    def identity(self) -> str:
        """What the run's prompts are, by content: the embedded task's generated records themselves (a change to
        the generator is a new identity, with no version to remember to bump), a jsonl's files."""
        from edgerun.io import sha256_file
        from pipeline.data import resolve_root
        d, h = self.cfg.data, hashlib.sha256()
        if d.kind == "text-task":
            h.update(json.dumps(self._splits, sort_keys=True).encode())
            return h.hexdigest()
        root = resolve_root(d.root)
        files = [root] if root.is_file() else sorted(p for p in root.glob("*.jsonl") if p.is_file())
        if not files:
            raise PipelineError(f"data.root: {root} is not a .jsonl file nor a folder holding train.jsonl and "
                                "test.jsonl")
        for p in files:
            h.update(f"{p.name}\0{sha256_file(p)}\n".encode())
        return h.hexdigest()


# ---------------------------------------------------------------- the model folder every stage hands on

def _quiet() -> None:
    """transformers' per-file progress bars would interleave with the stage's own progress lines."""
    from transformers.utils import logging
    logging.disable_progress_bar()


def load_model(folder: Path):
    """(model, tokenizer) of a stage's model folder."""
    from pipeline.models.decoder import load_pretrained
    _quiet()
    return load_pretrained(folder)


def save_model(model, tok, folder: Path) -> Path:
    from pipeline.models.decoder import save_decoder
    _quiet()
    return save_decoder(model, tok, folder)


def widths_of(config) -> dict:
    """The widths a pruner changes and the device's kernels constrain, as Hugging Face config keys (what
    edgerun.llm_preflight.check_decoder_shapes reads); KV heads and head size derived where a family leaves them
    implicit (Phi-3: hidden / heads)."""
    heads = config.num_attention_heads
    return {"hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
            "num_attention_heads": heads, "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
            "num_hidden_layers": config.num_hidden_layers}


def weight_bytes(model) -> int:
    from pipeline.models.decoder import weight_bytes as wb
    return wb(model)


def specials(tok) -> dict:
    from pipeline.textdata import special_ids
    return special_ids(tok)


def token_rows(tok, records: list[dict]):
    """(input_ids, labels) as int64 arrays [N, T], right-padded: what the trainer and teacher forcing read."""
    from pipeline.textdata import encode
    batch = encode(tok, records)
    return batch["input_ids"].numpy(), batch["labels"].numpy()


def prompt_ids(tok, records: list[dict]) -> list[list[int]]:
    """<s> + prompt, as the runtime's generate encodes a prompt."""
    bos = specials(tok)["bos"]
    return [[bos, *tok.encode(r["prompt"], add_special_tokens=False).ids] for r in records]


# ---------------------------------------------------------------- measurements

def next_tokens(logits: np.ndarray) -> np.ndarray:
    """Greedy next token per position, [N, T - 1] (position t predicts token t + 1)."""
    return logits[:, :-1].argmax(-1).astype(np.int32)


def _agreement(next_ids: np.ndarray, teacher_next: np.ndarray, labels: np.ndarray) -> float:
    from pipeline.textdata import IGNORE
    keep = labels[:, 1:] != IGNORE
    return round(100.0 * float((next_ids[keep] == teacher_next[keep]).mean()), 4) if keep.any() else 0.0


def _perplexity(logits: np.ndarray, labels: np.ndarray) -> float:
    import torch

    from pipeline.lm_loss import perplexity
    return round(perplexity(torch.from_numpy(logits), torch.from_numpy(labels)), 4)


def _exact_match(answers: list[str], records: list[dict], reference: list[str] | None) -> float:
    from pipeline.lm_loss import exact_match_percent
    wanted = [r["answer"] for r in records] if reference is None else reference
    return round(exact_match_percent(answers, wanted), 4)


def torch_logits(model, input_ids: np.ndarray, batch_size: int = 64) -> np.ndarray:
    import torch
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(input_ids), batch_size):
            out.append(model(torch.from_numpy(input_ids[i:i + batch_size])).logits.float().numpy())
    return np.concatenate(out)


def onnx_logits(path: Path, input_ids: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """Teacher-forced logits of a decoder file: the whole rows at once, nothing cached (right padding needs no
    mask beyond causality: a pad only follows what it could change)."""
    from edgerun.generate import DecoderSession
    session = DecoderSession(path)
    out = []
    for i in range(0, len(input_ids), batch_size):
        ids = input_ids[i:i + batch_size]
        b, t = ids.shape
        logits, _ = session.step(ids, np.ones((b, t), np.int64), np.broadcast_to(np.arange(t), (b, t)),
                                 session.empty_past(b))
        out.append(logits)
    return np.concatenate(out)


def torch_answers(model, tok, records: list[dict], max_new_tokens: int) -> list[str]:
    from pipeline.lm_loss import generate_answers
    return generate_answers(model, tok, [r["prompt"] for r in records], max_new_tokens=max_new_tokens)


def onnx_answers(path: Path, tok, records: list[dict], max_new_tokens: int) -> list[str]:
    """Greedy answers of a decoder file with the runtime's own loop (the bundle's generate)."""
    from edgerun.generate import DecoderSession, greedy_batch
    sp = specials(tok)
    session = DecoderSession(path)
    new = greedy_batch(session, prompt_ids(tok, records), max_new_tokens=max_new_tokens,
                       eos_token_id=sp["eos_ids"], pad_token_id=sp["pad"])
    return [tok.decode([i for i in ids if i not in sp["eos_ids"]], skip_special_tokens=True) for ids in new]


def score_onnx(path: Path, tok, records: list[dict], max_new_tokens: int, teacher_next: np.ndarray,
               reference_answers: list[str] | None) -> tuple[dict, list[str]]:
    """(figures, greedy answers) of a decoder file on ``records``, with the runtime's generation loop."""
    ids, labels = token_rows(tok, records)
    answers = onnx_answers(path, tok, records, max_new_tokens)
    return measure(onnx_logits(path, ids), answers, records, labels, teacher_next, reference_answers), answers


def measure(logits: np.ndarray, answers: list[str], records: list[dict], labels: np.ndarray,
            teacher_next: np.ndarray, reference_answers: list[str] | None) -> dict:
    """The task's figures (GenerateMetrics fields) from a model's teacher-forced logits and greedy answers."""
    from pipeline.tasks.generate import GenerateMetrics
    return GenerateMetrics(exact_match=_exact_match(answers, records, reference_answers),
                           next_token_agreement=_agreement(next_tokens(logits), teacher_next, labels),
                           perplexity=_perplexity(logits, labels), prompts=len(records)).to_json()
