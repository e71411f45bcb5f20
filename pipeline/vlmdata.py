"""Image-text data for the VLM (issue 22): the embedded MNIST task, the user's vlm-jsonl, the tokenizer with
``<image>``, and the packing that lets the one training loop (pipeline.train.train) train a VLM.

    train, test = mnist_vlm_task(y_train, y_test, seed=0)          # VLMRecords; images index the MNIST split
    tok = build_vlm_tokenizer(train + test)                        # <pad> <s> </s> <unk> <image> = ids 0..4
    x, y = encode_vlm(tok, train, tokens_per_image=16, max_images=3)   # x: ids then image indices; y: labels

A record is ``{"images": [...], "prompt": "<image> what digit is this ?", "answer": "seven", "kind": "digit"}``
(`VLMRecord`); one ``<image>`` per image, in order. Kinds of the embedded task: ``caption``, ``digit``,
``two_image`` (sum / which is larger / same or not), ``few_shot`` (two solved examples with their images, then
the query) and ``text`` (text only: the same questions with the digits named in words, "what is seven plus two
?", and "what comes after seven ?"). Test records use MNIST test images only, so exact-match on the image kinds
measures images never seen in training. The text kind has no image to hold out and only ~300 facts: its test
records are a fresh draw of the facts training shows — what it measures is whether the VLM still answers what
its decoder learned as text (VILA's text-only benchmarks ask the same of the LLM's pre-training knowledge).

Packing: ``x`` [N, T + max_images] int64 = the token ids (each ``<image>`` expanded to ``tokens_per_image``
image-token ids, LLaVA's layout; right-padded with <pad>) followed by the record's image indices into an image
bank (-1: none); ``y`` [N, T] = labels, IGNORE on <s>, the prompt, the image tokens and padding (the answer and
</s> are trained). pipeline.vlm_train.VLMView unpacks a batch of ``x`` in the model's forward.
"""
from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError
from pipeline.textdata import IGNORE, build_tokenizer, special_ids, words

IMAGE = "<image>"
IMAGE_ID = 4   # after <pad> <s> </s> <unk>
KINDS = ("caption", "digit", "two_image", "few_shot", "text")
DEFAULT_TRAIN = {"caption": 6000, "digit": 6000, "two_image": 12000, "few_shot": 6000, "text": 12000}
DEFAULT_TEST = {"caption": 200, "digit": 300, "two_image": 300, "few_shot": 300, "text": 300}


@dataclass(frozen=True)
class VLMRecord:
    """One sample: ``images`` index an image bank (the MNIST split for the embedded task, the images read
    from the user's files for vlm-jsonl), in the order of the prompt's ``<image>`` placeholders."""
    images: tuple[int, ...]
    prompt: str
    answer: str
    kind: str

    def as_dict(self) -> dict:
        return {**asdict(self), "images": list(self.images)}


@dataclass(frozen=True)
class VLMData:
    """Records and their image banks: uint8 [n, C, H, W] each (normalise them with edgerun.pixels.normalise)."""
    train: list[VLMRecord]
    test: list[VLMRecord]
    train_images: np.ndarray
    test_images: np.ndarray


# ------------------------------------------------------------------------------------------------ embedded
def _counts(n, kinds, name) -> dict[str, int]:
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise PipelineError(f"vlm task: unknown kind {unknown[0]!r}; expected some of {', '.join(KINDS)}")
    counts = {k: n for k in kinds} if isinstance(n, int) else {k: n.get(k, 0) for k in kinds}
    if not isinstance(n, int) and set(n) - set(kinds):
        raise PipelineError(f"vlm task: {name} counts kinds {sorted(set(n) - set(kinds))} not in kinds")
    bad = {k: c for k, c in counts.items() if not isinstance(c, int) or c < 0}
    if bad:
        raise PipelineError(f"vlm task: {name} counts must be integers >= 0, got {bad}")
    return counts


def _two_image(rng, pick) -> VLMRecord:
    q = rng.choice(("sum", "larger", "same"))
    a = rng.randrange(10)
    if q == "same":   # half the pairs the same digit, so "yes"/"no" is not guessable from the prior
        b = a if rng.random() < 0.5 else rng.choice([d for d in range(10) if d != a])
        prompt, answer = f"{IMAGE} {IMAGE} are they the same ?", "yes" if a == b else "no"
    elif q == "larger":
        b = rng.choice([d for d in range(10) if d != a])
        prompt, answer = f"{IMAGE} {IMAGE} which is larger ?", words(max(a, b))
    else:
        b = rng.randrange(10)
        prompt, answer = f"{IMAGE} {IMAGE} what is the sum ?", words(a + b)
    return VLMRecord((pick(a), pick(b)), prompt, answer, "two_image")


def _few_shot(rng, pick) -> VLMRecord:
    # Two examples of other digits name the format; the query's digit is only in its image. Always "is a"
    # (never "an"): the article would give "eight"/"eleven" away without the image.
    d1, d2 = rng.sample(range(10), 2)
    q = rng.randrange(10)
    prompt = f"{IMAGE} is a {words(d1)} . {IMAGE} is a {words(d2)} . {IMAGE} is a"
    return VLMRecord((pick(d1), pick(d2), pick(q)), prompt, words(q), "few_shot")


def _text(rng) -> VLMRecord:
    q = rng.choice(("sum", "larger", "same", "after"))
    a = rng.randrange(10)
    if q == "same":   # half the pairs the same digit, as in the two-image questions
        b = a if rng.random() < 0.5 else rng.choice([d for d in range(10) if d != a])
        prompt, answer = f"are {words(a)} and {words(b)} the same ?", "yes" if a == b else "no"
    elif q == "larger":
        b = rng.choice([d for d in range(10) if d != a])
        prompt, answer = f"which is larger , {words(a)} or {words(b)} ?", words(max(a, b))
    elif q == "after":
        prompt, answer = f"what comes after {words(a)} ?", words(a + 1)
    else:
        b = rng.randrange(10)
        prompt, answer = f"what is {words(a)} plus {words(b)} ?", words(a + b)
    return VLMRecord((), prompt, answer, "text")


def _image_records(kind: str, n: int, labels: np.ndarray, rng: random.Random) -> list[VLMRecord]:
    by_digit = [np.flatnonzero(labels == d) for d in range(10)]
    if any(len(p) == 0 for p in by_digit):
        raise PipelineError(f"vlm task: the labels lack digit(s) {[d for d in range(10) if not len(by_digit[d])]}")

    def pick(d: int) -> int:
        return int(by_digit[d][rng.randrange(len(by_digit[d]))])

    out = []
    for _ in range(n):
        if kind == "caption":
            d = rng.randrange(10)
            prompt = IMAGE if rng.random() < 0.5 else f"describe the image {IMAGE}"
            out.append(VLMRecord((pick(d),), prompt, f"a handwritten {words(d)}", "caption"))
        elif kind == "digit":
            d = rng.randrange(10)
            out.append(VLMRecord((pick(d),), f"{IMAGE} what digit is this ?", words(d), "digit"))
        elif kind == "two_image":
            out.append(_two_image(rng, pick))
        else:
            out.append(_few_shot(rng, pick))
    return out


def mnist_vlm_task(train_labels: np.ndarray, test_labels: np.ndarray, *, seed: int = 0,
                   n_train: int | dict | None = None, n_test: int | dict | None = None,
                   kinds: tuple[str, ...] = KINDS) -> tuple[list[VLMRecord], list[VLMRecord]]:
    """(train, test) records, the same for the same arguments. ``n_train``/``n_test``: records per kind
    (an int for every kind, or {kind: count}; default DEFAULT_TRAIN / DEFAULT_TEST). Train records index
    ``train_labels`` (the MNIST train split), test records ``test_labels`` (the test split). Each kind has its
    own random stream: the count of one kind does not change the records of another."""
    kinds = tuple(kinds)
    n_train = _counts({k: DEFAULT_TRAIN[k] for k in kinds if k in DEFAULT_TRAIN} if n_train is None else n_train,
                      kinds, "n_train")
    n_test = _counts({k: DEFAULT_TEST[k] for k in kinds if k in DEFAULT_TEST} if n_test is None else n_test,
                     kinds, "n_test")
    train, test = [], []
    for kind in kinds:
        if kind == "text":
            rng_train, rng_test = random.Random(f"{seed}:train:text"), random.Random(f"{seed}:test:text")
            train += [_text(rng_train) for _ in range(n_train[kind])]
            test += [_text(rng_test) for _ in range(n_test[kind])]
            continue
        train += _image_records(kind, n_train[kind], np.asarray(train_labels), random.Random(f"{seed}:train:{kind}"))
        test += _image_records(kind, n_test[kind], np.asarray(test_labels), random.Random(f"{seed}:test:{kind}"))
    return train, test


# --------------------------------------------------------------------------------------------- user's jsonl
def _check_record(rec, where: str) -> None:
    if not isinstance(rec, dict):
        raise PipelineError(f"{where}: a JSON {type(rec).__name__}, expected an object with \"images\", "
                            f"\"prompt\" and \"answer\"")
    missing = [k for k in ("images", "prompt", "answer") if k not in rec]
    if missing:
        raise PipelineError(f"{where}: no {', '.join(repr(k) for k in missing)}; a record is "
                            f'{{"images": [paths], "prompt": "... {IMAGE} ...", "answer": "...", "kind": "..."}}')
    extra = sorted(set(rec) - {"images", "prompt", "answer", "kind"})
    if extra:
        raise PipelineError(f"{where}: unknown key {extra[0]!r}; expected images, prompt, answer and kind")
    if not isinstance(rec["images"], list) or not all(isinstance(p, str) and p for p in rec["images"]):
        raise PipelineError(f"{where}: \"images\" must be a list of image paths, got {rec['images']!r}"[:300])
    for key in ("prompt", "answer"):
        if not (isinstance(rec[key], str) and rec[key].strip()):
            raise PipelineError(f"{where}: \"{key}\" must be a non-empty string, got {rec[key]!r}"[:300])
    if "kind" in rec and not isinstance(rec["kind"], str):
        raise PipelineError(f"{where}: \"kind\" must be a string, got {rec['kind']!r}"[:300])
    n = rec["prompt"].split().count(IMAGE)
    if n != len(rec["images"]) or rec["prompt"].count(IMAGE) != n:
        raise PipelineError(f"{where}: the prompt has {rec['prompt'].count(IMAGE)} {IMAGE} placeholders "
                            f"(each a word of its own) for {len(rec['images'])} images")


def _read_file(path: Path, bank: dict, size, channels) -> list[VLMRecord]:
    """One jsonl file's records, their images read into ``bank`` (resolved path -> index, first seen first)."""
    from edgerun.readers import EdgeError, read_image
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PipelineError(f"{path}: cannot read as UTF-8 text ({getattr(e, 'strerror', None) or e})") from None
    out = []
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{i}"
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            raise PipelineError(f"{where}: not JSON ({e.msg}); expected one object per line") from None
        _check_record(rec, where)
        idx = []
        for rel in rec["images"]:
            img = (path.parent / rel).resolve()
            if img not in bank["index"]:
                if not img.is_file():
                    raise PipelineError(f"{where}: image {rel!r} not found (looked for {img})")
                try:
                    bank["pixels"].append(read_image(img, size, channels))
                except EdgeError as e:
                    raise PipelineError(f"{where}: {e}") from None
                bank["index"][img] = len(bank["pixels"]) - 1
            idx.append(bank["index"][img])
        out.append(VLMRecord(tuple(idx), rec["prompt"], rec["answer"], rec.get("kind", "user")))
    if not out:
        raise PipelineError(f"{path}: no records; expected one JSON object per line")
    return out


def _held_out(key: str, fraction: float) -> bool:
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64 < fraction


def _subset(records: list[VLMRecord], pixels: list, shape) -> tuple[list[VLMRecord], np.ndarray]:
    """The records re-indexed into a bank of only their images (train and test banks stay disjoint)."""
    used = sorted({i for r in records for i in r.images})
    new = {old: j for j, old in enumerate(used)}
    bank = np.stack([pixels[i] for i in used]) if used else np.zeros((0, *shape), np.uint8)
    return [VLMRecord(tuple(new[i] for i in r.images), r.prompt, r.answer, r.kind) for r in records], bank


def read_vlm_jsonl(path: str | Path, *, size: tuple[int, int] = (28, 28), channels: int = 1,
                   test_fraction: float = 0.1) -> VLMData:
    """The user's image-text data (``data.kind = "vlm-jsonl"``): a folder with train.jsonl and test.jsonl, or
    one .jsonl file split by a hash of each record's prompt and image paths (the same record lands in the
    same split whatever the file's order). Image paths are relative to their jsonl file; images are read with
    edgerun.readers.read_image at ``size`` (H, W) and ``channels``. Every bad record is one PipelineError
    naming file:line."""
    p = Path(path)
    bank = {"index": {}, "pixels": []}
    shape = (channels, *size)
    if p.is_dir():
        missing = [n for n in ("train.jsonl", "test.jsonl") if not (p / n).is_file()]
        if missing:
            raise PipelineError(f"{p}: no {' or '.join(missing)}; a vlm data folder holds train.jsonl and "
                                f"test.jsonl (or give one .jsonl file to split)")
        train, test = (_read_file(p / n, bank, size, channels) for n in ("train.jsonl", "test.jsonl"))
    elif p.is_file():
        records = _read_file(p, bank, size, channels)
        paths = {v: str(k) for k, v in bank["index"].items()}
        key = [_held_out(r.prompt + "\0" + "\0".join(paths[i] for i in r.images), test_fraction) for r in records]
        test = [r for r, k in zip(records, key, strict=True) if k]
        train = [r for r, k in zip(records, key, strict=True) if not k]
        if not train or not test:
            raise PipelineError(f"{p}: {len(records)} records leave an empty {'train' if not train else 'test'} "
                                f"split; give more records or a folder with train.jsonl and test.jsonl")
    else:
        raise PipelineError(f"{p}: no such file or folder; expected a .jsonl file or a folder with train.jsonl "
                            f"and test.jsonl")
    train, train_images = _subset(train, bank["pixels"], shape)
    test, test_images = _subset(test, bank["pixels"], shape)
    return VLMData(train, test, train_images, test_images)


# -------------------------------------------------------------------------------------- tokenizer, packing
def build_vlm_tokenizer(records: list[VLMRecord], kind: str = "word"):
    """textdata.build_tokenizer on the records' prompts and answers, with ``<image>`` the special id 4."""
    # <image> left out of the trained text: seen there too, the trainer leaves a hole at id 4 (tokenizers 0.2x)
    texts = [" ".join(w for w in (r.prompt + " " + r.answer).split() if w != IMAGE) for r in records]
    tok = build_tokenizer(texts, kind=kind, extra_specials=(IMAGE,))
    if tok.token_to_id(IMAGE) != IMAGE_ID:
        raise PipelineError(f"tokenizer: {IMAGE} got id {tok.token_to_id(IMAGE)}, expected {IMAGE_ID}")
    return tok


def prompt_ids(tok, record: VLMRecord, tokens_per_image: int) -> list[int]:
    """<s> and the prompt's ids, each <image> expanded to ``tokens_per_image`` image-token ids."""
    sp, image_id = special_ids(tok), image_token_id(tok)
    ids = [sp["bos"]]
    for t in tok.encode(record.prompt, add_special_tokens=False).ids:
        ids += [image_id] * tokens_per_image if t == image_id else [t]
    return ids


def image_token_id(tok) -> int:
    """The tokenizer's id of ``<image>`` (IMAGE_ID for the embedded tokenizer; a decoder folder's own elsewhere)."""
    image_id = tok.token_to_id(IMAGE)
    if image_id is None:
        raise PipelineError(f"tokenizer: no {IMAGE} token")
    return image_id


def encode_vlm(tok, records: list[VLMRecord], tokens_per_image: int, max_images: int,
               max_len: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(x [N, T + max_images], y [N, T]) int64, the layout in the module docstring. T is the longest
    sequence; ``max_len`` refuses longer ones (a cut would drop image tokens or the answer)."""
    sp, image_id = special_ids(tok), image_token_id(tok)
    rows = []
    for r in records:
        if len(r.images) > max_images:
            raise PipelineError(f"vlm data: a {r.kind} record has {len(r.images)} images, more than "
                                f"max_images {max_images}")
        prompt = prompt_ids(tok, r, tokens_per_image)
        placed = prompt.count(image_id)
        if placed != len(r.images) * tokens_per_image:
            raise PipelineError(f"vlm data: {r.prompt!r} has {placed // tokens_per_image} {IMAGE} for "
                                f"{len(r.images)} images")
        answer = tok.encode(r.answer, add_special_tokens=False).ids + [sp["eos"]]
        rows.append((prompt + answer, [IGNORE] * len(prompt) + answer, r.images))
    width = max(len(ids) for ids, _, _ in rows)
    if max_len is not None and width > max_len:
        raise PipelineError(f"vlm data: a sequence of {width} tokens is longer than max_len {max_len}")
    x = np.full((len(rows), width + max_images), sp["pad"], np.int64)
    x[:, width:] = -1
    y = np.full((len(rows), width), IGNORE, np.int64)
    for i, (ids, lab, imgs) in enumerate(rows):
        x[i, :len(ids)] = ids
        y[i, :len(lab)] = lab
        x[i, width:width + len(imgs)] = imgs
    return x, y
