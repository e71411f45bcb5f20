"""The `eval` verb: exact-match of a VLM bundle's greedy answers, per kind and overall.

`python -m edgerun eval --bundle DIR [--data FILE.jsonl]`: the bundle's own sample (sample.jsonl and sample/*.png)
by default, or the user's records ({"images": [paths relative to the file], "prompt", "answer", "kind"}).
Prints one line per kind and the overall figure, or one JSON object with --format json. Exit 0 done, 1 a user
error (one line).
"""
from __future__ import annotations

import json
from pathlib import Path

from edgerun.errors import EdgeError
from edgerun.vlm import SAMPLE, VLMSession, is_vlm_bundle
from edgerun.vlm_sample import evaluate, read_records


def add_eval_parser(subparsers):
    p = subparsers.add_parser("eval", help="exact-match of a VLM bundle's answers (its sample, or --data)",
                              description=__doc__.splitlines()[0])
    p.add_argument("--bundle", required=True, help="a VLM bundle folder (vlm.json, vision.onnx, model.onnx, ...)")
    p.add_argument("--data", default=None, help=f"a .jsonl of records (default: the bundle's {SAMPLE})")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16, help="prompts decoded at once")
    p.add_argument("--threads", type=int, default=0, help="onnxruntime intra-op threads (0: its choice)")
    p.add_argument("--format", choices=("text", "json"), default="text")
    return p


def run_eval(args) -> int:
    if args.max_new_tokens < 1 or args.batch_size < 1 or args.threads < 0:
        raise EdgeError(f"--max-new-tokens and --batch-size must be >= 1 and --threads >= 0 (got "
                        f"{args.max_new_tokens}, {args.batch_size}, {args.threads})")
    bundle = Path(args.bundle)
    if not is_vlm_bundle(bundle):
        raise EdgeError(f"{bundle}: not a VLM bundle (no vlm.json); a decoder bundle is scored with "
                        f"`generate --bundle {bundle} --eval FILE.jsonl`")
    from edgerun.genai import verify_manifest
    verify_manifest(bundle, task="vlm")      # before anything in the bundle is read
    data = Path(args.data) if args.data is not None else bundle / SAMPLE
    records = read_records(data)
    result = evaluate(VLMSession(bundle, threads=args.threads), records, max_new_tokens=args.max_new_tokens,
                      batch_size=args.batch_size)
    if args.format == "json":
        print(json.dumps({"data": str(data), **result.as_dict()}))
        return 0
    for kind, s in sorted(result.kinds.items()):
        print(f"{kind:<14} {s.exact_match:6.2f} % exact-match ({s.matched}/{s.n})")
    print(f"{'overall':<14} {result.overall.exact_match:6.2f} % exact-match ({result.overall.matched}/"
          f"{result.overall.n}) on {data}")
    return 0
