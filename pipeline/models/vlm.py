"""VILA in miniature: a ViT vision tower, a projector, and a LLaMA-family decoder.

    vlm = build_vlm(vocab_size, image_token_id=tok.token_to_id(IMAGE))
    logits = vlm(input_ids, pixels).logits          # input_ids hold tokens_per_image image tokens per image

An image enters the text as ``tokens_per_image`` copies of the image token (LLaVA's and VILA's layout, as
transformers' processors expand ``<image>``): the embeddings at those positions are replaced, in order of
appearance (row-major over the batch), by the projected visual tokens of ``pixels`` [n_images, C, H, W]. The
runtime does the same with numpy (the token embedding table, vision.onnx, then the decoder's ``inputs_embeds``),
so what is trained is what is deployed.

The tower is ``pipeline.models.tower.VisionTower``; only its encoder is used here (its own projector and
classifier belong to its MNIST pre-training, the stand-in for VILA's pretrained CLIP/SigLIP). The projector maps
the encoder's width to the decoder's hidden size: ``linear`` as VILA, or ``mlp2`` (Linear, GELU, Linear).
"""
from __future__ import annotations

import torch
import torch.nn as nn

PROJECTORS = ("linear", "mlp2")
# The tower of configs/vit-tower.toml: 7x7 patches, 16 tokens an image.
TOWER_DEFAULT = {"image_size": 28, "patch_size": 7, "dim": 64, "depth": 4, "heads": 4, "mlp_ratio": 2.0}


def build_projector(kind: str, dim: int, hidden: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(dim, hidden)
    if kind == "mlp2":
        return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, hidden))
    raise ValueError(f"projector {kind!r}: expected one of {', '.join(PROJECTORS)}")


class VLM(nn.Module):
    """``vision`` (a VisionTower: ``encode`` gives [B, N, dim]), ``projector`` (dim -> hidden), ``decoder`` (a
    Hugging Face causal LM taking ``inputs_embeds``)."""

    def __init__(self, vision: nn.Module, projector: nn.Module, decoder: nn.Module, image_token_id: int):
        super().__init__()
        self.vision, self.projector, self.decoder = vision, projector, decoder
        self.image_token_id = int(image_token_id)

    @property
    def tokens_per_image(self) -> int:
        return int(self.vision.num_tokens)

    def image_embeds(self, pixels: torch.Tensor) -> torch.Tensor:
        """[n_images, C, H, W] normalised pixels -> [n_images, tokens_per_image, hidden]: what vision.onnx gives."""
        return self.projector(self.vision.encode(pixels))

    def inputs_embeds(self, input_ids: torch.Tensor, pixels: torch.Tensor | None,
                      visual: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's input: token embeddings with the image positions replaced by the images' tokens
        (``visual``: ``image_embeds(pixels)`` when the caller has it already)."""
        table = self.decoder.get_input_embeddings()
        at = input_ids == self.image_token_id
        n = int(at.sum())
        embeds = table(input_ids)
        if n == 0:
            return embeds
        if pixels is None or n != len(pixels) * self.tokens_per_image:
            have = 0 if pixels is None else len(pixels)
            raise ValueError(f"{n} image-token positions for {have} images of {self.tokens_per_image} tokens")
        if visual is None:
            visual = self.image_embeds(pixels)
        visual = visual.reshape(-1, embeds.shape[-1]).to(embeds.dtype)
        return embeds.masked_scatter(at.unsqueeze(-1), visual)

    def forward(self, input_ids: torch.Tensor, pixels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None):
        return self.decoder(inputs_embeds=self.inputs_embeds(input_ids, pixels), attention_mask=attention_mask)


def build_vlm(vocab_size: int, *, image_token_id: int, tower: dict | None = None, decoder: dict | None = None,
              projector: str = "linear", special: dict | None = None, seed: int = 0) -> VLM:
    """A VLM with random (seeded) weights: ``tower`` = VisionTower kwargs, ``decoder`` = build_decoder kwargs
    (its hidden_size is the projector's output)."""
    from pipeline.models.decoder import build_decoder
    from pipeline.models.tower import VisionTower
    torch.manual_seed(seed)
    dec = build_decoder(vocab_size, special=special, seed=seed, **(decoder or {}))
    t = {**TOWER_DEFAULT, **(tower or {})}
    vision = VisionTower(**t)
    return VLM(vision, build_projector(projector, t["dim"], dec.config.hidden_size), dec, image_token_id)
