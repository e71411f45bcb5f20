"""Text data for the decoder workload: a synthetic task with checkable answers, the user's jsonl, the tokenizer
and the encoding training reads.

    train, test = number_task(seed=0)                    # [{"prompt": ..., "answer": ...}, ...]
    train, test = read_jsonl("my_data/")                 # or one file, split by a hash of the prompt
    tok = build_tokenizer([r["prompt"] + " " + r["answer"] for r in train])
    batch = encode(tok, train[:32])                      # input_ids, attention_mask, labels (prompt masked)

The synthetic task is arithmetic and number facts in English words over 0..99 ("what is forty nine plus
two ?" -> "fifty one", "the number before fifty is" -> "forty nine", "which is larger , twelve or
twenty ?" -> "twenty"). Its test facts are held out by operands, not only by wording: no test prompt's
numbers appear in training in any template, so exact-match measures carries, borrows and comparisons the
model has learned, not facts it memorised; a model pruned too far loses them first.
"""
from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path

from edgerun.io import atomic_write
from pipeline.errors import PipelineError

BOS, EOS, PAD, UNK = "<s>", "</s>", "<pad>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)   # ids 0..3 in this order
IGNORE = -100                     # torch cross-entropy's ignore_index: positions the loss skips

_UNITS = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen "
          "sixteen seventeen eighteen nineteen").split()
_TENS = "twenty thirty forty fifty sixty seventy eighty ninety".split()


def words(n: int) -> str:
    """0..99 in English words: 42 -> 'forty two'."""
    if not 0 <= n <= 99:
        raise ValueError(f"{n} is outside 0..99")
    if n < 20:
        return _UNITS[n]
    return _TENS[n // 10 - 2] + ("" if n % 10 == 0 else " " + _UNITS[n % 10])


# skill -> (templates, facts as operand tuples, answer of a fact). A tenth of each skill's facts is held out,
# which still leaves the pattern to learn: adding a small number is the carry (forty nine plus two -> fifty
# one), subtracting one the borrow, after/before their special case, larger/smaller a comparison of tens
# then units. The addend stops at three: with one-digit addends (a 10x10 table) exact-match stayed near
# chance in the measured runs (benchmarks/lm_recipe.md).
_SKILLS = {
    "plus": (("what is {a} plus {b} ?", "{a} plus {b} equals"),
             [(a, b) for a in range(100) for b in range(1, 4) if a + b <= 99], lambda a, b: a + b),
    "minus": (("what is {a} minus {b} ?", "{a} minus {b} equals"),
              [(a, b) for a in range(100) for b in range(1, 4) if b <= a], lambda a, b: a - b),
    "after": (("the number after {a} is", "what comes after {a} ?"), [(a,) for a in range(99)], lambda a: a + 1),
    "before": (("the number before {a} is", "what comes before {a} ?"), [(a,) for a in range(1, 100)],
               lambda a: a - 1),
    "larger": (("which is larger , {a} or {b} ?",),
               [(a, b) for a in range(100) for b in range(100) if a != b], max),
    "smaller": (("which is smaller , {a} or {b} ?",),
                [(a, b) for a in range(100) for b in range(100) if a != b], min),
}
SKILLS = tuple(_SKILLS)


def skill_of(prompt: str) -> str | None:
    """The synthetic task's skill a prompt asks for (None for other text): for per-skill scores."""
    return next((s for s in SKILLS if s in prompt.split()), None)


def _held_out(key: str, seed: int, fraction: float) -> bool:
    """A fixed pseudo-random choice per key: the same on every machine and Python (no hash())."""
    digest = hashlib.sha256(f"{seed}\0{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def _record(skill: str, fact: tuple, rng: random.Random) -> dict:
    templates, _, answer = _SKILLS[skill]
    names = dict(zip("ab"[:len(fact)], (words(x) for x in fact), strict=True))
    return {"prompt": rng.choice(templates).format(**names), "answer": words(answer(*fact))}


def number_task(seed: int = 0, n_train: int = 20000, n_test: int = 600, test_fraction: float = 0.1):
    """(train, test) records of the synthetic number task, the same for the same arguments.

    Skills are drawn equally often (not by how many facts each has). A fact (skill and operands) is in the
    test split with probability ``test_fraction``, chosen by a hash with the seed, so train and test
    share no fact and therefore no prompt; test records are distinct prompts."""
    rng = random.Random(seed)
    pools = {s: ([], []) for s in SKILLS}
    for skill, (_, facts, _) in _SKILLS.items():
        for fact in facts:
            pools[skill][_held_out(f"{skill}{fact}", seed, test_fraction)].append(fact)
    train = [_record(s, rng.choice(pools[s][0]), rng) for s in (rng.choice(SKILLS) for _ in range(n_train))]
    rng = random.Random(f"{seed}:test")   # its own stream: the test set does not depend on n_train
    test, seen = [], set()
    for _ in range(50 * n_test):   # distinct prompts; small pools (after/before) run dry, so bounded tries
        if len(test) == n_test:
            break
        skill = SKILLS[len(test) % len(SKILLS)] if rng.random() < 0.5 else rng.choice(SKILLS)
        r = _record(skill, rng.choice(pools[skill][1]), rng)
        if r["prompt"] not in seen:
            seen.add(r["prompt"])
            test.append(r)
    return train, test


# --------------------------------------------------------------------------------------------- user's jsonl
def _read_records(path: Path) -> list[dict]:
    """One jsonl file's records; every bad line is one PipelineError naming file:line."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path}: cannot read as UTF-8 text ({getattr(e, 'strerror', None) or e})") from None
    out, has_answer = [], None
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise PipelineError(f"{where}: not JSON ({e.msg}); expected one object per line like "
                                f'{{"prompt": "...", "answer": "..."}}') from None
        if not isinstance(rec, dict):
            raise PipelineError(f"{where}: a JSON {type(rec).__name__}, expected an object with a \"prompt\"")
        extra = sorted(set(rec) - {"prompt", "answer"})
        if extra:
            raise PipelineError(f"{where}: unknown key {extra[0]!r}; expected \"prompt\" and optionally \"answer\"")
        for key in ("prompt", "answer"):
            if key in rec and not (isinstance(rec[key], str) and rec[key].strip()):
                raise PipelineError(f"{where}: \"{key}\" must be a non-empty string, got {rec[key]!r}")
        if "prompt" not in rec:
            raise PipelineError(f"{where}: no \"prompt\"; expected {{\"prompt\": str, \"answer\": str}}")
        if has_answer is None:
            has_answer = "answer" in rec
        elif has_answer != ("answer" in rec):
            raise PipelineError(f"{where}: {'no' if has_answer else 'an'} \"answer\" where the earlier lines "
                                f"{'have' if has_answer else 'have none'}: give all records an answer or none")
        out.append(rec)
    if not out:
        raise PipelineError(f"{path}: no records; expected one JSON object per line")
    return out


def read_jsonl(path: str | Path, test_fraction: float = 0.1) -> tuple[list[dict], list[dict]]:
    """(train, test) records from a folder with train.jsonl and test.jsonl, or from one .jsonl file split
    by a hash of each prompt (the same prompt always lands in the same split, whatever the file's order)."""
    p = Path(path)
    if p.is_dir():
        missing = [n for n in ("train.jsonl", "test.jsonl") if not (p / n).is_file()]
        if missing:
            raise PipelineError(f"{p}: no {' or '.join(missing)}; a text data folder holds train.jsonl and "
                                f"test.jsonl (or give one .jsonl file to split)")
        train, test = _read_records(p / "train.jsonl"), _read_records(p / "test.jsonl")
        if ("answer" in train[0]) != ("answer" in test[0]):
            raise PipelineError(f"{p}: train.jsonl and test.jsonl must both have answers or both have none")
        return train, test
    if not p.is_file():
        raise PipelineError(f"{p}: no such file or folder; expected a .jsonl file or a folder with train.jsonl "
                            f"and test.jsonl")
    records = _read_records(p)
    test = [r for r in records if _held_out(r["prompt"], 0, test_fraction)]
    train = [r for r in records if not _held_out(r["prompt"], 0, test_fraction)]
    if not train or not test:
        raise PipelineError(f"{p}: {len(records)} records leave an empty {'train' if not train else 'test'} split; "
                            f"give more records or a folder with train.jsonl and test.jsonl")
    return train, test


# ---------------------------------------------------------------------------------------------- tokenizer
def build_tokenizer(texts, kind: str = "word", vocab_size: int = 4000, extra_specials: tuple[str, ...] = ()):
    """A ``tokenizers.Tokenizer`` trained on ``texts`` with the specials <pad> <s> </s> <unk> (ids 0..3).

    ``word`` (the default): one token per whitespace-separated word. The synthetic task is a closed
    vocabulary in which every number word is one token, so sequences stay short (training is cheaper on
    the CPU) and an answer is a few tokens the model gets right or wrong. ``bpe``: byte-level BPE of at most
    ``vocab_size`` tokens, for user text whose test words may not occur in training (no <unk>).
    ``extra_specials`` take the ids after the four (a VLM's ``<image>`` is id 4) and are never split."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    if kind == "word":
        tok = Tokenizer(models.WordLevel(unk_token=UNK))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.WordLevelTrainer(special_tokens=[*SPECIALS, *extra_specials])
    elif kind == "bpe":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[*SPECIALS, *extra_specials],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        raise PipelineError(f"tokenizer kind {kind!r}: expected 'word' or 'bpe'")
    tok.train_from_iterator(list(texts), trainer)
    return tok


def save_tokenizer(tok, path: str | Path) -> Path:
    """``tokenizer.json`` written whole or not at all."""
    return atomic_write(path, tok.to_str())


# A tokenizer loaded from a Hugging Face folder carries its folder's ids under this attribute (attach_special_ids):
# a real tokenizer.json has no <pad> <s> </s> (Llama 3's <|begin_of_text|>, Qwen's <|endoftext|> <|im_end|>,
# Gemma's <bos> <eos>), and which of its specials ends an answer is the model's config, not the tokenizer's.
CARRIED = "edgepipe_special_ids"


def special_ids(tok) -> dict:
    """{'pad', 'bos', 'eos', 'unk', 'eos_ids'} of a tokenizer: the ids its folder's config gave it (carried, see
    folder_special_ids), else those of <pad> <s> </s> <unk> (a tokenizer built here). ``eos`` ends an answer in
    training; generation stops at any of ``eos_ids`` (a chat model's end-of-turn and end-of-text)."""
    carried = getattr(tok, CARRIED, None)
    if carried is not None:
        return {**carried, "eos_ids": list(carried["eos_ids"])}
    ids = {name: tok.token_to_id(t) for name, t in zip(("pad", "bos", "eos", "unk"), SPECIALS, strict=True)}
    missing = [SPECIALS[i] for i, v in enumerate(ids.values()) if v is None]
    if missing:
        raise PipelineError(f"tokenizer: no {', '.join(missing)} token; the decoder workload needs "
                            f"{', '.join(SPECIALS)}")
    return {**ids, "eos_ids": [ids["eos"]]}


def folder_special_ids(folder: str | Path, tok) -> dict:
    """special_ids of a Hugging Face folder's tokenizer, from its config.json (bos_token_id, eos_token_id -- one id
    or a list --, pad_token_id) and generation_config.json where config.json leaves one out; pad falls back to the
    (first) eos, as Hugging Face does. The first eos of config.json ends an answer in training; generation stops at
    every eos either file lists."""
    folder = Path(folder)
    try:
        files = [json.loads((folder / n).read_text()) for n in ("config.json", "generation_config.json")
                 if (folder / n).is_file()]
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise PipelineError(f"model: {folder}: config.json or generation_config.json is not readable JSON "
                            f"({' '.join(str(e).split())[:200]})") from None
    if not all(isinstance(f, dict) for f in files):
        raise PipelineError(f"model: {folder}: config.json or generation_config.json is not a JSON object")
    size = tok.get_vocab_size(with_added_tokens=True)

    def ids(key: str) -> list[int]:
        out = []
        for f in files:
            value = f.get(key)
            for v in value if isinstance(value, list) else [] if value is None else [value]:
                if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v < size:
                    raise PipelineError(f"model: {folder}: {key} = {value!r} is not a token id of its tokenizer.json "
                                        f"(0..{size - 1})")
                out += [] if v in out else [v]
        return out
    eos, bos, pad = ids("eos_token_id"), ids("bos_token_id"), ids("pad_token_id")
    if not eos:
        raise PipelineError(f"model: {folder}: neither config.json nor generation_config.json gives an "
                            "eos_token_id; the decoder needs the token that ends an answer")
    if not bos:
        raise PipelineError(f"model: {folder}: neither config.json nor generation_config.json gives a "
                            "bos_token_id; the pipeline starts every prompt with it")
    return {"pad": (pad or eos)[0], "bos": bos[0], "eos": eos[0], "unk": tok.token_to_id(UNK), "eos_ids": eos}


def attach_special_ids(tok, ids: dict):
    """``tok`` carrying ``ids`` (folder_special_ids): what special_ids returns for it from now on, wherever it goes."""
    setattr(tok, CARRIED, dict(ids))
    return tok


def _ids(tok, text: str) -> list[int]:
    return tok.encode(text, add_special_tokens=False).ids


def encode(tok, records: list[dict], *, train_prompt: bool = False, max_len: int | None = None):
    """A training batch: {'input_ids', 'attention_mask', 'labels'} as int64 tensors, right-padded.

    input_ids = <s> prompt answer </s>; labels are the input_ids with the prompt (and <s>, and padding) set
    to IGNORE, so the loss is on the answer and </s> only, unless ``train_prompt``. ``max_len`` cuts
    sequences from the left of the prompt (the answer is what must survive)."""
    import torch
    sp = special_ids(tok)
    rows = []
    for r in records:
        prompt, answer = _ids(tok, r["prompt"]), _ids(tok, r.get("answer", "")) + [sp["eos"]]
        if max_len is not None:
            prompt = prompt[max(0, len(prompt) + len(answer) + 1 - max_len):]
        ids = [sp["bos"]] + prompt + answer
        labels = ids[:] if train_prompt else [IGNORE] * (1 + len(prompt)) + answer
        rows.append((ids, labels))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((len(rows), width), sp["pad"], dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, lab) in enumerate(rows):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    if train_prompt:
        labels[:, 0] = IGNORE   # <s> is given, never predicted (the shift drops it anyway)
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
