"""VILA's three-step training of a VLM, on the one training loop (pipeline.train.train, the generate task).

    pretrain_tower(vlm.vision, x_mnist, y_mnist); pretrain_decoder(vlm, tok, data)   # the "pretrained" parts
    results = train_vila(vlm, tok, data, VILA_STEPS)                                 # projector, interleaved, SFT
    scores = exact_match_by_kind(data.test, vlm_answers(vlm, tok, data.test, bank))  # {kind: percent}

VILA: (1) the projector alone on captions (ViT and LLM frozen), (2) interleaved image-text pre-training with
the LLM unfrozen, (3) joint instruction fine-tuning with text-only data blended in. Here the ViT is the MNIST
VisionTower pre-trained as a classifier (the stand-in for a pretrained CLIP/SigLIP) and the LLM a small LLaMA
pre-trained on the text-only records (the stand-in for the pretrained LLM). A step is a `StepSpec`; freezing is
``requires_grad_(False)`` (the loop's optimizer takes the trainable parameters only).

`VLMView` makes a VLM look like a decoder to the loop: it takes the packed rows of vlmdata.encode_vlm (ids, then
image indices into an image bank it holds) and returns the VLM's [B, T, V] logits, so the generate task's loss
and distillation (teacher and student both views) apply unchanged.
"""
from __future__ import annotations

import math
import random
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from edgerun.pixels import normalise
from pipeline.errors import PipelineError
from pipeline.vlmdata import VLMData, VLMRecord, encode_vlm, prompt_ids

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
PARTS = ("vision", "projector", "decoder")


def image_bank(images_uint8: np.ndarray, mean=MNIST_MEAN, std=MNIST_STD) -> torch.Tensor:
    """uint8 [n, C, H, W] -> the normalised float32 bank VLMView and vlm_answers read (the one normaliser);
    ``mean``/``std``: the tower's (pixel_norm)."""
    return torch.from_numpy(normalise(images_uint8, mean=mean, std=std))


def pixel_norm(vlm: nn.Module) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the VLM's tower was trained with: its own (a tower of pipeline/vlm/byo.py's contract), else
    MNIST's (the embedded VisionTower, pre-trained on MNIST here)."""
    from export.vlm import tower_input
    facts = tower_input(vlm.vision)
    return tuple(facts["mean"]), tuple(facts["std"])


@dataclass
class ViewOutput:
    """What VLMView gives the training loop: the [B, T, V] logits the generate task reads, and the batch's
    projected image tokens [n_images, tokens, hidden] (None without images) for the VLM's token distillation."""
    logits: torch.Tensor
    image_tokens: torch.Tensor | None = None


class VLMView(nn.Module):
    """A VLM and an image bank seen as a decoder over packed rows [B, T + max_images] (encode_vlm's ``x``).

    Columns past the batch's last non-pad token are not computed: their logits are 0 (their labels are
    IGNORE, so no loss or distillation reads them); every computed position is what VLM.forward gives on the
    unpacked sample (right padding under causal attention does not reach earlier positions)."""

    def __init__(self, vlm: nn.Module, bank: torch.Tensor, max_images: int, pad_id: int = 0):
        super().__init__()
        self.vlm, self.max_images, self.pad_id = vlm, int(max_images), int(pad_id)
        self.register_buffer("bank", bank, persistent=False)

    def unpack(self, packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(input_ids [B, T], pixels [n, C, H, W] in order of appearance, or None)."""
        ids = packed[:, :packed.shape[1] - self.max_images]
        index = packed[:, ids.shape[1]:]
        index = index[index >= 0]   # row-major: the order the image tokens appear over the batch
        return ids, (self.bank[index] if len(index) else None)

    def forward(self, packed: torch.Tensor) -> ViewOutput:
        """``logits`` [B, T, V] (the generate task reads ``.logits``) and the batch's image tokens."""
        ids, pixels = self.unpack(packed)
        used = int((ids != self.pad_id).any(0).nonzero().max()) + 1
        visual = self.vlm.image_embeds(pixels) if pixels is not None else None
        embeds = self.vlm.inputs_embeds(ids[:, :used], pixels, visual=visual)
        logits = self.vlm.decoder(inputs_embeds=embeds).logits
        if used < ids.shape[1]:
            logits = torch.cat([logits, logits.new_zeros(len(ids), ids.shape[1] - used, logits.shape[-1])], 1)
        return ViewOutput(logits, visual)


# ------------------------------------------------------------------------------------------------ answers
@torch.no_grad()
def vlm_answers(vlm: nn.Module, tok, records: list[VLMRecord], bank: torch.Tensor, max_new_tokens: int = 6,
                batch_size: int = 128) -> list[str]:
    """Greedy answers (decoded up to </s>, specials skipped). Prompts of the same length are batched
    together, so no padding and no mask: an answer does not depend on its batch. Each new token re-runs the
    decoder on the whole sequence (short here; no KV cache); the images are encoded once."""
    from pipeline.textdata import special_ids
    eos = special_ids(tok)["eos"]
    was = vlm.training
    vlm.eval()
    prompts = [prompt_ids(tok, r, vlm.tokens_per_image) for r in records]
    out: list[str] = [""] * len(records)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    table = vlm.decoder.get_input_embeddings()
    try:
        for members in groups.values():
            for s in range(0, len(members), batch_size):
                rows = members[s:s + batch_size]
                ids = torch.tensor([prompts[i] for i in rows])
                index = [j for i in rows for j in records[i].images]
                emb = vlm.inputs_embeds(ids, bank[index] if index else None)
                new = torch.empty(len(rows), 0, dtype=torch.long)
                for _ in range(max_new_tokens):
                    nxt = vlm.decoder(inputs_embeds=emb).logits[:, -1].argmax(-1)
                    new = torch.cat([new, nxt[:, None]], 1)
                    if bool((new == eos).any(1).all()):
                        break
                    emb = torch.cat([emb, table(nxt)[:, None]], 1)
                for i, row in zip(rows, new.tolist(), strict=True):
                    row = row[:row.index(eos)] if eos in row else row
                    out[i] = tok.decode(row, skip_special_tokens=True)
    finally:
        vlm.train(was)
    return out


def exact_match_by_kind(records: list[VLMRecord], predictions: list[str]) -> dict[str, float]:
    """{kind: percent exact-match} (edgerun.generate.exact_match, the one definition), plus "all"."""
    from edgerun.generate import exact_match
    if len(records) != len(predictions):
        raise PipelineError(f"{len(predictions)} predictions for {len(records)} records")
    hits: dict[str, list[bool]] = {}
    for r, p in zip(records, predictions, strict=True):
        hits.setdefault(r.kind, []).append(exact_match(p, r.answer))
    scores = {k: 100.0 * sum(v) / len(v) for k, v in hits.items()}
    if records:
        scores["all"] = 100.0 * sum(map(sum, hits.values())) / len(records)
    return scores


# ------------------------------------------------------------------------------------------------ steps
@dataclass(frozen=True)
class StepSpec:
    """One training step of the recipe. ``mix``: {kind: share} of the samples (normalised; "text" is the
    text-only share); ``frozen``: parts among vision, projector, decoder kept as they are; ``steps`` optimizer
    steps of ``batch_size`` samples drawn from the train records of the mix's kinds (with replacement)."""
    name: str
    mix: dict = field(default_factory=dict)
    frozen: tuple[str, ...] = ()
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 64
    schedule: str = "onecycle"
    weight_decay: float = 0.0

    def __post_init__(self):
        if not self.mix or any(not (isinstance(v, (int, float)) and v >= 0) for v in self.mix.values()) \
                or sum(self.mix.values()) <= 0:
            raise PipelineError(f"vlm step {self.name!r}: mix must give kinds shares >= 0 summing > 0, got {self.mix}")
        bad = [p for p in self.frozen if p not in PARTS]
        if bad:
            raise PipelineError(f"vlm step {self.name!r}: frozen part {bad[0]!r}; expected some of {', '.join(PARTS)}")
        if set(self.frozen) == set(PARTS):
            raise PipelineError(f"vlm step {self.name!r}: every part frozen leaves nothing to train")
        if self.steps < 1 or self.batch_size < 1 or not self.lr > 0:
            raise PipelineError(f"vlm step {self.name!r}: steps, batch_size and lr must be > 0")


# VILA's recipe at this scale, after pretrain_tower (4 epochs: 97.9 % top-1) and pretrain_decoder (300 steps):
# benchmarks/vila_recipe.md "tower-4-epochs" measured digit 98.0, two-image 92.7, few-shot 96.3, text 56.0 %.
VILA_STEPS = (
    StepSpec("1-projector", {"caption": 1.0}, frozen=("vision", "decoder"), steps=150, lr=2e-3),
    StepSpec("2-interleaved", {"caption": 0.2, "digit": 0.2, "two_image": 0.35, "few_shot": 0.25},
             frozen=("vision",), steps=500, lr=1e-3),
    StepSpec("3-sft", {"digit": 0.2, "two_image": 0.3, "few_shot": 0.2, "text": 0.3},
             frozen=("vision",), steps=300, lr=5e-4),
)


def freeze(vlm: nn.Module, frozen: tuple[str, ...]) -> None:
    """Parts in ``frozen`` take no gradient (the loop's optimizer skips them); the others train."""
    for part in PARTS:
        getattr(vlm, part).requires_grad_(part not in frozen)


def sample_mix(records: list[VLMRecord], mix: dict, n: int, seed: int) -> list[VLMRecord]:
    """``n`` records drawn with replacement, each kind's count its share of ``n`` (rounded, summing to n)."""
    pools: dict[str, list[VLMRecord]] = {}
    for r in records:
        pools.setdefault(r.kind, []).append(r)
    missing = [k for k, v in mix.items() if v > 0 and not pools.get(k)]
    if missing:
        raise PipelineError(f"vlm step: no train records of kind {missing[0]!r} (have {sorted(pools)})")
    total = float(sum(mix.values()))
    kinds = [k for k, v in mix.items() if v > 0]
    counts = [math.floor(n * mix[k] / total) for k in kinds]
    for i in range(n - sum(counts)):
        counts[i % len(kinds)] += 1
    rng = random.Random(seed)
    out = [r for k, c in zip(kinds, counts, strict=True) for r in rng.choices(pools[k], k=c)]
    rng.shuffle(out)
    return out


def train_step(vlm: nn.Module, tok, records: list[VLMRecord], bank: torch.Tensor, spec: StepSpec, *,
               max_images: int, teacher: nn.Module | None = None, kd_weight: float = 0.0,
               kd_temperature: float = 1.0, token_weight: float = 0.0, seed: int = 0,
               progress: str | None = None) -> dict:
    """One StepSpec through pipeline.train.train with the VLM task (the generate task's loss; with a teacher
    and ``token_weight`` > 0, plus the image tokens' distance to the teacher's); returns the loop's info."""
    from pipeline.tasks import named
    from pipeline.textdata import special_ids
    from pipeline.train import train
    freeze(vlm, spec.frozen)
    batch = sample_mix(records, spec.mix, spec.steps * spec.batch_size, seed)
    x, y = encode_vlm(tok, batch, vlm.tokens_per_image, max_images)
    pad = special_ids(tok)["pad"]
    student = VLMView(vlm, bank, max_images, pad)
    t_view = VLMView(teacher, bank, max_images, pad) if teacher is not None else None
    info = train(student, t_view, x, y, epochs=1.0, lr=spec.lr, batch_size=spec.batch_size, kd_weight=kd_weight,
                 kd_temperature=kd_temperature, token_weight=token_weight, schedule=spec.schedule,
                 weight_decay=spec.weight_decay, seed=seed, device="cpu", progress=progress, task=named("vlm"))
    freeze(vlm, ())
    return info


@dataclass(frozen=True)
class StepResult:
    name: str
    seconds: float
    final_loss: float
    scores: dict | None   # exact-match by kind on the evaluation records after the step (None: not measured)


def train_vila(vlm: nn.Module, tok, data: VLMData, steps, *, eval_records: list[VLMRecord] | None = None,
               seed: int = 0, progress: str | None = None, log=None) -> list[StepResult]:
    """Run ``steps`` (StepSpecs) in order on ``data.train``; with ``eval_records`` (test records), score
    exact-match by kind after each step. ``log``: called with each StepResult as it finishes."""
    norm = pixel_norm(vlm)
    train_bank, test_bank = image_bank(data.train_images, *norm), image_bank(data.test_images, *norm)
    max_images = max((len(r.images) for r in data.train + data.test), default=0)
    results = []
    for i, spec in enumerate(steps):
        t0 = time.perf_counter()
        info = train_step(vlm, tok, data.train, train_bank, spec, max_images=max_images, seed=seed + i,
                          progress=progress)
        scores = None
        if eval_records:
            scores = exact_match_by_kind(eval_records, vlm_answers(vlm, tok, eval_records, test_bank))
        res = StepResult(spec.name, time.perf_counter() - t0, info["losses"][-1], scores)
        results.append(res)
        if log is not None:
            log(res)
    return results


# ------------------------------------------------------------------------------------------ pre-training
def pretrain_tower(tower: nn.Module, images_uint8: np.ndarray, labels: np.ndarray, *, epochs: float = 4.0,
                   lr: float = 2e-3, batch_size: int = 128, seed: int = 0, progress: str | None = None) -> dict:
    """The vision tower trained as an MNIST classifier through its own projector and classifier head (the
    stand-in for VILA's pretrained CLIP); only its encoder is used by the VLM afterwards. The tower's top-1
    bounds what the VLM reads off an image: 2 epochs (96.9 %) left digit at 95.7 %, 4 (97.9 %) gave 98.0 %."""
    from pipeline.train import train
    x = normalise(images_uint8, mean=MNIST_MEAN, std=MNIST_STD)
    tower.requires_grad_(True)
    return train(tower, None, x, np.asarray(labels, np.int64), epochs=epochs, lr=lr, batch_size=batch_size,
                 seed=seed, device="cpu", progress=progress)


def tower_top1(tower: nn.Module, images_uint8: np.ndarray, labels: np.ndarray) -> float:
    from pipeline.train import evaluate_top1
    return evaluate_top1(tower, normalise(images_uint8, mean=MNIST_MEAN, std=MNIST_STD), labels, device="cpu")


def pretrain_decoder(vlm: nn.Module, tok, data: VLMData, *, steps: int = 300, lr: float = 2e-3,
                     batch_size: int = 64, seed: int = 0, progress: str | None = None) -> dict:
    """The VLM's decoder trained on the text-only records (digit questions in words): the stand-in for the
    pretrained LLM.
    Vision and projector stay frozen (no image is seen)."""
    spec = StepSpec("0-decoder", {"text": 1.0}, frozen=("vision", "projector"), steps=steps, lr=lr,
                    batch_size=batch_size)
    return train_step(vlm, tok, data.train, image_bank(data.train_images[:0]), spec, max_images=0, seed=seed,
                      progress=progress)
