"""What the latency numbers mean: realized speedups from the protocol's interleaved ratios.

``speedup_table(rows, repeats, tolerance=)`` pairs every latency row with (a) the unpruned
reference of its backend family and (b) its parent in the lineage (``PARENT``), and reads each
pair's ratio from the interleaved comparisons (edgerun.timing.Repeated) in which both were timed.
Absolute p50s of rows timed at different moments are never divided: where two artifacts were not
compared together, the entry says None. Keys of each entry are listed in pipeline.profile.
"""
from __future__ import annotations

from typing import Iterable

from edgerun.sessions import GPU_BACKENDS  # noqa: F401 - one list, in the runtime; profile and report read it here
from edgerun.timing import PairRatio, Repeated
from pipeline.records import ROLES

ROLE_ORDER = ROLES
BACKEND_ORDER = ("torch-cpu", "onnxruntime-cpu", "torch-cuda", "onnxruntime-cuda", "onnxruntime-tensorrt",
                 "tensorrt")

# Which artifact each one should beat (same backend, same batch).
PARENT = {"pruned-torch": "baseline-torch", "onnx-fp32": "baseline-onnx", "onnx-fp16": "onnx-fp32",
          "onnx-int8": "onnx-fp32", "onnx-int8-trt": "onnx-fp32", "engine-fp16": "engine-fp32",
          "engine-int8": "engine-fp32"}


def run_name(artifact: str, backend: str) -> str:
    """The name an artifact on a backend has inside a comparison."""
    return f"{artifact} @ {backend}"


def role(row: dict) -> str:
    """The lineage role of a latency row; rows older than pipeline.records carry no role."""
    if row.get("role"):
        return row["role"]
    kind, prec, name = row.get("kind"), row.get("precision") or "fp32", row.get("file") or ""
    if kind is None:
        kind = ("torch" if (row.get("backend") or "").startswith("torch") or name.endswith((".pt", ".safetensors"))
                else "onnx" if name.endswith(".onnx") else "engine")
    if kind == "torch":
        return "baseline-torch" if row.get("stage") == "baseline" else "pruned-torch"
    if kind == "onnx":
        return "baseline-onnx" if row.get("stage") == "profile" else f"onnx-{prec}"
    return f"{kind}-{prec}"


def reference_of(row_role: str, backend: str) -> tuple[str, str] | None:
    """(role, backend) of the unpruned artifact a row is measured against."""
    if backend.startswith("torch"):
        return "baseline-torch", backend
    if backend.startswith("onnxruntime"):
        return "baseline-onnx", backend
    if backend == "tensorrt":   # no unpruned engine is built: its ONNX on onnxruntime's TensorRT EP
        return "baseline-onnx", "onnxruntime-tensorrt"
    return None


def _order(r: dict):
    rl = role(r)
    return (BACKEND_ORDER.index(r["backend"]) if r["backend"] in BACKEND_ORDER else 99,
            ROLE_ORDER.index(rl) if rl in ROLE_ORDER else 99, r["artifact"], r["batch"])


def _r(v, nd=4):
    return None if v is None else round(float(v), nd)


def speedup_table(rows: list[dict], repeats: Iterable[Repeated], *, tolerance: float = 0.05) -> list[dict]:
    """One entry per latency row: speedup vs the unpruned reference and vs its parent, from ratios."""
    by_role = {(role(r), r["backend"], r["batch"]): r for r in rows}
    where = {(name, rep.batch): rep for rep in repeats for name in rep.comparisons[0].names}
    base_macs = next((r.get("macs") for rl in ("baseline-torch", "baseline-onnx") for r in rows
                      if role(r) == rl and r.get("macs")), None)

    def pair(row: dict, other: dict | None) -> PairRatio | None:
        if other is None:
            return None
        a, b = run_name(row["artifact"], row["backend"]), run_name(other["artifact"], other["backend"])
        rep = where.get((a, row["batch"]))
        if rep is None or rep is not where.get((b, row["batch"])):
            return None   # not timed in one interleaved comparison: no honest ratio
        return rep.pair(a, b)

    out = []
    for r in sorted(rows, key=_order):
        rl, backend, b = role(r), r["backend"], r["batch"]
        ref_key = reference_of(rl, backend)
        ref = by_role.get((ref_key[0], ref_key[1], b)) if ref_key else None
        parent = by_role.get((PARENT[rl], backend, b)) if rl in PARENT else None
        busy = r.get("oversubscribed") or (ref or {}).get("oversubscribed") or (parent or {}).get("oversubscribed")
        vs_ref = None if busy else pair(r, ref)
        vs_parent = None if busy else pair(r, parent)
        # speedup = reference time / this time = 1 / ratio, so the ratio's p90 is the speedup's p10
        speedup = (1.0, 1.0, 1.0) if ref is r and not busy else \
            (1 / vs_ref.median, 1 / vs_ref.p90, 1 / vs_ref.p10) if vs_ref else (None, None, None)
        par = (1 / vs_parent.median, 1 / vs_parent.p90, 1 / vs_parent.p10) if vs_parent else (None, None, None)
        pairs = [p for p in (vs_ref, vs_parent) if p]
        repro = [p.reproducible for p in pairs]
        macs = r.get("macs")
        mac_ratio = base_macs / macs if base_macs and macs else None
        slower = None if vs_parent is None else vs_parent.median > 1.0 + tolerance
        flags = []
        if busy:
            flags.append(f"oversubscribed ({busy}): not presented as a speedup")
        if slower:
            flags.append(f"slower than its parent {parent['artifact']} on {backend} at batch {b}: "
                         f"{vs_parent.median:.2f}x the time (p10-p90 {vs_parent.p10:.2f}-{vs_parent.p90:.2f}, "
                         f"{vs_parent.processes} process(es))")
        for p in pairs:
            if p.reproducible is False:
                flags.append(f"{p.name} vs {p.to} not reproducible across {p.processes} processes "
                             f"(max/min of their medians {p.spread:.2f})")
        out.append({
            "artifact": r["artifact"], "role": rl, "backend": backend, "batch": b, "p50_ms": r["p50_ms"],
            "reference": ref["artifact"] if ref else None, "reference_backend": ref["backend"] if ref else None,
            "speedup": _r(speedup[0]), "speedup_p10": _r(speedup[1]), "speedup_p90": _r(speedup[2]),
            "ratio_p50_ms": _r(vs_ref.p50_ms, 6) if vs_ref else None,
            "reference_p50_ms": _r(vs_ref.to_p50_ms, 6) if vs_ref else None,
            "parent": parent["artifact"] if parent else None,
            "vs_parent": _r(par[0]), "vs_parent_p10": _r(par[1]), "vs_parent_p90": _r(par[2]),
            "parent_p50_ms": _r(vs_parent.to_p50_ms, 6) if vs_parent else None,
            "slower_than_parent": slower,
            "processes": max((p.processes for p in pairs), default=None),
            "reproducible": False if False in repro else True if repro and all(repro) else None,
            "macs": macs, "mac_ratio": _r(mac_ratio),
            "efficiency": _r(speedup[0] / mac_ratio) if speedup[0] and mac_ratio else None,
            "oversubscribed": busy or None,
            "flag": "; ".join(flags) or None,
        })
    return out
