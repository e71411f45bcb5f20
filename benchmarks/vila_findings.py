"""VILA's findings, part (a) of `make bench-vila`, at MNIST scale (issue 22).

    python -m benchmarks.vila_findings --seeds 0 1 --scale 0.5      # writes benchmarks/vila_findings.json/.md
    python -m benchmarks.vila_findings --seeds 1 --out /tmp/s1.json # one process per seed, then:
    python -m benchmarks.vila_findings --merge /tmp/s0.json /tmp/s1.json

Three comparisons, each against the default recipe (pipeline.vlm_train.VILA_STEPS), per seed:
  * ``llm-frozen-step2``: step 2 with the decoder frozen (VILA: unfreezing the LLM in pre-training is what
    gives in-context learning) -> few-shot and two-image exact-match;
  * ``captions-only-step2``: step 2 on captions only instead of the interleaved mix -> few-shot, two-image;
  * ``no-text-step3``: step 3 without the text-only share (VILA: blending text-only data back restores the
    LLM's text skills) -> text exact-match.
The pre-training (tower, decoder) and step 1 are shared by all variants of a seed (deep copies), so a seed
costs one pre-training plus four times steps 2-3. At scale 1 that is about 40 minutes per seed on this
machine's one thread (benchmarks/vila_recipe.md): run it at a smaller ``--scale`` or on a quieter machine.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

VARIANTS = ("default", "llm-frozen-step2", "captions-only-step2", "no-text-step3")


def variant_steps(name: str, steps):
    """Steps 2 and 3 of ``steps`` (VILA_STEPS-shaped: projector, interleaved, SFT) changed for ``name``."""
    s1, s2, s3 = steps
    if name == "llm-frozen-step2":
        s2 = dataclasses.replace(s2, frozen=("vision", "decoder"))
    elif name == "captions-only-step2":
        s2 = dataclasses.replace(s2, mix={"caption": 1.0})
    elif name == "no-text-step3":
        s3 = dataclasses.replace(s3, mix={k: v for k, v in s3.mix.items() if k != "text"})
    elif name != "default":
        raise ValueError(f"variant {name!r}: expected one of {', '.join(VARIANTS)}")
    return [s2, s3]


def findings(seeds=(0,), *, scale: float = 1.0, variants=VARIANTS, n_test: int = 300, tower_epochs: float = 4.0,
             decoder_steps: int = 300, log=print) -> dict:
    """{variant: {seed: {kind: exact-match %}}} plus the minutes per seed."""
    import torch

    from benchmarks.vila_recipe import DECODER, ROOT
    from edgerun.readers import load_mnist
    from pipeline.models.vlm import build_vlm
    from pipeline.textdata import special_ids
    from pipeline.vlm_train import (
        VILA_STEPS,
        exact_match_by_kind,
        image_bank,
        pretrain_decoder,
        pretrain_tower,
        train_vila,
        vlm_answers,
    )
    from pipeline.vlmdata import IMAGE_ID, VLMData, build_vlm_tokenizer, mnist_vlm_task
    torch.set_num_threads(1)
    steps = [dataclasses.replace(s, steps=max(1, round(s.steps * scale))) for s in VILA_STEPS]
    xtr, ytr = load_mnist(ROOT / "data/mnist", "train")
    xte, yte = load_mnist(ROOT / "data/mnist", "test")
    out: dict = {v: {} for v in variants}
    minutes = {}
    for seed in seeds:
        t0 = time.perf_counter()
        train, test = mnist_vlm_task(ytr, yte, seed=seed, n_test=n_test)
        data = VLMData(train, test, xtr, xte)
        tok = build_vlm_tokenizer(train + test)
        base = build_vlm(tok.get_vocab_size(), image_token_id=IMAGE_ID, decoder=DECODER, special=special_ids(tok),
                         seed=seed)
        pretrain_tower(base.vision, xtr, ytr, epochs=tower_epochs, seed=seed)
        pretrain_decoder(base, tok, data, steps=decoder_steps, seed=seed)
        train_vila(base, tok, data, steps[:1], seed=seed)
        for v in variants:
            vlm = copy.deepcopy(base)
            train_vila(vlm, tok, data, variant_steps(v, steps), seed=seed + 1)
            out[v][seed] = exact_match_by_kind(test, vlm_answers(vlm, tok, test, image_bank(xte)))
            log(f"seed {seed} {v}: " + ", ".join(f"{k} {x:.1f}" for k, x in out[v][seed].items()))
        minutes[seed] = (time.perf_counter() - t0) / 60
    return {"scores": out, "minutes_per_seed": minutes, "scale": scale, "n_test": n_test}


def merge(results: list[dict]) -> dict:
    """One result from runs of other seeds (e.g. one process per seed, side by side on several cores); runs of
    another scale or test size are refused, as are two runs of one seed."""
    first = results[0]
    if any((r["scale"], r["n_test"]) != (first["scale"], first["n_test"]) for r in results):
        raise SystemExit("vila_findings --merge: the runs differ in --scale or --n-test")
    scores: dict = {v: {} for v in first["scores"]}
    minutes: dict = {}
    for r in results:
        for v, per_seed in r["scores"].items():
            if set(per_seed) & set(scores.setdefault(v, {})):
                raise SystemExit(f"vila_findings --merge: seed(s) {sorted(set(per_seed) & set(scores[v]))} twice")
            scores[v].update(per_seed)
        minutes.update(r["minutes_per_seed"])
    return {"scores": scores, "minutes_per_seed": minutes, "scale": first["scale"], "n_test": first["n_test"]}


def spread(per_seed: dict, kind: str) -> str:
    vals = [s[kind] for s in per_seed.values() if kind in s]
    if not vals:
        return "–"
    if len(vals) == 1:
        return f"{vals[0]:.1f}"
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f} ({min(vals):.1f}-{max(vals):.1f})"


def write_md(result: dict, path: Path) -> None:
    from edgerun.io import atomic_write
    kinds = ("digit", "two_image", "few_shot", "text")
    lines = ["# VILA's findings at MNIST scale (benchmarks/vila_findings.py)", "",
             f"Exact-match % on {result['n_test']} held-out records per kind; step counts x{result['scale']}; "
             f"mean ± stdev (min-max) over seeds {sorted(next(iter(result['scores'].values())))}; "
             f"minutes per seed {result['minutes_per_seed']}.", "",
             "| variant | " + " | ".join(kinds) + " |", "|---|" + "---:|" * len(kinds)]
    for v, per_seed in result["scores"].items():
        lines.append(f"| {v} | " + " | ".join(spread(per_seed, k) for k in kinds) + " |")
    atomic_write(path, "\n".join(lines) + "\n")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--n-test", type=int, default=300)
    ap.add_argument("--out", default=str(HERE / "vila_findings.json"))
    ap.add_argument("--merge", nargs="+", metavar="JSON", help="combine runs of other seeds into --out; no training")
    a = ap.parse_args(argv)
    if a.merge:
        try:
            runs = [json.loads(Path(f).read_text()) for f in a.merge]
            result = merge(runs)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise SystemExit(f"vila_findings --merge: not the JSON of a findings run ({type(e).__name__}: {e})") \
                from None
    else:
        result = findings(tuple(a.seeds), scale=a.scale, variants=tuple(a.variants), n_test=a.n_test)
    from edgerun.io import write_json
    write_json(a.out, result)
    write_md(json.loads(Path(a.out).read_text()), Path(a.out).with_suffix(".md"))


if __name__ == "__main__":
    main()
