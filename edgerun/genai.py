"""A decoder bundle folder: ``genai_config.json`` + ``tokenizer.json`` + ``tokenizer_config.json`` + the ONNX
file the config names. One file describes the model for both runtimes: onnxruntime-genai (0.18) reads
``genai_config.json`` as its model builder writes it (onnxruntime_genai/models/builders/base.py,
make_genai_config), and edgerun reads its eos/bos/pad ids, context length and file name from the same file.

``manifest.json`` lists every file of the bundle with its kind and sha256 (write_manifest); `generate` verifies it
before it reads anything (verify_manifest) with the classifier bundle's checks (edgerun.bundle, edgerun.verify):
every listed file present and as listed, no unlisted file, the one ONNX file the config names.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Mapping

from edgerun.errors import EdgeError, brief
from edgerun.io import atomic_write, write_json

GENAI_CONFIG = "genai_config.json"
TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
MANIFEST_FORMAT = 2     # 1: {name: sha256} only; 2: each file's kind (the runtime's own code, the model, its data)
MANIFEST_FIELDS = ("format", "task", "model", "files")


class BundleError(EdgeError):
    """A decoder bundle folder that is missing a file or has a config that cannot be read."""


def write_genai_config(folder, info: dict, *, context_length: int, eos_token_id, bos_token_id: int,
                       pad_token_id: int) -> Path:
    """Write ``folder/genai_config.json`` for the ONNX file ``info`` describes (export.decoder.export_decoder's
    return: path, model_type, num_layers, num_attention_heads, kv_heads, head_dim, hidden_size, vocab, embeds).

    ``eos_token_id``: one id or a list (a chat model's end-of-turn too). Greedy search by default; the past
    and present are separate buffers (the exported file concatenates, it does not write in place).
    """
    first = "inputs_embeds" if info.get("embeds") else "input_ids"
    eos = [int(e) for e in eos_token_id] if isinstance(eos_token_id, (list, tuple)) else int(eos_token_id)
    config = {
        "model": {
            "bos_token_id": int(bos_token_id),
            "context_length": int(context_length),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": []},
                "filename": Path(info["path"]).name,
                "head_size": int(info["head_dim"]),
                "hidden_size": int(info["hidden_size"]),
                "inputs": {first: first, "attention_mask": "attention_mask", "position_ids": "position_ids",
                           "past_key_names": "past_key_values.%d.key", "past_value_names": "past_key_values.%d.value"},
                "outputs": {"logits": "logits", "present_key_names": "present.%d.key",
                            "present_value_names": "present.%d.value"},
                "num_attention_heads": int(info["num_attention_heads"]),
                "num_hidden_layers": int(info["num_layers"]),
                "num_key_value_heads": int(info["kv_heads"]),
            },
            "eos_token_id": eos,
            "pad_token_id": int(pad_token_id),
            "type": info["model_type"],
            "vocab_size": int(info["vocab"]),
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": int(context_length), "min_length": 0, "no_repeat_ngram_size": 0, "num_beams": 1,
                   "num_return_sequences": 1, "past_present_share_buffer": False, "repetition_penalty": 1.0,
                   "temperature": 1.0, "top_k": 1, "top_p": 1.0},
    }
    return write_json(Path(folder) / GENAI_CONFIG, config)


def write_tokenizer(folder, tokenizer, *, add_bos_token: bool, context_length: int,
                    bos_token: str | None = None, eos_token: str | None = None, pad_token: str | None = None) -> None:
    """Write ``tokenizer.json`` (a tokenizers.Tokenizer, or the path of a tokenizer.json) and the
    ``tokenizer_config.json`` beside it that says whether a prompt starts with the bos token."""
    folder = Path(folder)
    text = Path(tokenizer).read_text() if isinstance(tokenizer, (str, Path)) else tokenizer.to_str()
    atomic_write(folder / TOKENIZER, text)
    config = {"add_bos_token": bool(add_bos_token), "add_eos_token": False, "model_max_length": int(context_length),
              "tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False}
    config.update({k: v for k, v in (("bos_token", bos_token), ("eos_token", eos_token), ("pad_token", pad_token))
                   if v is not None})
    write_json(folder / TOKENIZER_CONFIG, config)


@dataclass(frozen=True)
class DecoderBundle:
    """What edgerun needs of a bundle folder (read_bundle checks every file is there)."""
    folder: Path
    onnx: Path
    tokenizer_path: Path
    bos_token_id: int | None
    eos_token_ids: list[int]
    pad_token_id: int | None
    context_length: int
    add_bos: bool

    def tokenizer(self):
        try:
            from tokenizers import Tokenizer
        except ImportError as e:
            raise BundleError(f"the tokenizers library cannot be imported here ({brief(e)}): pip install tokenizers") \
                from None
        try:
            return Tokenizer.from_file(str(self.tokenizer_path))
        except Exception as e:
            raise BundleError(f"{self.tokenizer_path}: not a tokenizer.json the tokenizers library reads "
                              f"({brief(e)})") from None

    def encode(self, tokenizer, prompt: str) -> list[int]:
        """A prompt's ids: the tokenizer's encoding (its post-processor's special tokens included), with the
        bos id in front when tokenizer_config.json says add_bos_token and the encoding does not start with it."""
        if not prompt.strip():
            raise BundleError("the prompt is empty")
        ids = tokenizer.encode(prompt).ids
        if self.add_bos and self.bos_token_id is not None and ids[:1] != [self.bos_token_id]:
            ids = [self.bos_token_id, *ids]
        if not ids:
            raise BundleError(f"the prompt {prompt[:40]!r} has no tokens")
        return ids


def read_bundle(folder) -> DecoderBundle:
    """Read a decoder bundle folder; a missing file or a bad config is one line."""
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"{folder}: no such folder (a decoder bundle: {GENAI_CONFIG}, {TOKENIZER}, the ONNX file)")
    config = _read_json(folder / GENAI_CONFIG)
    try:
        model = config["model"]
        filename = model["decoder"]["filename"]
        eos = model["eos_token_id"]
        eos = [int(e) for e in eos] if isinstance(eos, list) else [int(eos)]
        context = int(model["context_length"])
        bos = None if model.get("bos_token_id") is None else int(model["bos_token_id"])
        pad = None if model.get("pad_token_id") is None else int(model["pad_token_id"])
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"{folder / GENAI_CONFIG}: not an onnxruntime-genai config (model.decoder.filename, "
                          f"model.eos_token_id, model.context_length: {brief(e)})") from None
    onnx = (folder / filename).resolve()
    if not onnx.is_relative_to(folder.resolve()) or not onnx.is_file():
        raise BundleError(f"{folder / GENAI_CONFIG}: names {filename!r}, which is not a file in the bundle")
    if not (folder / TOKENIZER).is_file():
        raise BundleError(f"{folder}: no {TOKENIZER} in the bundle")
    tok_config = _read_json(folder / TOKENIZER_CONFIG) if (folder / TOKENIZER_CONFIG).is_file() else {}
    return DecoderBundle(folder, onnx, folder / TOKENIZER, bos, eos, pad, context,
                         bool(tok_config.get("add_bos_token", False)))


def _read_json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: not readable JSON ({brief(e)})") from None
    if not isinstance(value, dict):
        raise BundleError(f"{path}: expected a JSON object, got {type(value).__name__}")
    return value


# ---------------------------------------------------------------- the manifest

@dataclass(frozen=True)
class DecoderManifest:
    """A decoder bundle's verified manifest (what edgerun.verify's listing checks read: bundle, files)."""
    bundle: Path
    model: str
    files: Mapping      # name -> edgerun.bundle.FileEntry


TASKS = ("generate", "vlm")   # a decoder bundle; a VLM bundle (edgerun/vlm.py), whose other .onnx files are parts
PART_KIND = "onnx-part"


def write_manifest(folder, *, model: str = "model.onnx", task: str = "generate") -> dict:
    """List every file under ``folder`` (bytecode caches aside) in ``folder/manifest.json`` with its kind and
    sha256: ``onnx`` the model (and any other .onnx file, which verify_manifest then refuses: one model per
    decoder bundle; a VLM bundle's other .onnx files are ``onnx-part``), ``onnx-data`` its external data,
    ``runtime`` edgerun/, else its top folder."""
    from edgerun.bundle import MANIFEST
    from edgerun.io import sha256_file
    from edgerun.verify import EXTERNAL_DATA_KIND, RUNTIME_KIND
    folder = Path(folder)
    data = set(_external_data(folder / model))
    files = {}
    for p in sorted(folder.rglob("*")):
        name = p.relative_to(folder).as_posix()
        if not p.is_file() or "__pycache__" in p.parts or name == MANIFEST:
            continue
        top = name.split("/")[0] if "/" in name else "config"
        kind = ("onnx" if name == model else PART_KIND if task == "vlm" and name.endswith(".onnx")
                else "onnx" if name.endswith(".onnx") else EXTERNAL_DATA_KIND if name in data
                else RUNTIME_KIND if top == "edgerun" else top)
        files[name] = {"kind": kind, "sha256": sha256_file(p)}
    if files.get(model, {}).get("kind") != "onnx":
        raise BundleError(f"{folder}: no model file {model!r} to list")
    if task not in TASKS:
        raise BundleError(f"manifest: task {task!r} is not one of {', '.join(TASKS)}")
    doc = {"format": MANIFEST_FORMAT, "task": task, "model": model, "files": files}
    write_json(folder / MANIFEST, doc)
    return doc


def _external_data(path: Path) -> list[str]:
    """The external data files of an ONNX file, relative to its folder (none without the onnx package: the
    packager has it)."""
    try:
        import onnx
    except ImportError:
        return []
    from edgerun.verify import external_locations
    return external_locations(onnx.load(str(path), load_external_data=False))


def verify_manifest(folder, task: str = "generate") -> DecoderManifest:
    """Check a decoder bundle against its manifest before anything in it is read: the format known, every listed
    file present with its sha256, no unlisted file, exactly one model (the ``onnx`` file the manifest names),
    the running runtime as listed when it is the bundle's. A mismatch is one BundleError line naming the file."""
    from edgerun.bundle import listed_files, read_document, verify_file
    from edgerun.verify import check_listing, verify_model, verify_running_runtime
    folder = Path(folder)
    if not folder.is_dir():
        raise BundleError(f"{folder}: no such folder (a decoder bundle: {GENAI_CONFIG}, {TOKENIZER}, the ONNX file)")
    doc, check = read_document(folder)
    check.only(doc, MANIFEST_FIELDS, "the manifest")
    if check.field(doc, "format", int) != MANIFEST_FORMAT:
        check.fail("format", f"{MANIFEST_FORMAT} (this runtime's; package the bundle again)", doc["format"])
    if check.field(doc, "task", str) != task:
        check.fail("task", f"{task!r} ({'a decoder' if task == 'generate' else 'a VLM'} bundle)", doc["task"])
    model = check.field(doc, "model", str)
    files = listed_files(check, folder, check.field(doc, "files", dict))
    parts = sorted(n for n, f in files.items() if f.kind == PART_KIND) if task == "vlm" else []
    models = sorted(n for n, f in files.items() if (f.kind == "onnx" or n.endswith(".onnx")) and n not in parts)
    if models != [model]:
        check.fail("files", f"one ONNX model, {model!r} (kind 'onnx')", models)
    manifest = DecoderManifest(folder, model, MappingProxyType(files))
    check_listing(manifest)
    verify_running_runtime(manifest)
    for name in (model, *parts):
        verify_model(manifest, name)
    for name in files:
        verify_file(folder, manifest, name)
    return manifest
