"""Structured pruning of a VLM's two parts: the vision tower's ViT widths and the decoder's MLP / query heads.

    batches = [VLMBatch(input_ids, labels, pixels), ...]          # a few calibration batches of VLM samples
    widths = legal_widths(vlm.decoder, "jetson-orin", int4_group=128)[3]     # pipeline.prune_decoder
    vlm, info = prune_vlm(vlm, vision_macs=0.5, decoder_widths=widths, batches=batches, target="jetson-orin",
                          int4_group=128)

What changes, and what never does:
  * vision: the graph torch-pruning sees is ``projector(vision.encode(x))``, what vision.onnx computes. The
    tower's embedding dim, every block's MLP hidden width and head dims (whole heads with
    ``vision_head_ratio``) shrink; the VLM projector's input follows the tower's dim through the dependency
    graph; its OUTPUT (the decoder's hidden size) is kept. The tower's own ``projector``/``classifier``
    belong to its MNIST pre-training and are not part of the VLM's function: they are removed (named in
    ``PruneInfo.dropped``), since after pruning they would no longer fit the tower's dim.
  * decoder: pipeline.prune_decoder to ``decoder_widths`` (hidden size, KV heads and head_dim are kept, so
    the projector's output width and the KV cache layout stay; the widths must pass ``width_problems`` for
    ``target`` and ``int4_group``).

Importance. Both parts are ranked by first-order Taylor importance on the VLM's own answer loss
(``loss_fn(vlm, batch)`` over ``batches``): the decoder sees image embeddings, and the vision channels that
matter are those the decoder's answers depend on, which the tower's weight norms (l2) cannot know - the
tower was pre-trained for a different head. ``vision_importance="l2"`` is the data-free alternative (no
backward passes through the decoder; the choice when there are no calibration batches). Both importances
are computed on the unpruned VLM, the teacher the fine-tune distils from.

A pruned VLM trains as it is (its parameters are plain ``nn.Parameter``); the train loop is
pipeline.train. Everything here prunes in place and returns the same VLM; pipeline.vlm.io.save_vlm / load_vlm
carry it between stages (the tensors at their pruned shapes, the heads, the decoder as a Hugging Face folder).
"""
from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn

from pipeline import prune_decoder as pd
from pipeline import prune_scope as scope
from pipeline.errors import PipelineError
from pipeline.prune_cost import bisect_ratio, count_macs
from pipeline.prune_decoder import DecoderWidths
from pipeline.prune_tp import run_schedule

VISION_IMPORTANCES = ("taylor", "l2")
TOWER_HEAD = ("projector", "classifier")   # the tower's pre-training head: not part of the VLM's function


@dataclass
class VLMBatch:
    """One calibration / training batch of VLM samples: ``input_ids`` [B, T] with ``tokens_per_image`` image
    tokens per image, ``labels`` [B, T] (IGNORE = -100 outside the answer), ``pixels`` [n_images, C, H, W]
    normalised (None for text-only batches), ``attention_mask`` [B, T] or None."""
    input_ids: torch.Tensor
    labels: torch.Tensor
    pixels: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None


def answer_loss(vlm: nn.Module, batch: VLMBatch) -> torch.Tensor:
    """The VLM's next-token cross-entropy on the answer positions of ``batch`` (pipeline.lm_loss)."""
    from pipeline.lm_loss import lm_loss
    out = vlm(batch.input_ids, batch.pixels, attention_mask=batch.attention_mask)
    return lm_loss(out.logits, batch.labels)


@dataclass(frozen=True)
class VisionWidths:
    """The tower's prunable widths: embedding dim, and per block the MLP hidden width, heads and head_dim."""
    dim: int
    mlp: tuple[int, ...]
    heads: tuple[int, ...]
    head_dim: tuple[int, ...]


@dataclass
class PruneInfo:
    """What ``prune_vlm`` did. MACs / params of the vision part are torch-pruning's count of
    ``projector(vision.encode(x))`` for one image (what vision.onnx computes); ``history`` is torch-pruning's
    JSON-friendly history of the vision part (module names as in the VLM: ``vision.*``, ``projector*``)."""
    vision_before: VisionWidths | None   # None: a tower this pruner does not know, kept whole
    vision_after: VisionWidths | None
    vision_macs_before: int
    vision_macs_after: int
    vision_params_before: int
    vision_params_after: int
    vision_ratio: float                  # torch-pruning's channel ratio applied to the vision part
    vision_importance: str
    decoder_before: DecoderWidths
    decoder_after: DecoderWidths
    decoder_params_before: int
    decoder_params_after: int
    projector_out: int                   # the decoder's hidden size, unchanged
    dropped: tuple[str, ...]             # the tower's pre-training head, removed
    history: list = dataclasses.field(default_factory=list)

    def to_json(self) -> dict:
        d = dataclasses.asdict(self)
        d["vision_macs_kept"] = round(self.vision_macs_after / self.vision_macs_before, 4)
        return d


class _VisionPart(nn.Module):
    """``projector(vision.encode(x))`` with the VLM's module names; the decoder rides along outside the module
    tree (torch-pruning never sees it, a deepcopy copies it) so that a copy can still run the VLM's loss."""

    def __init__(self, vlm: nn.Module):
        super().__init__()
        self.vision, self.projector = vlm.vision, vlm.projector
        self._rest = [vlm.decoder, vlm.image_token_id, type(vlm)]

    def forward(self, x):
        return self.projector(self.vision.encode(x))

    def as_vlm(self) -> nn.Module:
        decoder, token, cls = self._rest
        return cls(self.vision, self.projector, decoder, token)


def is_ours(vision: nn.Module) -> bool:
    """Whether the tower is pipeline.models.tower.VisionTower, the one tower this pruner knows: its attention's
    head attributes and its pre-training head. Another tower (pipeline/vlm/byo.py) is kept whole."""
    from pipeline.models.tower import VisionTower
    return isinstance(vision, VisionTower)


def vision_widths(vision: nn.Module) -> VisionWidths | None:
    if not is_ours(vision):
        return None
    blocks = list(vision.blocks)
    return VisionWidths(dim=int(vision.patch_embed.out_channels),
                        mlp=tuple(int(b.mlp.fc1.out_features) for b in blocks),
                        heads=tuple(int(b.attn.num_heads) for b in blocks),
                        head_dim=tuple(int(b.attn.head_dim) for b in blocks))


def example_pixels(vision: nn.Module) -> torch.Tensor:
    """One zero image of the tower's input shape."""
    from export.vlm import tower_input
    facts = tower_input(vision)
    return torch.zeros(1, facts["channels"], *facts["image_size"])


def _validate(vlm, vision_macs, vision_ratio, vision_importance, decoder_widths_, loss_fn, batches, head_ratio):
    for attr in ("vision", "projector", "decoder", "image_embeds"):
        if not hasattr(vlm, attr):
            raise PipelineError(f"prune_vlm: expected a VLM (pipeline.models.vlm), got {type(vlm).__name__} "
                                f"without {attr!r}")
    if (vision_macs is None) == (vision_ratio is None):
        raise PipelineError("prune_vlm: give exactly one of vision_macs (fraction of the vision part's MACs to keep, "
                            "0 < macs <= 1) and vision_ratio (torch-pruning's channel ratio, 0 <= ratio < 1)")
    if vision_macs is not None and not 0.0 < float(vision_macs) <= 1.0:
        raise PipelineError(f"prune_vlm: vision_macs must be in (0, 1], got {vision_macs}")
    if vision_ratio is not None and not 0.0 <= float(vision_ratio) < 1.0:
        raise PipelineError(f"prune_vlm: vision_ratio must be in [0, 1), got {vision_ratio}")
    if vision_importance not in VISION_IMPORTANCES:
        raise PipelineError(f"prune_vlm: vision_importance must be one of {', '.join(VISION_IMPORTANCES)}, "
                            f"got {vision_importance!r}")
    if not 0.0 <= float(head_ratio) < 1.0:
        raise PipelineError(f"prune_vlm: vision_head_ratio must be in [0, 1), got {head_ratio}")
    if not is_ours(vlm.vision) and (vision_macs is not None and vision_macs < 1 or vision_ratio or head_ratio):
        raise PipelineError(f"prune_vlm: the tower {type(vlm.vision).__name__} is not pipeline.models.tower."
                            "VisionTower, the one tower this pruner knows: keep it whole (vision_ratio=0)")
    if decoder_widths_ is not None and not isinstance(decoder_widths_, DecoderWidths):
        raise PipelineError(f"prune_vlm: decoder_widths must be a DecoderWidths or None, got "
                            f"{type(decoder_widths_).__name__}")
    needs_data = vision_importance == "taylor" or decoder_widths_ is not None
    if needs_data and (loss_fn is None or not batches):
        raise PipelineError("prune_vlm: Taylor importance needs loss_fn(vlm, batch) and at least one calibration "
                            "batch (or vision_importance='l2' and decoder_widths=None)")
    if vision_importance == "taylor" and batches and all(getattr(b, "pixels", 0) is None for b in batches):
        raise PipelineError("prune_vlm: the tower's Taylor importance needs batches with images; these are all "
                            "text-only (or use vision_importance='l2')")


def prune_vlm(vlm: nn.Module, *, vision_macs: float | None = None, vision_ratio: float | None = None,
              decoder_widths: DecoderWidths | None = None,
              loss_fn: Callable[[nn.Module, object], torch.Tensor] | None = answer_loss,
              batches: Sequence | None = None, target: str | None = None, int4_group: int | None = None,
              vision_importance: str = "taylor", vision_head_ratio: float = 0.0, global_pruning: bool = False,
              round_to: int = 1, seed: int = 0) -> tuple[nn.Module, PruneInfo]:
    """Prune ``vlm`` in place: the vision part to ``vision_macs`` (the fraction of its MACs kept) or
    ``vision_ratio`` (a channel ratio), the decoder to ``decoder_widths`` (None: the decoder is kept).

    ``loss_fn(vlm, batch)``: a scalar loss of the whole VLM on one of ``batches`` (default ``answer_loss`` on
    ``VLMBatch``); Taylor importance of both parts differentiates it. ``target``/``int4_group``: whose kernel
    limits the decoder's widths must meet (pipeline.prune_decoder.width_problems; None: the family's rules).
    ``vision_head_ratio`` > 0 removes that share of the tower's heads instead of narrowing them.
    Returns ``(vlm, PruneInfo)``; any failure is one line."""
    _validate(vlm, vision_macs, vision_ratio, vision_importance, decoder_widths, loss_fn, batches, vision_head_ratio)
    batches = list(batches or [])
    dec_before = pd.decoder_widths(vlm.decoder)
    hidden = _projector_out(vlm)
    importance = None
    problems = [] if decoder_widths is None else pd.width_problems(vlm.decoder, decoder_widths, target,
                                                                    int4_group=int4_group)
    if problems:     # before anything changes: a refused width must leave the VLM as it was
        raise PipelineError(f"prune_vlm: the decoder cannot take {decoder_widths.config_dict()}: {problems[0]}"
                            + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))
    if decoder_widths is not None:   # scored on the unpruned VLM, before the vision part changes
        importance = pd.taylor_importance(vlm.decoder, loss_fn, batches, owner=vlm)
    dec_params_before = sum(p.numel() for p in vlm.decoder.parameters())

    head = TOWER_HEAD if is_ours(vlm.vision) else ()   # another tower's modules are all its own function
    dropped = tuple(f"vision.{n}" for n in head if isinstance(getattr(vlm.vision, n, None), nn.Module))
    for name in head:
        if isinstance(getattr(vlm.vision, name, None), nn.Module):
            delattr(vlm.vision, name)
    part = _VisionPart(vlm)
    example = example_pixels(vlm.vision)
    before = vision_widths(vlm.vision)
    macs_before, params_before = count_macs(part, example)
    common = _schedule_options(part, vision_importance, vision_head_ratio, global_pruning, round_to, seed,
                               len(batches))
    schedule = _schedule(loss_fn, batches)
    if vision_ratio is not None or not is_ours(vlm.vision):
        ratio = float(vision_ratio or 0.0)
    else:
        ratio, _ = bisect_ratio(part, example, float(vision_macs) * macs_before,
                                lambda m: count_macs(m, example)[0], "MACs", common, schedule, cost0=macs_before)
    history = schedule(part, example, ratio=ratio, **common) if ratio > 0 or vision_head_ratio > 0 else []
    if _projector_out(vlm) != hidden:
        raise PipelineError(f"prune_vlm: pruning changed the projector's output width from {hidden} to "
                            f"{_projector_out(vlm)}; it must stay the decoder's hidden size")
    macs_after, params_after = count_macs(part, example)

    if decoder_widths is not None:
        pd.prune_decoder(vlm.decoder, decoder_widths, importance, target=target, int4_group=int4_group)
    vlm.zero_grad(set_to_none=True)
    return vlm, PruneInfo(
        vision_before=before, vision_after=vision_widths(vlm.vision), vision_macs_before=macs_before,
        vision_macs_after=macs_after, vision_params_before=params_before, vision_params_after=params_after,
        vision_ratio=round(ratio, 6), vision_importance=vision_importance, decoder_before=dec_before,
        decoder_after=pd.decoder_widths(vlm.decoder), decoder_params_before=dec_params_before,
        decoder_params_after=sum(p.numel() for p in vlm.decoder.parameters()), projector_out=hidden,
        dropped=dropped, history=history)


def _projector_out(vlm: nn.Module) -> int:
    linears = [m for m in vlm.projector.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise PipelineError(f"prune_vlm: the projector ({type(vlm.projector).__name__}) has no Linear layer")
    return int(linears[-1].out_features)


def _schedule_options(part: nn.Module, importance: str, head_ratio: float, global_pruning: bool, round_to: int,
                      seed: int, n_batches: int) -> dict:
    """run_schedule's options for the vision part. Taylor batches are (example, batch index): the loss runs the
    whole VLM on the caller's batch (see _schedule), so only the index has to travel through torch-pruning."""
    example = example_pixels(part.vision)
    taylor = [(example, torch.tensor(i)) for i in range(n_batches)] if importance == "taylor" else []
    return dict(importance=importance, global_pruning=bool(global_pruning), round_to=int(round_to),
                max_layer_ratio=1.0, iterative_steps=1, ignored_names=("projector",), taylor_batches=taylor,
                seed=int(seed), unwrapped=scope.unwrapped_dims(part), layer_ratios=None,
                head_ratio=float(head_ratio), narrow_heads=float(head_ratio) == 0.0)


def _schedule(loss_fn, batches: list):
    """run_schedule for a _VisionPart (the real one or bisect_ratio's deepcopy): the Taylor loss is the
    VLM's answer loss run through that part's own modules, so the gradients land where the pruner reads them;
    the decoder's gradients (not pruned here) are cleared after."""
    def schedule(part, example_input, *, ratio, **common):
        vlm = part.as_vlm()

        def taylor_loss(_embeds, index):
            return loss_fn(vlm, batches[int(index)])
        was_training = vlm.decoder.training
        vlm.decoder.eval()     # dropout off: the scores are about the model that will run
        try:
            return run_schedule(part, example_input, ratio=ratio, taylor_loss=taylor_loss, **common)
        finally:
            vlm.decoder.zero_grad(set_to_none=True)
            vlm.decoder.train(was_training)
    return schedule
