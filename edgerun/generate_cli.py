"""The `generate` verb: text from a decoder bundle folder (genai_config.json, tokenizer.json, the ONNX file),
or from a VLM bundle (vlm.json: edgerun.vlm) with `--image FILE` once per `<image>` in the prompt.

`--prompt TEXT`: streams the new text to stdout as it comes (`--format text`), or prints one JSON object
(tokens, text, ttft_s, decode_tokens_per_s, stop_reason). `--eval FILE.jsonl`: greedy answers to records
{"prompt": ..., "answer": ...}, scored by edgerun.generate.exact_match; prints a JSON summary. The bundle is
verified against its manifest.json first (edgerun.genai.verify_manifest).
Exit 0 done, 1 a user error (one line).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgerun.errors import EdgeError, brief
from edgerun.genai import read_bundle, verify_manifest
from edgerun.generate import DecoderSession, check_sampling, exact_match, generate, greedy_batch
from edgerun.readers import read_image
from edgerun.vlm import VLMSession, is_vlm_bundle
from edgerun.vlm_sample import evaluate, read_records


def add_generate_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("generate", help="generate text with a decoder bundle (onnxruntime, KV cache)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="a decoder bundle folder (genai_config.json, tokenizer.json, ONNX)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="the prompt text")
    what.add_argument("--eval", help="a .jsonl file of {\"prompt\": ..., \"answer\": ...}: exact-match of "
                                     "greedy answers")
    p.add_argument("--image", action="append", default=[], metavar="FILE",
                   help="an image for a VLM bundle, once per <image> in the prompt, in order")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy (default)")
    p.add_argument("--top-k", type=int, default=0, help="sample among the k most likely (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the smallest set holding this probability")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded at once with --eval")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its choice)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    return p


def run_generate(args) -> int:
    check_sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                   top_p=args.top_p)
    if args.batch_size < 1 or args.threads < 0:
        raise EdgeError(f"--batch-size must be >= 1 and --threads >= 0 (got {args.batch_size}, {args.threads})")
    if is_vlm_bundle(args.bundle):
        return _run_vlm(args)
    if args.image:
        raise EdgeError(f"{args.bundle}: a text-only decoder bundle (no vlm.json) takes no --image")
    manifest = verify_manifest(args.bundle)      # before anything in the bundle is read
    bundle = read_bundle(args.bundle)
    if bundle.onnx != (manifest.bundle / manifest.model).resolve():
        raise EdgeError(f"{args.bundle}: genai_config.json names {bundle.onnx.name}, the manifest's model is "
                        f"{manifest.model}: refused")
    tokenizer = bundle.tokenizer()
    if args.eval is not None:
        records = _read_records(Path(args.eval))
        prompts = [bundle.encode(tokenizer, r["prompt"]) for r in records]
        session = DecoderSession(bundle.onnx, threads=args.threads)
        pad = bundle.pad_token_id if bundle.pad_token_id is not None else bundle.eos_token_ids[0]
        answers = greedy_batch(session, prompts, max_new_tokens=args.max_new_tokens,
                               eos_token_id=bundle.eos_token_ids, pad_token_id=pad, batch_size=args.batch_size)
        hits = sum(exact_match(tokenizer.decode(a, skip_special_tokens=True), r["answer"])
                   for a, r in zip(answers, records, strict=True))
        print(json.dumps({"n": len(records), "exact_match": round(100.0 * hits / len(records), 2),
                          "matched": hits}))
        return 0
    ids = bundle.encode(tokenizer, args.prompt)
    session = DecoderSession(bundle.onnx, threads=args.threads)
    stream = _TextStream(tokenizer) if args.format == "text" else None
    result = generate(session, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                      top_k=args.top_k, top_p=args.top_p, seed=args.seed, eos_token_id=bundle.eos_token_ids,
                      context_length=bundle.context_length, on_token=stream, tokenizer=tokenizer)
    if stream is None:
        print(json.dumps(result.as_dict()))
    else:
        print(flush=True)
    return 0


def _run_vlm(args) -> int:
    verify_manifest(args.bundle, task="vlm")      # before anything in the bundle is read
    session = VLMSession(args.bundle, threads=args.threads)
    if args.eval is not None:
        if args.image:
            raise EdgeError("--image is for --prompt; --eval records name their own images")
        result = evaluate(session, read_records(args.eval), max_new_tokens=args.max_new_tokens,
                          batch_size=args.batch_size)
        print(json.dumps(result.as_dict()))
        return 0
    c = session.config
    images = [read_image(p, c.image_size, c.channels) for p in args.image]
    stream = _TextStream(session.tokenizer) if args.format == "text" else None
    result = session.answer(images, args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, on_token=stream)
    print(json.dumps(result.as_dict()) if stream is None else "", flush=True)
    return 0


class _TextStream:
    """Prints the new text as tokens come: the decoding of all tokens so far, less what was printed
    (a word-piece or byte-level token alone does not decode to its share of the text)."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.shown = tokenizer, [], ""

    def __call__(self, token: int) -> None:
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.startswith(self.shown) and len(text) > len(self.shown):
            sys.stdout.write(text[len(self.shown):])
            sys.stdout.flush()
            self.shown = text


def _read_records(path: Path) -> list[dict]:
    try:
        lines = path.read_text().splitlines()
    except FileNotFoundError:
        raise EdgeError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise EdgeError(f"{path}: cannot read it ({brief(e)})") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise EdgeError(f"{path}:{n}: not a JSON line ({e.msg})") from None
        if (not isinstance(record, dict) or not isinstance(record.get("prompt"), str)
                or not isinstance(record.get("answer"), str) or not record["prompt"].strip()):
            raise EdgeError(f"{path}:{n}: expected {{\"prompt\": non-empty text, \"answer\": text}}")
        records.append(record)
    if not records:
        raise EdgeError(f"{path}: no records")
    return records
