"""A VLM bundle's sample and exact-match evaluation: records of images, prompt, answer and kind.

    write_sample("bundle", records, mnist_test_images)      # sample.jsonl + sample/<index>.png
    result = evaluate(VLMSession("bundle"), read_records("bundle/sample.jsonl"), image_size=(28, 28), channels=1)
    print(result.as_dict())                                 # {"n", "matched", "exact_match", "kinds": {...}}

A record in a .jsonl file: {"images": ["sample/7.png", ...] (paths relative to the .jsonl file), "prompt": text
with one ``<image>`` per image, "answer": text, "kind": text (optional)}. Images are read with
edgerun.readers.read_image at the model's size and channels.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from edgerun.errors import brief
from edgerun.generate import exact_match
from edgerun.io import atomic_write
from edgerun.readers import read_image
from edgerun.vlm import SAMPLE, SAMPLE_DIR, VLMError, VLMSession

NO_KIND = "unspecified"


@dataclass(frozen=True)
class VLMRecord:
    images: tuple[Path, ...]
    prompt: str
    answer: str
    kind: str = NO_KIND


@dataclass(frozen=True)
class KindScore:
    n: int
    matched: int

    @property
    def exact_match(self) -> float:
        return round(100.0 * self.matched / self.n, 2) if self.n else 0.0


@dataclass(frozen=True)
class VLMEval:
    """Exact-match overall and per kind; ``answers``: each record's greedy answer, in order."""
    overall: KindScore
    kinds: dict[str, KindScore]
    answers: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {"n": self.overall.n, "matched": self.overall.matched, "exact_match": self.overall.exact_match,
                "kinds": {k: {"n": s.n, "matched": s.matched, "exact_match": s.exact_match}
                          for k, s in sorted(self.kinds.items())}}


def read_records(path) -> list[VLMRecord]:
    """A .jsonl file's records; a bad line is one line naming the file and the line number."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise VLMError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise VLMError(f"{path}: cannot read it ({brief(e)})") from None
    records = [_record(path, n, line) for n, line in enumerate(lines, 1) if line.strip()]
    if not records:
        raise VLMError(f"{path}: no records")
    return records


def _record(path: Path, n: int, line: str) -> VLMRecord:
    try:
        r = json.loads(line)
    except json.JSONDecodeError as e:
        raise VLMError(f"{path}:{n}: not a JSON line ({e.msg})") from None
    ok = (isinstance(r, dict) and isinstance(r.get("prompt"), str) and r["prompt"].strip()
          and isinstance(r.get("answer"), str) and isinstance(r.get("images", []), list)
          and all(isinstance(i, str) and i for i in r.get("images", []))
          and isinstance(r.get("kind", NO_KIND), str))
    if not ok:
        raise VLMError(f"{path}:{n}: expected {{\"images\": [image paths], \"prompt\": non-empty text, "
                       f"\"answer\": text, \"kind\": text}}")
    return VLMRecord(tuple(path.parent / i for i in r.get("images", [])), r["prompt"], r["answer"],
                     r.get("kind", NO_KIND))


def write_sample(folder, records: Sequence[dict], images: np.ndarray) -> Path:
    """``folder/sample.jsonl`` and ``folder/sample/<index>.png`` for records whose "images" are indices into
    ``images`` (uint8 [N, C, H, W], C 1 or 3: the embedded task's MNIST split); each PNG written whole."""
    from PIL import Image

    folder = Path(folder)
    images = np.asarray(images)
    if images.dtype != np.uint8 or images.ndim != 4 or images.shape[1] not in (1, 3):
        raise VLMError(f"sample images: {images.dtype} {list(images.shape)}, expected uint8 [N, 1 or 3, H, W]")
    lines = []
    for n, r in enumerate(records):
        idx = r.get("images", [])
        if not all(isinstance(i, (int, np.integer)) and 0 <= i < len(images) for i in idx):
            raise VLMError(f"sample record {n}: images {idx} are not indices into {len(images)} images")
        for i in idx:
            target = folder / SAMPLE_DIR / f"{int(i)}.png"
            if not target.exists():
                im = images[int(i)]
                pil = Image.fromarray(im[0] if im.shape[0] == 1 else im.transpose(1, 2, 0))
                atomic_write(target, lambda tmp, pil=pil: pil.save(tmp, format="PNG"))
        lines.append(json.dumps({"images": [f"{SAMPLE_DIR}/{int(i)}.png" for i in idx], "prompt": r["prompt"],
                                 "answer": r["answer"], "kind": r.get("kind", NO_KIND)}))
    return atomic_write(folder / SAMPLE, "\n".join(lines) + "\n")


def evaluate(session: VLMSession, records: Sequence[VLMRecord], *, max_new_tokens: int = 16,
             batch_size: int = 16) -> VLMEval:
    """Greedy answers (VLMSession.greedy) scored by edgerun.generate.exact_match, overall and per kind."""
    c = session.config
    items = []
    for n, r in enumerate(records):
        ims = [read_image(p, c.image_size, c.channels) for p in r.images]
        if r.prompt.count(c.image_token) != len(ims):
            raise VLMError(f"record {n + 1}: the prompt has {r.prompt.count(c.image_token)} {c.image_token} "
                           f"for {len(ims)} image(s)")
        items.append((ims, r.prompt))
    answers = [session.decode(t) for t in session.greedy(items, max_new_tokens=max_new_tokens,
                                                         batch_size=batch_size)]
    counts: dict[str, list[int]] = {}
    for r, a in zip(records, answers, strict=True):
        n_hit = counts.setdefault(r.kind, [0, 0])
        n_hit[0] += 1
        n_hit[1] += exact_match(a, r.answer)
    kinds = {k: KindScore(n, hit) for k, (n, hit) in counts.items()}
    return VLMEval(KindScore(len(records), sum(s.matched for s in kinds.values())), kinds, answers)
