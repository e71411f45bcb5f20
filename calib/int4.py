"""INT4 weight compression of ONNX decoders with NNCF, in the form each runtime runs.

Symmetric INT4 weights in groups along in_features (``nncf.compress_weights``, mode INT4_SYM), with
AWQ and scale estimation when a dataset is given. NNCF keeps the embedding and the LM head in its
backup precision (INT8 symmetric per channel, or float with ``backup="none"``): they are the layers
its authors found most sensitive. NNCF's ONNX backend writes the form from the model's opset:

- form "ort": below opset 21, each MatMul becomes ``com.microsoft::MatMulNBits`` (onnxruntime's
  4-bit CPU kernel). An input at opset >= 21 is converted down to 20 first.
- form "trt": at opset >= 21, a blocked ``DequantizeLinear`` of an INT4 initializer feeds the MatMul
  (standard ONNX; TensorRT's weight-only INT4). An input below 21 is converted up to 21 first.
  Symmetric throughout: TensorRT refuses non-zero zero points.

``check_int4_form`` is the static gate for both forms. The result is written (atomically) only after
the check passes and one real inference in onnxruntime gives finite outputs.
nncf and onnx are imported inside the functions: they take seconds.
"""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import numpy as np

from calib import qdq
from calib.errors import CalibError
from edgerun.errors import brief
from edgerun.io import atomic_write

FORMS = ("ort", "trt")
BACKUPS = ("int8", "none")
TRT_OPSET = 21          # DequantizeLinear's block_size and INT4 inputs start at opset 21
ORT_OPSET = 20          # below 21 NNCF writes MatMulNBits
MS_DOMAIN = "com.microsoft"


def _check_args(form, group_size, ratio, backup) -> None:
    if form not in FORMS:
        raise CalibError(f"INT4 form must be one of {', '.join(FORMS)}, got {form!r}")
    # MatMulNBits takes block sizes that are powers of two from 16 up; one rule for both forms.
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 16 \
            or group_size & (group_size - 1):
        raise CalibError(f"group_size must be a power of two >= 16 (MatMulNBits' block sizes), got {group_size!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio <= 1:
        raise CalibError(f"ratio (the share of weights in INT4) must be in (0, 1], got {ratio!r}")
    if backup not in BACKUPS:
        raise CalibError(f"backup (embedding, LM head, layers over the ratio) must be one of "
                         f"{', '.join(BACKUPS)}, got {backup!r}")


def _feeds(dataset, needed: bool, model, src) -> list[dict]:
    """The dataset as a list of feed dicts for every graph input, or one-line CalibError."""
    if dataset is None:
        if needed:
            raise CalibError(f"{src}: AWQ and scale estimation need a dataset of feed dicts; pass dataset=... "
                             "or awq=False, scale_estimation=False")
        return []
    if isinstance(dataset, (dict, str, bytes, np.ndarray)):
        raise CalibError(f"dataset: expected an iterable of feed dicts {{input name: array}}, "
                         f"got one {type(dataset).__name__}")
    items = list(dataset)
    if not items:
        raise CalibError(f"dataset: empty for {src} (AWQ and scale estimation need at least one feed dict)")
    inits = {t.name for t in model.graph.initializer}
    inputs = [i.name for i in model.graph.input if i.name not in inits]
    for k, item in enumerate(items):
        if not isinstance(item, dict):
            raise CalibError(f"dataset item {k}: expected a feed dict {{input name: array}}, got {type(item).__name__}")
        missing = [n for n in inputs if n not in item]
        if missing:
            raise CalibError(f"dataset item {k}: no array for input {missing[0]!r} of {src} "
                             f"({len(missing)} of {len(inputs)} inputs missing)")
    return [{n: np.asarray(item[n]) for n in inputs} for item in items]


def _opset(model) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def _to_form_opset(model, form: str, src):
    """The model at an opset that makes NNCF write ``form`` (version converter; refused if it cannot)."""
    import onnx

    have = _opset(model)
    want = TRT_OPSET if form == "trt" and have < TRT_OPSET else ORT_OPSET if form == "ort" and have > ORT_OPSET \
        else None
    if want is None:
        converted = model
    else:
        try:
            converted = onnx.version_converter.convert_version(model, want)
            onnx.checker.check_model(converted)
        except Exception as e:  # noqa: BLE001 - the converter raises RuntimeError, ValidationError, IndexError...
            raise CalibError(f"{src}: cannot convert opset {have} to {want} for form {form!r} ({brief(e)})") from None
    # NNCF reads the opset from the first entry: put the default domain there.
    entries = sorted(converted.opset_import, key=lambda o: o.domain not in ("", "ai.onnx"))
    del converted.opset_import[:]
    converted.opset_import.extend(entries)
    return converted


def _decoder_feed(model) -> dict | None:
    """One decode step (2 tokens, empty past) for the decoder layout, or None if the inputs are not that layout.
    A VLM's decoder takes ``inputs_embeds`` [batch, sequence, hidden] instead of ``input_ids``: it gets seeded
    normal values at the scale of an embedding table (std 0.02, transformers' init), which only have to run."""
    inits = {t.name for t in model.graph.initializer}
    feed = {}
    for i in model.graph.input:
        if i.name in inits:
            continue
        dims = [d.dim_value if d.dim_value > 0 else None for d in i.type.tensor_type.shape.dim]
        if i.name in ("input_ids", "attention_mask"):
            feed[i.name] = np.ones((1, 2), np.int64)
        elif i.name == "inputs_embeds" and len(dims) == 3 and dims[2]:
            feed[i.name] = (np.random.default_rng(0).standard_normal((1, 2, dims[2])) * 0.02).astype(np.float32)
        elif i.name == "position_ids":
            feed[i.name] = np.arange(2, dtype=np.int64)[None]
        elif i.name.startswith("past_key_values.") and len(dims) == 4 and dims[1] and dims[3]:
            feed[i.name] = np.zeros((1, dims[1], 0, dims[3]), np.float32)
        else:
            return None
    return feed


def _weight_kinds(model) -> dict:
    """How the constant weights of MatMul/Gemm (and the embedding Gathers) are stored."""
    from onnx import TensorProto

    inits = {t.name: t for t in model.graph.initializer}
    dq = {n.output[0]: inits[n.input[0]].data_type for n in model.graph.node
          if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    counts = {"int4": 0, "int8": 0, "kept": 0, "embedding_int8": 0}
    for n in model.graph.node:
        if n.op_type == "MatMulNBits":
            counts["int4"] += 1
        elif n.op_type in ("MatMul", "Gemm", "Gather"):
            types = [dq[i] for i in n.input[:2] if i in dq]
            if n.op_type == "Gather":
                counts["embedding_int8"] += bool(types and types[0] in (TensorProto.INT8, TensorProto.UINT8))
            elif types:
                counts["int4" if types[0] in (TensorProto.INT4, TensorProto.UINT4) else "int8"] += 1
            elif any(i in inits and len(inits[i].dims) == 2 for i in n.input[:2]):
                counts["kept"] += 1
    return counts


def _group_size_error(e: Exception, group_size: int, src) -> CalibError:
    """NNCF's InvalidGroupSizeError (several lines) as one line naming the first weight."""
    failed = re.findall(r'"([^"]+)" \(channel size: (\d+)\)', str(e))
    first = f"{failed[0][0]} (in_features {failed[0][1]})" if failed else "a weight"
    more = f" and {len(failed) - 1} more" if len(failed) > 1 else ""
    return CalibError(f"{src}: group_size {group_size} does not divide the in_features of {first}{more}")


def compress_int4(onnx_in: str | os.PathLike, onnx_out: str | os.PathLike, *, form: str, group_size: int = 128,
                  dataset=None, awq: bool = True, scale_estimation: bool = True, ratio: float = 1.0,
                  backup: str = "int8", accuracy_level: int = 0) -> dict:
    """Symmetric INT4 weights (groups of ``group_size`` along in_features) of the ONNX decoder ``onnx_in``,
    written to ``onnx_out`` in ``form`` "ort" (MatMulNBits) or "trt" (blocked DequantizeLinear, opset >= 21).

    ``dataset``: an iterable of feed dicts {input name: np.ndarray} (every graph input), needed when
    ``awq`` or ``scale_estimation`` is on; all of it is used. A VLM's decoder (``inputs_embeds`` instead of
    ``input_ids``) takes the same call; its feeds must hold the embeddings the decoder sees at run time
    (pipeline.vlm_calib.decoder_feeds), and without a dataset the probe feeds seeded embeddings.
    ``ratio``: the share of the layers NNCF
    ranks in INT4 (the rest in ``backup``). ``backup``: "int8" (symmetric, per channel) or "none"
    (float) for the embedding, the LM head and the layers over the ratio.
    Returns {"path", "form", "group_size", "opset", "matmuls": {"int4", "int8", "kept", "embedding_int8"},
    "bytes_before", "bytes_after", "options": {awq, scale_estimation, ratio, backup, n_data}, "probe":
    {"max_abs_logits"} on one inference against the input model, "seconds"}.
    """
    t0 = time.perf_counter()
    _check_args(form, group_size, ratio, backup)
    if accuracy_level and (form != "ort" or accuracy_level not in ACCURACY_LEVELS):
        raise CalibError(f"accuracy_level {accuracy_level!r}: only the 'ort' form has one, in {ACCURACY_LEVELS}")
    model = qdq.load_onnx(onnx_in)
    feeds = _feeds(dataset, bool(awq or scale_estimation), model, onnx_in)
    probe = feeds[0] if feeds else _decoder_feed(model)
    if probe is None:
        raise CalibError(f"{onnx_in}: inputs are not the decoder layout (input_ids or inputs_embeds, attention_mask, "
                         "position_ids, past_key_values.*); pass dataset=[feed dict] so the result can be run once")
    model = _to_form_opset(model, form, onnx_in)
    _fold_weight_transposes(model)

    import nncf

    reference = model.SerializeToString()   # before NNCF: AWQ may rescale weights of the model it is given
    backup_mode = nncf.BackupMode.INT8_SYM if backup == "int8" else nncf.BackupMode.NONE
    options = {"dataset": nncf.Dataset(feeds), "subset_size": len(feeds)} if feeds else {}
    try:
        compressed = nncf.compress_weights(model, mode=nncf.CompressWeightsMode.INT4_SYM, group_size=group_size,
                                           ratio=float(ratio), backup_mode=backup_mode, awq=bool(awq),
                                           scale_estimation=bool(scale_estimation), **options)
    except nncf.InvalidGroupSizeError as e:
        raise _group_size_error(e, group_size, onnx_in) from None
    _import_ms_domain(compressed)
    if accuracy_level:
        _set_accuracy_level(compressed, accuracy_level)
    where = f"{onnx_out} (not written)"
    problems = check_int4_form(compressed, form, group_size=group_size)
    if problems:
        raise CalibError(f"{where}: not a valid {form!r} INT4 form: {problems[0]} ({len(problems)} problem(s))")
    max_abs = _probe(reference, compressed, probe, where)

    import onnx

    atomic_write(onnx_out, lambda tmp: onnx.save(compressed, tmp))
    return {"path": str(onnx_out), "form": form, "group_size": group_size, "opset": _opset(compressed),
            "matmuls": _weight_kinds(compressed), "bytes_before": Path(onnx_in).stat().st_size,
            "bytes_after": Path(onnx_out).stat().st_size,
            "options": {"awq": bool(awq), "scale_estimation": bool(scale_estimation), "ratio": float(ratio),
                        "accuracy_level": int(accuracy_level),
                        "backup": backup, "n_data": len(feeds)},
            "probe": {"max_abs_logits": max_abs}, "seconds": round(time.perf_counter() - t0, 3)}


def _fold_weight_transposes(model) -> int:
    """Transpose(initializer) → a transposed initializer. The dynamo exporter writes a tied LM head as
    MatMul(x, Transpose(embedding)); NNCF compresses only MatMuls whose weight is an initializer (it fails
    looking the transposed tensor up by name). Returns how many it folded."""
    from onnx import numpy_helper
    inits = {i.name: i for i in model.graph.initializer}
    folded = 0
    for node in list(model.graph.node):
        if node.op_type != "Transpose" or node.input[0] not in inits:
            continue
        w = numpy_helper.to_array(inits[node.input[0]])
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), None) or list(range(w.ndim))[::-1]
        model.graph.initializer.append(numpy_helper.from_array(w.transpose(perm).copy(), node.output[0]))
        model.graph.node.remove(node)
        folded += 1
    if folded:   # an initializer only the folded Transposes read is dead weight now
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        keep = [i for i in model.graph.initializer if i.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(keep)
    return folded


ACCURACY_LEVELS = (0, 1, 2, 3, 4)   # MatMulNBits: 0 the default (float compute), 4 int8 activations


def _set_accuracy_level(model, level: int) -> None:
    """onnxruntime's MatMulNBits ``accuracy_level``: 4 lets the CPU compute with int8 activations (faster;
    what it costs in accuracy is for the caller's gate to judge). Only the onnxruntime form has it."""
    import onnx
    for node in model.graph.node:
        if node.op_type == "MatMulNBits":
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend([*kept, onnx.helper.make_attribute("accuracy_level", int(level))])


def _import_ms_domain(model) -> None:
    """NNCF adds MatMulNBits without importing its domain: onnx.checker refuses such a file."""
    from onnx import helper

    if any(n.domain == MS_DOMAIN for n in model.graph.node) and \
            not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))


def _probe(reference: bytes, compressed, feed: dict, where: str) -> float:
    """One inference of both models: CalibError if the compressed one fails or is not finite; the
    largest |difference| of the first output (logits) otherwise."""
    from edgerun.ort import OrtError, OrtRunner, onnxruntime

    onnxruntime()
    try:
        out = OrtRunner(compressed.SerializeToString()).infer(feed)
    except OrtError as err:
        raise CalibError(f"{where}: onnxruntime cannot run the INT4 model "
                         f"({brief(err.__cause__ or err).splitlines()[0][:200]})") from None
    first = next(iter(out))
    bad = [k for k, v in out.items() if np.issubdtype(np.asarray(v).dtype, np.floating) and not np.isfinite(v).all()]
    if bad:
        raise CalibError(f"{where}: the INT4 model's first inference gives non-finite {', '.join(bad)}")
    ref = OrtRunner(reference).infer(feed)[first]
    return round(float(np.abs(out[first].astype(np.float64) - ref).max()), 6)


def _attr(node, name: str, default=None):
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)


def _zero_point_problem(node, inits) -> str | None:
    """Why a weight DequantizeLinear is not symmetric, or None (no zero point, or all zeros)."""
    from onnx import numpy_helper

    if len(node.input) < 3 or not node.input[2]:
        return None
    if node.input[2] not in inits:
        return f"{node.name}: zero point {node.input[2]!r} is not a constant"
    if numpy_helper.to_array(inits[node.input[2]]).astype(np.int32).any():
        return f"{node.name}: non-zero zero point (asymmetric; TensorRT needs symmetric weights)"
    return None


def _trt_problems(model, group_size: int | None) -> list[str]:
    from onnx import TensorProto

    g = model.graph
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    problems = []
    if _opset(model) < TRT_OPSET:
        problems.append(f"opset {_opset(model)} < {TRT_OPSET} (blocked INT4 DequantizeLinear needs {TRT_OPSET})")
    problems += [f"{n.name or n.op_type}: {n.domain}::{n.op_type} is not standard ONNX"
                 for n in g.node if n.domain not in ("", "ai.onnx")]
    n_int4 = 0
    for n in g.node:
        if n.op_type != "DequantizeLinear" or n.input[0] not in inits:
            continue
        dtype = inits[n.input[0]].data_type
        if dtype in (TensorProto.UINT4, TensorProto.UINT8):
            problems.append(f"{n.name}: unsigned weights (TensorRT needs signed, zero point 0)")
        if dtype not in (TensorProto.INT4, TensorProto.UINT4):
            problems += filter(None, [_zero_point_problem(n, inits)])
            continue
        n_int4 += 1
        block = _attr(n, "block_size", 0)
        if not block or (group_size and block != group_size):
            problems.append(f"{n.name}: INT4 block size {block}, expected {group_size or 'a block'}")
        if len(inits[n.input[0]].dims) != 2:
            problems.append(f"{n.name}: INT4 weight of rank {len(inits[n.input[0]].dims)}, expected 2")
        problems += filter(None, [_zero_point_problem(n, inits)])
        users = consumers.get(n.output[0], [])
        if not users or any(u.op_type not in ("MatMul", "Gemm") for u in users):
            problems.append(f"{n.name}: INT4 weight read by {', '.join(u.op_type for u in users) or 'nothing'}, "
                            "expected MatMul/Gemm")
    if not n_int4:
        problems.append("no INT4 weight (no DequantizeLinear of an INT4 initializer)")
    return problems


def _ort_problems(model, group_size: int | None) -> list[str]:
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits" and n.domain == MS_DOMAIN]
    if not nbits:
        return ["no com.microsoft::MatMulNBits node"]
    problems = [] if any(o.domain == MS_DOMAIN for o in model.opset_import) else ["no opset import for com.microsoft"]
    problems += [f"{n.name}: MatMulNBits with {_attr(n, 'bits')} bits, expected 4"
                for n in nbits if _attr(n, "bits") != 4]
    if group_size:
        problems += [f"{n.name}: MatMulNBits block size {_attr(n, 'block_size')}, expected {group_size}"
                     for n in nbits if _attr(n, "block_size") != group_size]
    return problems


def check_int4_form(path_or_model, form: str, *, group_size: int | None = 128) -> list[str]:
    """Problems that keep ``path_or_model`` from being the INT4 ``form`` (empty: valid). Static, no GPU.

    "trt": opset >= 21, only standard ONNX ops (no MatMulNBits or other com.microsoft op), every INT4
    weight a signed, symmetric (no zero point or zero 0), blocked DequantizeLinear of a 2-D initializer
    read only by MatMul/Gemm, block size ``group_size``; INT8 weights (embedding, LM head) signed with
    zero point 0. "ort": MatMulNBits present, 4 bits, block size ``group_size``.
    ``group_size`` None accepts any block size.
    """
    if form not in FORMS:
        raise CalibError(f"INT4 form must be one of {', '.join(FORMS)}, got {form!r}")
    model, _ = qdq._as_model(path_or_model)
    return _trt_problems(model, group_size) if form == "trt" else _ort_problems(model, group_size)
