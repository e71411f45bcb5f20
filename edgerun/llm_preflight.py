"""Static check of a decoder's shapes against a target's kernel limits: can the device run this model?

A pruner that changes head counts or MLP widths can make a model the device's attention or INT4 kernels do
not take (TensorRT Edge-LLM's FMHA/XQA kernels exist for a few head sizes and Q/KV ratios; INT4 weights are
grouped along in_features). The limits are data (``llm_limits.json``, one entry per target, with its source);
this module reads a Hugging Face config dict and lists what breaks them. No torch: it runs anywhere.
"""
from __future__ import annotations

import functools
import json
from pathlib import Path

from edgerun.errors import EdgeError

LIMITS_PATH = Path(__file__).with_name("llm_limits.json")


@functools.lru_cache(maxsize=None)
def _limits() -> dict:
    return json.loads(LIMITS_PATH.read_text())["targets"]


def targets() -> tuple[str, ...]:
    """The targets the limits table knows."""
    return tuple(sorted(_limits()))


def limits(target: str) -> dict:
    """The limits of ``target`` (see llm_limits.json); an unknown target is a one-line EdgeError."""
    table = _limits()
    if target not in table:
        raise EdgeError(f"unknown decoder target {target!r} (known: {', '.join(sorted(table))})")
    return table[target]


def default_int4_group(target: str) -> int:
    return int(limits(target)["int4_group_default"])


def _int(config: dict, key: str) -> int:
    value = config.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise EdgeError(f"decoder config: {key} must be a positive integer, got {value!r}")
    return value


def _kv_heads(config: dict, heads: int) -> tuple[int, list[str]]:
    """The KV-head count and, where the config gives one per layer, the problem of unequal counts."""
    kv = config.get("num_key_value_heads")
    if kv is None:
        return heads, []
    if isinstance(kv, (list, tuple)):
        counts = sorted(set(kv))
        if not counts or not all(isinstance(c, int) and c > 0 for c in counts):
            raise EdgeError(f"decoder config: num_key_value_heads must hold positive integers, got {kv!r}")
        if len(counts) > 1:
            return counts[0], [f"KV-head count differs between layers ({counts}): every layer must have the same"]
        return counts[0], []
    return _int(config, "num_key_value_heads"), []


def group_problem(target: str, group: int) -> str | None:
    """Why ``group`` is not an INT4 group size ``target`` accepts, or None."""
    lim = limits(target)
    if "int4_groups" in lim and group not in lim["int4_groups"]:
        return f"INT4 group size {group} is not one {target} documents ({lim['int4_groups']})"
    if lim.get("int4_group_rule") == "power_of_two_min_16" and (group < 16 or group & (group - 1)):
        return f"INT4 group size {group} must be a power of two >= 16 on {target}"
    return None


def check_decoder_shapes(config: dict, target: str, *, int4_group: int | None = None) -> list[str]:
    """The problems that keep ``target`` from running a decoder with this Hugging Face ``config`` dict
    (hidden_size, intermediate_size, num_attention_heads, num_key_value_heads, head_dim, num_hidden_layers);
    empty when it can. ``int4_group``: the INT4 group size the weights will be quantized with (None: no INT4)."""
    lim = limits(target)
    hidden = _int(config, "hidden_size")
    inter = _int(config, "intermediate_size")
    heads = _int(config, "num_attention_heads")
    _int(config, "num_hidden_layers")
    head_dim = _int(config, "head_dim") if config.get("head_dim") is not None else hidden // heads
    if head_dim <= 0:
        raise EdgeError(f"decoder config: head_dim is 0 ({hidden} hidden / {heads} heads) and not given")
    kv, problems = _kv_heads(config, heads)
    if not lim.get("uniform_kv_heads", False):
        problems = []
    if heads % kv:
        problems.append(f"{heads} query heads are not a whole multiple of {kv} KV heads")
    ratio = heads // kv
    if "context_head_sizes" in lim and head_dim not in lim["context_head_sizes"]:
        problems.append(f"head_dim {head_dim} has no context-attention kernel on {target} "
                        f"(sizes {lim['context_head_sizes']})")
    if "decode_head_sizes" in lim and head_dim not in lim["decode_head_sizes"]:
        problems.append(f"head_dim {head_dim} has no decode (XQA) kernel on {target} "
                        f"(sizes {lim['decode_head_sizes']})")
    if "q_per_kv" in lim and not heads % kv:
        low, high = lim["q_per_kv"]
        if not low <= ratio <= high:
            problems.append(f"Q/KV head ratio {ratio} ({heads}/{kv}) is outside {low}-{high} on {target}")
    if int4_group is not None:
        why = group_problem(target, int4_group)
        if why:
            problems.append(why)
        ins = {"hidden_size (q/k/v/gate/up in_features)": hidden, "intermediate_size (down in_features)": inter,
               "heads*head_dim (o_proj in_features)": heads * head_dim}
        problems += [f"{name} {n} is not a multiple of the INT4 group {int4_group}"
                     for name, n in ins.items() if n % int4_group]
    return problems
