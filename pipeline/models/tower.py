"""A tiny VILA-style vision tower: ViT encoder + a linear projector to the LLM's hidden size.

VILA feeds an image through a ViT, then maps every visual token with a projector to the LLM's
hidden size (LLaMA-2-7B: 4096). ``VisionTower`` is that in miniature, trained on MNIST through a
``classifier`` on the mean-pooled projected tokens, so the pipeline's top-1 gates still apply.

``forward`` returns ``(tokens, logits)``: tokens ``[B, N, llm_hidden]`` (N = (image_size/patch)^2),
logits ``[B, num_classes]``; ``output_names = ("tokens", "logits")`` names them for export.

Pruning conventions (the same as ``pipeline.models.zoo.ViTSmall``, which ``pipeline.prune`` expects):
  * every attention module owns a ``qkv`` ``nn.Linear`` and carries int ``num_heads``/``head_dim``
    attributes that the pruner rewrites after each step; ``forward`` never uses them for widths
    (reshapes use -1), and ``scale`` is fixed at construction so pruning head dims keeps the
    function of the kept ones;
  * nothing in ``forward`` stores a width: the residual width, MLP hidden width and head dims may all
    shrink;
  * the projector's OUTPUT width is the LLM's hidden size and must never shrink: its module name is
    listed in ``prune_ignored_layers`` (pass it as ``prune.ignored_layers``; the classifier is
    always kept by the pruner).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from pipeline.models.zoo import Block  # the same pre-norm block as ViTSmall, so pruning treats both alike


class VisionTower(nn.Module):
    """Conv patch embedding + learned position embedding, pre-norm blocks, final LayerNorm,
    ``projector`` (dim → llm_hidden) on every token, ``classifier`` on the mean projected token."""

    output_names = ("tokens", "logits")
    # Modules whose output width must survive pruning (the classifier is kept by the pruner anyway).
    prune_ignored_layers = ("projector",)

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28,
                 patch_size: int = 4, dim: int = 64, depth: int = 4, heads: int = 4,
                 mlp_ratio: float = 2.0, llm_hidden: int = 128):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} is not a multiple of patch_size {patch_size}")
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.num_tokens = (image_size // patch_size) ** 2
        self.llm_hidden = llm_hidden
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, patch_size)
        self.pos_embed = nn.Parameter(torch.randn(1, self.num_tokens, dim) * 0.02)
        if dim % heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {heads}")
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.projector = nn.Linear(dim, llm_hidden)
        self.classifier = nn.Linear(llm_hidden, num_classes)

    def encode(self, x):
        """The ViT encoder's normalised tokens [B, N, dim]."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2) + self.pos_embed
        return self.norm(self.blocks(x))

    def forward(self, x):
        tokens = self.projector(self.encode(x))
        return tokens, self.classifier(tokens.mean(dim=1))
