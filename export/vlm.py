"""A vision-language model (pipeline.models.vlm.VLM) → the files of edgerun's VLM runtime (edgerun.vlm).

    files = export_vlm(vlm, "out/bundle")                      # vision.onnx, model.onnx, embed_tokens.npy
    facts = vlm_facts(vlm)                                     # what vlm.json says of the model
    edgerun.vlm.write_vlm_json("out/bundle", facts, prompt_templates={"digit": "<image> what digit is this ?"})

Three files, each proved before it takes its name:
  * ``vision.onnx``: normalised pixels ``pixels`` [n, C, H, W] → ``image_embeds`` [n, tokens_per_image, hidden]
    (the tower's encoder and the projector: ``VLM.image_embeds``), n dynamic; written by export_onnx (dynamic
    batch proved in the file and in onnxruntime at several batches), then its outputs compared with torch's.
  * ``model.onnx``: the decoder with ``inputs_embeds`` (export.decoder.export_decoder(..., embeds=True)).
  * ``embed_tokens.npy``: the decoder's token embedding table, float32 [vocab, hidden].

Why a table and not onnxruntime-genai's ``embedding.onnx``: its VLM layout (phi-3-vision: vision, embedding and
text models) is driven by a model-specific C++ processor (image preprocessing, prompt format) that knows only its
own families, so a MNIST VLM could not run there whatever the files were called; the embedding model would be one
Gather (plus the scatter of image features) that numpy does exactly with an index, and a .npy is read without
onnxruntime. The decoder still has genai's names and layout (the part that runtime could use).
"""
from __future__ import annotations

import math
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgerun.io import atomic_write
from edgerun.vlm import DECODER, EMBEDDINGS, IMAGE_TOKEN, VISION
from export.decoder import export_decoder
from export.errors import ExportError
from export.onnx_export import export_onnx
from export.parity import compare_outputs

MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)
VISION_BATCHES = (1, 3, 7)     # the batches onnxruntime runs vision.onnx at before it is kept
PARITY_ROWS = 5                # images compared with torch (random normalised pixels)


@dataclass(frozen=True)
class VLMFiles:
    """What export_vlm wrote: the three paths, the vision file's worst max-abs against torch, the decoder's
    export facts (export_decoder's dict)."""
    vision: Path
    decoder: Path
    embed_tokens: Path
    vision_max_abs: float
    decoder_info: dict


def export_vlm(vlm, folder, *, opset: int = 18, parity_atol: float = 1e-4) -> VLMFiles:
    """Write vision.onnx, model.onnx and embed_tokens.npy for ``vlm`` into ``folder``.

    ``parity_atol``: the largest max-abs of vision.onnx's image embeddings from torch's allowed, relative to
    max(1, the largest |embedding|) (the decoder's own proof has its default).
    """
    import torch

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    facts = vlm_facts(vlm)
    vision_path = folder / VISION
    worst = _export_vision(vlm, vision_path, facts, opset, parity_atol)
    info = export_decoder(vlm.decoder, folder / DECODER, opset=opset, embeds=True)
    table = vlm.decoder.get_input_embeddings().weight.detach().to(torch.float32).cpu().numpy()
    if table.shape != (info["vocab"], facts["hidden"]):
        raise ExportError(f"{EMBEDDINGS}: the decoder's embedding table is {list(table.shape)}, expected "
                          f"[vocab {info['vocab']}, hidden {facts['hidden']}]")
    embed_path = folder / EMBEDDINGS

    def save(tmp: str) -> None:
        with open(tmp, "wb") as f:   # np.save on a path would append ".npy" to the temporary name
            np.save(f, np.ascontiguousarray(table), allow_pickle=False)
    atomic_write(embed_path, save)
    return VLMFiles(vision_path, folder / DECODER, embed_path, worst, info)


def tower_input(vision) -> dict:
    """{channels, image_size [H, W], mean, std} of a vision tower: its own ``in_channels``, ``image_size``,
    ``mean`` and ``std`` (a tower of pipeline/vlm/byo.py's contract), else the embedded VisionTower's: read off its
    patch convolution and square token grid, normalised as MNIST (what it is pre-trained on here)."""
    if all(hasattr(vision, a) for a in ("in_channels", "image_size", "mean", "std")):
        size = vision.image_size
        size = [int(size), int(size)] if isinstance(size, (int, float)) else [int(v) for v in size]
        mean, std = ([float(m) for m in (x if isinstance(x, (list, tuple)) else [x])] for x in (vision.mean,
                                                                                               vision.std))
        return {"channels": int(vision.in_channels), "image_size": size, "mean": mean, "std": std}
    conv = getattr(vision, "patch_embed", None)
    if conv is None or not hasattr(conv, "kernel_size"):
        raise ExportError(f"vlm: the vision tower {type(vision).__name__} has neither in_channels, image_size, "
                          f"mean and std nor a patch_embed convolution to read its input from")
    tokens = int(vision.num_tokens)
    side = math.isqrt(tokens)
    if side * side != tokens:
        raise ExportError(f"vlm: {tokens} visual tokens is not a square grid of patches")
    return {"channels": int(conv.in_channels), "image_size": [side * conv.kernel_size[0], side * conv.kernel_size[1]],
            "mean": list(MNIST_MEAN), "std": list(MNIST_STD)}


def vlm_facts(vlm, *, mean=None, std=None) -> dict:
    """What the runtime must know of ``vlm`` (vlm.json's model half): tokens_per_image, image_token (the prompt's
    placeholder) and image_token_id, hidden, image_size [H, W], channels, mean/std (edgerun.pixels.normalise's,
    the tower's training normalisation: tower_input's unless given), vocab, bos/eos/pad ids (pad: eos when the
    decoder's config has none), add_bos (the prompt starts with bos, as pipeline.textdata.encode trains it),
    context_length (the decoder's max positions)."""
    tower = tower_input(vlm.vision)
    mean, std = tower["mean"] if mean is None else mean, tower["std"] if std is None else std
    config = vlm.decoder.config
    channels = tower["channels"]
    if len(mean) not in (1, channels) or len(std) != len(mean):
        raise ExportError(f"vlm: mean {mean} / std {std} for {channels}-channel images")
    eos = [int(e) for e in np.atleast_1d(config.eos_token_id)]
    return {"tokens_per_image": int(vlm.tokens_per_image), "image_token": IMAGE_TOKEN,
            "image_token_id": int(vlm.image_token_id), "hidden": int(config.hidden_size),
            "image_size": tower["image_size"], "channels": channels,
            "mean": [float(m) for m in mean], "std": [float(s) for s in std], "vocab": int(config.vocab_size),
            "bos_token_id": int(config.bos_token_id), "eos_token_id": eos,
            "pad_token_id": int(eos[0] if config.pad_token_id is None else config.pad_token_id), "add_bos": True,
            "context_length": int(config.max_position_embeddings)}


def _image_embeds_module(vlm):
    """VLM.image_embeds as a module holding only the tower and the projector (a wrapper around the whole VLM
    would carry the decoder's weights into the traced program)."""
    import torch

    class ImageEmbeds(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.vision, self.projector = vlm.vision, vlm.projector

        def forward(self, pixels):
            return self.projector(self.vision.encode(pixels))
    return ImageEmbeds().eval()


def _export_vision(vlm, path: Path, facts: dict, opset: int, atol: float) -> float:
    """export_onnx into a private folder beside ``path``, the file compared with torch there, then renamed
    into place: ``path`` appears only proved."""
    import torch

    module = _image_embeds_module(vlm)
    shape = (facts["channels"], *facts["image_size"])
    rng = np.random.default_rng(0)
    example = torch.from_numpy(rng.standard_normal((1, *shape)).astype(np.float32))
    work = Path(tempfile.mkdtemp(prefix=".vision.", dir=path.parent))
    was_training = vlm.training
    try:
        tmp = work / path.name
        try:
            export_onnx(module, example, tmp, opset=opset, input_name="pixels", output_names=("image_embeds",),
                        check_batches=VISION_BATCHES)
        except ExportError as e:   # keep the exporter's log where the message says, not in the folder removed below
            log = tmp.with_name(tmp.name + ".export.log")
            if not log.is_file():
                raise
            kept = path.with_name(log.name)
            log.replace(kept)
            raise ExportError(str(e).replace(str(log), str(kept))) from e.__cause__
        pixels = rng.standard_normal((PARITY_ROWS, *shape)).astype(np.float32)
        with torch.no_grad():
            reference = vlm.image_embeds(torch.from_numpy(pixels)).numpy()   # the interface, not the copy
        from edgerun.ort import OrtRunner
        with OrtRunner(tmp) as runner:
            got = runner.infer({"pixels": pixels})["image_embeds"]
        expected = (PARITY_ROWS, facts["tokens_per_image"], facts["hidden"])
        if got.shape != expected:
            raise ExportError(f"{path.name}: image_embeds has shape {list(got.shape)}, expected {list(expected)}")
        worst = compare_outputs({"image_embeds": reference}, {"image_embeds": got})["max_abs"]
        if not worst <= atol * max(1.0, float(np.abs(reference).max())):
            raise ExportError(f"{path.name}: image embeddings differ from torch's by {worst:.3g} (max-abs); "
                              f"allowed {atol:g} x max(1, |embedding|)")
        tmp.replace(path)
    finally:
        vlm.train(was_training)
        shutil.rmtree(work, ignore_errors=True)
    return float(worst)
