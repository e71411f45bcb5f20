"""A vision-language model bundle and its torch-free session: images and a prompt in, text out.

    session = VLMSession("bundle")
    g = session.answer([read_image("a.png", (28, 28), 1)], "<image> what digit is this ?")
    print(g.text)                                    # greedy by default; temperature/top_k/top_p/seed sample

Bundle layout (a folder; the pipeline's package stage writes it, export.vlm.export_vlm the model files):
  ``vlm.json``          what the runtime must know (VLMConfig): tokens_per_image, image_token ("<image>") and
                        image_token_id, hidden, image_size [H, W], channels, mean/std (edgerun.pixels.normalise),
                        vocab, bos/eos/pad ids, add_bos, context_length, and ``prompt_templates`` {kind: the prompt
                        the model was trained on, e.g. "digit": "<image> what digit is this ?"} so a user can ask
                        about their own images the way the model understands
  ``vision.onnx``       normalised pixels ``pixels`` [n, C, H, W] -> ``image_embeds`` [n, tokens_per_image, hidden]
  ``model.onnx``        the decoder, first input ``inputs_embeds`` (export.decoder's layout, onnxruntime-genai's names)
  ``embed_tokens.npy``  the decoder's token embedding table, float32 [vocab, hidden]
  ``tokenizer.json``    a tokenizers.Tokenizer that encodes ``image_token`` as ``image_token_id``
  ``sample.jsonl`` + ``sample/*.png``  records {"images": ["sample/7.png"], "prompt", "answer", "kind"}: the
                        bundle's own check (``python -m edgerun eval --bundle DIR``); edgerun.vlm_sample
  ``manifest.json``     the files' sha256 and the run's figures (the package stage's)

How a prompt runs (the layout pipeline.models.vlm.VLM trains): the prompt is encoded (bos first when add_bos),
each ``<image>`` becomes tokens_per_image copies of image_token_id, the images are normalised and run through
vision.onnx at once, the token ids become rows of the embedding table and the image positions take the images'
tokens in order of appearance; the decoder is prefilled with those embeddings, then every new token enters as its
row of the table (edgerun.generate: the one generation loop of text and vision-language decoders).
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from edgerun.errors import EdgeError, brief
from edgerun.generate import DecoderSession, Generation, generate, greedy_batch
from edgerun.io import write_json
from edgerun.ort import OrtError, OrtRunner
from edgerun.pixels import normalise

IMAGE_TOKEN = "<image>"
VLM_JSON, VISION, DECODER, EMBEDDINGS, TOKENIZER = "vlm.json", "vision.onnx", "model.onnx", "embed_tokens.npy", \
    "tokenizer.json"
SAMPLE, SAMPLE_DIR = "sample.jsonl", "sample"
VISION_BATCH = 64          # images per vision.onnx run (bounds its activations, not its answers)


class VLMError(EdgeError):
    """A bad VLM bundle, prompt or image."""


@dataclass(frozen=True)
class VLMConfig:
    """vlm.json, checked."""
    tokens_per_image: int
    image_token: str
    image_token_id: int
    hidden: int
    image_size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    vocab: int
    bos_token_id: int
    eos_token_id: tuple[int, ...]
    pad_token_id: int
    add_bos: bool
    context_length: int
    prompt_templates: dict[str, str]

    @classmethod
    def from_dict(cls, d: dict, where: str) -> VLMConfig:
        ints = ("tokens_per_image", "image_token_id", "hidden", "channels", "vocab", "bos_token_id", "pad_token_id",
                "context_length")
        try:
            bad = [k for k in ints if isinstance(d[k], bool) or not isinstance(d[k], int) or d[k] < 0]
            bad += [k for k in ("tokens_per_image", "hidden", "vocab", "context_length") if d[k] == 0]
            size, eos = [int(v) for v in d["image_size"]], [int(v) for v in np.atleast_1d(d["eos_token_id"])]
            mean, std = [float(v) for v in d["mean"]], [float(v) for v in d["std"]]
            templates = d.get("prompt_templates", {})
            if d["channels"] not in (1, 3) or len(size) != 2 or min(size) < 1:
                bad.append("channels/image_size")
            if len(mean) not in (1, d["channels"]) or len(std) != len(mean) or min(std) <= 0:
                bad.append("mean/std")
            if not isinstance(d["image_token"], str) or not d["image_token"]:
                bad.append("image_token")
            if not isinstance(templates, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                          for k, v in templates.items()):
                bad.append("prompt_templates")
        except (KeyError, TypeError, ValueError) as e:
            raise VLMError(f"{where}: not a VLM config ({brief(e)})") from None
        if bad:
            raise VLMError(f"{where}: bad {', '.join(bad)}")
        return cls(d["tokens_per_image"], d["image_token"], d["image_token_id"], d["hidden"], (size[0], size[1]),
                   d["channels"], tuple(mean), tuple(std), d["vocab"], d["bos_token_id"], tuple(eos),
                   d["pad_token_id"], bool(d.get("add_bos", True)), d["context_length"], dict(templates))

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {**d, "image_size": list(self.image_size), "mean": list(self.mean), "std": list(self.std),
                "eos_token_id": list(self.eos_token_id)}


def write_vlm_json(folder, facts: dict, prompt_templates: dict[str, str]) -> Path:
    """``folder/vlm.json`` from export.vlm.vlm_facts' dict and the prompt templates per kind, checked as
    read_vlm_config checks it."""
    config = VLMConfig.from_dict({**facts, "prompt_templates": prompt_templates}, VLM_JSON)
    return write_json(Path(folder) / VLM_JSON, config.as_dict())


def is_vlm_bundle(folder) -> bool:
    return (Path(folder) / VLM_JSON).is_file()


def read_vlm_config(folder) -> VLMConfig:
    path = Path(folder) / VLM_JSON
    try:
        d = json.loads(path.read_text())
    except FileNotFoundError:
        raise VLMError(f"{path}: no such file (not a VLM bundle)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise VLMError(f"{path}: not readable JSON ({brief(e)})") from None
    if not isinstance(d, dict):
        raise VLMError(f"{path}: expected a JSON object")
    return VLMConfig.from_dict(d, str(path))


class VLMSession:
    """The bundle's four model files in onnxruntime (CPU) and numpy. ``threads``: onnxruntime intra-op threads."""

    def __init__(self, folder, *, threads: int = 0):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise VLMError(f"{self.folder}: no such folder (a VLM bundle: {VLM_JSON}, {VISION}, {DECODER}, ...)")
        self.config = c = read_vlm_config(self.folder)
        missing = [f for f in (VISION, DECODER, EMBEDDINGS, TOKENIZER) if not (self.folder / f).is_file()]
        if missing:
            raise VLMError(f"{self.folder}: no {', '.join(missing)} in the VLM bundle")
        try:
            table = np.load(self.folder / EMBEDDINGS, allow_pickle=False)
        except (OSError, ValueError) as e:
            raise VLMError(f"{self.folder / EMBEDDINGS}: not a numpy array file ({brief(e)})") from None
        if table.shape != (c.vocab, c.hidden):
            raise VLMError(f"{self.folder / EMBEDDINGS}: shape {list(table.shape)}, vlm.json says "
                           f"[{c.vocab}, {c.hidden}]")
        self.decoder = DecoderSession(self.folder / DECODER, threads=threads, embed_tokens=table)
        if not self.decoder.embeds:
            raise VLMError(f"{self.folder / DECODER}: takes input_ids; a VLM decoder takes inputs_embeds")
        self.vision = OrtRunner(self.folder / VISION, threads=threads)
        if self.vision.input_names != ["pixels"] or self.vision.output_names != ["image_embeds"]:
            raise VLMError(f"{self.folder / VISION}: expected pixels -> image_embeds, it has "
                           f"{self.vision.input_names} -> {self.vision.output_names}")
        self.tokenizer = _tokenizer(self.folder / TOKENIZER)
        if self.tokenizer.token_to_id(c.image_token) != c.image_token_id:
            raise VLMError(f"{self.folder / TOKENIZER}: encodes {c.image_token} as "
                           f"{self.tokenizer.token_to_id(c.image_token)}, vlm.json says {c.image_token_id}")

    def prompt_ids(self, prompt: str, n_images: int) -> list[int]:
        """The prompt's ids, each image placeholder expanded to tokens_per_image image tokens; one line when
        the prompt's placeholder count is not ``n_images``."""
        c = self.config
        if not isinstance(prompt, str) or not prompt.strip():
            raise VLMError("the prompt is empty")
        count = prompt.count(c.image_token)
        if count != n_images:
            raise VLMError(f"the prompt has {count} {c.image_token} placeholder(s) for {n_images} image(s): "
                           f"put one {c.image_token} where each image goes")
        ids = self.tokenizer.encode(prompt, add_special_tokens=False).ids
        if ids.count(c.image_token_id) != count:
            raise VLMError(f"the tokenizer gives {ids.count(c.image_token_id)} image tokens for {count} "
                           f"{c.image_token} (write {c.image_token} apart from other text)")
        out = [c.bos_token_id] if c.add_bos else []
        for i in ids:
            out.extend([i] * c.tokens_per_image if i == c.image_token_id else [i])
        if len(out) >= c.context_length:
            raise VLMError(f"the prompt is {len(out)} tokens with its images, the context holds {c.context_length}")
        return out

    def check_images(self, images: Sequence[np.ndarray]) -> None:
        """One line for an image that is not uint8 [channels, height, width] of the model's size."""
        want = (self.config.channels, *self.config.image_size)
        for i, im in enumerate(images):
            if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.shape != want:
                what = f"{im.dtype} {list(im.shape)}" if isinstance(im, np.ndarray) else type(im).__name__
                raise VLMError(f"image {i}: {what}, expected uint8 {list(want)} (channels, height, width)")

    def image_embeds(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """uint8 [C, H, W] images -> [n, tokens_per_image, hidden] (vision.onnx, VISION_BATCH images a run)."""
        c = self.config
        self.check_images(images)
        if not len(images):
            return np.zeros((0, c.tokens_per_image, c.hidden), np.float32)
        pixels = normalise(np.stack(images), c.mean, c.std)
        try:
            out = np.concatenate([self.vision.infer({"pixels": pixels[at:at + VISION_BATCH]})["image_embeds"]
                                  for at in range(0, len(pixels), VISION_BATCH)])
        except OrtError as e:
            raise VLMError(f"{VISION}: {brief(e)}") from None
        if out.shape != (len(images), c.tokens_per_image, c.hidden):
            raise VLMError(f"{VISION}: gave {list(out.shape)} for {len(images)} images, expected "
                           f"[n, {c.tokens_per_image}, {c.hidden}]")
        return out

    def embed(self, ids: Sequence[int], visual: np.ndarray) -> np.ndarray:
        """[len(ids), hidden]: the table's rows, image positions replaced by ``visual``'s tokens in order."""
        ids = np.asarray(ids, np.int64)
        embeds = self.decoder.feed(ids)        # a gather: a new array, safe to write into
        at = ids == self.config.image_token_id
        embeds[at] = np.asarray(visual, embeds.dtype).reshape(-1, self.config.hidden)
        return embeds

    def prompt(self, images: Sequence[np.ndarray], prompt: str) -> tuple[list[int], np.ndarray]:
        """(ids, embeddings) of one prompt with its images."""
        ids = self.prompt_ids(prompt, len(images))
        return ids, self.embed(ids, self.image_embeds(images))

    def answer(self, images: Sequence[np.ndarray], prompt: str, *, max_new_tokens: int = 32,
               temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
               on_token: Callable[[int], object] | None = None) -> Generation:
        """Generate after ``prompt`` with ``images`` (one per placeholder, in order); ttft_s includes the vision
        model's run."""
        start = time.perf_counter()
        ids, embeds = self.prompt(images, prompt)
        vision_s = time.perf_counter() - start
        g = generate(self.decoder, ids, prompt_embeds=embeds, max_new_tokens=max_new_tokens,
                     temperature=temperature, top_k=top_k, top_p=top_p, seed=seed, on_token=on_token,
                     eos_token_id=list(self.config.eos_token_id), context_length=self.config.context_length,
                     tokenizer=self.tokenizer)
        return dataclasses.replace(g, ttft_s=g.ttft_s + vision_s)

    def greedy(self, items: Sequence[tuple[Sequence[np.ndarray], str]], *, max_new_tokens: int = 32,
               batch_size: int = 16) -> list[list[int]]:
        """Greedy new ids for each (images, prompt), decoded batch_size at a time (generate.greedy_batch: what
        each gets alone); the images of all items go through vision.onnx together."""
        prompts = []
        for n, (ims, p) in enumerate(items):
            try:
                prompts.append(self.prompt_ids(p, len(ims)))
                self.check_images(ims)
            except VLMError as e:
                raise VLMError(f"item {n}: {e}") from None
        visual = self.image_embeds([im for ims, _ in items for im in ims])
        embeds, at = [], 0
        for (ims, _), ids in zip(items, prompts, strict=True):
            embeds.append(self.embed(ids, visual[at:at + len(ims)]))
            at += len(ims)
        return greedy_batch(self.decoder, prompts, prompts_embeds=embeds, max_new_tokens=max_new_tokens,
                            eos_token_id=list(self.config.eos_token_id), pad_token_id=self.config.pad_token_id,
                            batch_size=batch_size)

    def decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(list(tokens), skip_special_tokens=True)


def _tokenizer(path: Path):
    try:
        from tokenizers import Tokenizer
    except ImportError as e:
        raise VLMError(f"the tokenizers library cannot be imported here ({brief(e)}): pip install tokenizers") \
            from None
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:
        raise VLMError(f"{path}: not a tokenizer.json the tokenizers library reads ({brief(e)})") from None
