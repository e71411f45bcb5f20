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


class TowerAttention(nn.Module):
    """Multi-head self-attention with one ``qkv`` Linear; ``num_heads``/``head_dim`` are attributes."""

    def __init__(self, dim: int, num_heads: int):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not a multiple of heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))


class TowerMlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class TowerBlock(nn.Module):
    """Pre-norm transformer block: x + attn(norm1(x)), then x + mlp(norm2(x))."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = TowerAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = TowerMlp(dim, max(1, int(dim * mlp_ratio)))

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


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
        self.blocks = nn.Sequential(*[TowerBlock(dim, heads, mlp_ratio) for _ in range(depth)])
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
