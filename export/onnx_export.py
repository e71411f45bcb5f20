"""torch → ONNX with a dynamic batch dimension, and ONNX file checks.

Exporter choice: torch.onnx.export(dynamo=True), the torch.export-based exporter (the default
since torch 2.9). The TorchScript exporter (dynamo=False) still works in torch 2.13 but warns
that it will be removed, and on the small ViT here it emitted Where/Equal/ConstantOfShape shape
plumbing and symbolic output dims ("Transposetokens_dim_1"). The dynamo exporter gave, for the
CNN, the ViT (reshape/permute attention, LayerNorm, GELU) and a model returning a tuple, graphs
with fused LayerNormalization, static non-batch dims and max-abs ≤ 1e-6 against torch at batch
1/7/64. Its cost is time (seconds per model instead of a fraction of one).

The batch stays dynamic only if torch.export sees a batch of at least 2: with a batch-1 example,
nn.Unfold, nn.TransformerEncoder and ConvNeXt blocks get their batch specialised to 1, and
torch.onnx then silently "refines" the dynamic dimension away (a static-batch file). So the
example is repeated to ``example_batch`` rows, the graph is captured here with torch.export (a
violated batch constraint is an error naming it, not a silent refinement), and the written file
is checked: its input and every output must have a symbolic dim 0, and onnxruntime must run it
at several batches. A failed export is one line naming the cause; the exporter's whole log goes
to ``<name>.export.log`` beside the target.
"""
from __future__ import annotations

import logging
import re
import traceback
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx

from edgerun.io import atomic_write
from export import MIN_OPSET
from export.errors import ExportError, brief

BATCH_DIM = "batch"
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def export_onnx(model, example_input, path, *, opset=18, input_name="input",
                output_names=("logits",), dynamic_batch=True, slim=False,
                check_batches=(1, 7, 64), example_batch: int = 2) -> dict:
    """Export ``model`` to ``path``; prove the batch dimension in the file and in onnxruntime.

    ``example_input``'s rows are repeated to ``example_batch`` (>= 2) rows for the export.
    Returns the file's info (see check_onnx) plus "slimmed". The file appears only when every check
    passed: it is written under a temporary name in the same folder, then renamed.
    """
    import torch

    path = Path(path)
    _check_opset(opset, path.name)
    if dynamic_batch and (isinstance(example_batch, bool) or not isinstance(example_batch, int)
                          or example_batch < 2):
        raise ExportError(f"{path.name}: example_batch must be an integer >= 2 for a dynamic batch "
                          f"(torch.export specialises a batch of 1), got {example_batch!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    log_path = path.with_name(path.name + ".export.log")
    output_names = list(output_names)
    rows = example_input.shape[0] if example_input.dim() else 0
    if rows == 0:
        raise ExportError(f"{path.name}: example_input needs a batch dimension with at least one row, "
                          f"got shape {list(example_input.shape)}")
    x = example_input[torch.arange(example_batch) % rows] if dynamic_batch else example_input
    was_training = model.training
    model.eval()
    result = {}

    def write(tmp: str) -> None:   # everything is proved on the temporary file before it takes `path`
        tmp = Path(tmp)
        with _exporter_log() as log:
            try:
                _export(model, x, tmp, path.name, opset, input_name, output_names, dynamic_batch)
            except ExportError as e:
                _write_log(log_path, e, log)
                raise ExportError(f"{e}; full log: {log_path}") from e.__cause__
        _rename_batch_dim(tmp, dynamic_batch)
        graph_outputs = [o.name for o in onnx.load(str(tmp), load_external_data=False).graph.output]
        if len(graph_outputs) != len(output_names):
            # The exporter silently names the extra outputs itself; the pipeline looks them up by name.
            raise ExportError(f"{path.name}: the model returns {len(graph_outputs)} outputs but "
                              f"output_names has {len(output_names)} ({', '.join(output_names)})")
        if slim:
            import onnxslim
            try:
                onnx.save(onnxslim.slim(onnx.load(str(tmp))), str(tmp))
            except Exception as e:
                raise ExportError(f"{path.name}: onnxslim failed ({brief(e)})") from e
        info = _check(tmp, path.name)
        if info["opset"] != opset:
            raise ExportError(f"{path.name}: asked for opset {opset}, the exporter wrote {info['opset']}")
        if dynamic_batch:
            _prove_dynamic_in_file(info, path.name)
        example = x.detach().cpu().numpy()
        batches = check_batches if dynamic_batch else (example.shape[0],)
        _prove_batches(tmp, path.name, input_name, example, batches)
        result.update(info)
    try:
        atomic_write(path, write)
        log_path.unlink(missing_ok=True)  # a log left by an earlier failed export would mislead
    finally:
        model.train(was_training)
    info = result
    info.update(path=str(path), size_bytes=path.stat().st_size, slimmed=bool(slim))
    return info


def _check_opset(opset, name: str) -> None:
    newest = onnx.defs.onnx_opset_version()
    if isinstance(opset, bool) or not isinstance(opset, int):
        raise ExportError(f"{name}: opset must be an integer, got {opset!r}")
    if opset < MIN_OPSET:
        raise ExportError(f"{name}: opset {opset} is below {MIN_OPSET}, the lowest the dynamo exporter writes "
                          f"(it would silently write {MIN_OPSET}); use {MIN_OPSET} or newer")
    if opset > newest:
        raise ExportError(f"{name}: opset {opset} is newer than this onnx ({onnx.__version__}) knows "
                          f"(newest: {newest})")


def _export(model, x, tmp: Path, name: str, opset, input_name, output_names, dynamic_batch) -> None:
    """torch.export capture (non-strict, then strict as torch.onnx does), then ONNX translation."""
    import torch

    shapes = ({0: torch.export.Dim(BATCH_DIM, min=1)},) if dynamic_batch else None
    program, first = None, None
    fastpath = torch.backends.mha.get_fastpath_enabled()
    for strict in (False, True):
        try:
            # A caller under no_grad would get nn.TransformerEncoderLayer's fused kernel captured,
            # an op ONNX has no translation for: capture the plain modules.
            torch.backends.mha.set_fastpath_enabled(False)
            program = torch.export.export(model, (x,), dynamic_shapes=shapes, strict=strict)
            break
        except Exception as e:  # torch.export raises many types; all mean "no graph"
            first = first or e
            if _constraint(e):
                break  # a violated batch constraint: strict mode would violate it too
        finally:
            torch.backends.mha.set_fastpath_enabled(fastpath)
    if program is None:
        constraint = _constraint(first)
        if constraint:
            raise ExportError(f"{name}: torch.export cannot keep the batch dynamic ({constraint})") from first
        raise ExportError(f"{name}: torch.export failed ({_cause(first)})") from first
    try:
        # external_data=False: one self-contained file that can be copied to a device and
        # renamed atomically (the dynamo exporter writes weights to a side file by default).
        torch.onnx.export(program, (x,), str(tmp), dynamo=True, external_data=False, opset_version=opset,
                          input_names=[input_name], output_names=output_names, verbose=False)
    except Exception as e:
        raise ExportError(f"{name}: torch.onnx.export failed ({_cause(e, program)})") from e


# ------------------------------------------------------------------------------------- error causes
def _chain(exc: BaseException | None) -> list[BaseException]:
    out: list[BaseException] = []
    while exc is not None and exc not in out:
        out.append(exc)
        exc = exc.__cause__ or exc.__context__
    return out


def _lines(exc: BaseException) -> list[str]:
    return [ANSI.sub("", line).strip() for line in str(exc).splitlines() if line.strip()]


def _constraint(exc: BaseException | None) -> str:
    """The violated constraint of a torch.export 'Constraints violated' error, else ''."""
    for e in _chain(exc):
        lines = _lines(e)
        if lines and lines[0].startswith("Constraints violated"):
            detail = next((ln[2:] for ln in lines[1:] if ln.startswith("- ")), lines[0])
            return detail.split(". If you")[0].rstrip(".")
    return ""


def _cause(exc: BaseException, program=None) -> str:
    """One line for an exporter failure: the innermost exception's own message (the outer ones say
    "see the stack trace"), the op in a readable form, and the model part when the graph knows it."""
    chain = _chain(exc)
    inner = next((e for e in reversed(chain) if _lines(e)), chain[-1])
    text = f"{type(inner).__name__}: {_lines(inner)[0]}" if _lines(inner) else type(inner).__name__
    text = re.sub(r"<OpOverload\(op='([^']+)', overload='([^']+)'\)>", r"\1.\2", text)
    where = ""
    for e in chain:
        found = re.search(r"translating node %(\S+)", str(e))
        if found and program is not None:
            where = _module_of(program, found.group(1))
            break
    return f"{text}{where}"[:400]


def _module_of(program, node_name: str) -> str:
    """Where a failing node came from. torch.onnx translates a decomposed copy of the program, whose
    node names can be shorter than the captured ones (linalg_eigvals decomposes to linalg_eig)."""
    nodes = list(program.graph.nodes)
    for match in (lambda n: n.name == node_name, lambda n: n.name.startswith(node_name)):
        for node in nodes:
            stack = node.meta.get("nn_module_stack") or {}
            if match(node) and stack:
                path, kind = list(stack.values())[-1]
                kind = getattr(kind, "__name__", str(kind)).rsplit(".", 1)[-1]
                return f", in module '{path}' ({kind})" if path else f", in the top module ({kind})"
    return ""


# ------------------------------------------------------------------------------------- exporter log
class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)  # torch.__trace emits empty DEBUG records by the hundred
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(f"{record.levelname} {record.name}: {record.getMessage()}")


@contextmanager
def _exporter_log():
    """Collect the exporter's log records for the failure log, and mute known third-party noise at
    its source: torch.onnx's notices that torchvision ops are skipped (torchvision is not installed
    here), torch.export's error-level echo of a failure we report ourselves, and pytree's
    FutureWarnings raised from inside torch.export."""
    records = _Records()
    watched = [logging.getLogger(n) for n in ("torch", "onnxscript")]
    diverted = logging.getLogger("torch.export")
    muted = logging.getLogger("torch.onnx._internal.exporter._registration")
    saved_propagate, saved_level = diverted.propagate, muted.level
    for lg in (*watched, diverted):
        lg.addHandler(records)
    diverted.propagate = False
    muted.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=r".*LeafSpec.*", category=FutureWarning)
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.(export|_export|onnx)")
            yield records
    finally:
        for lg in (*watched, diverted):
            lg.removeHandler(records)
        diverted.propagate = saved_propagate
        muted.setLevel(saved_level)


def _write_log(log_path: Path, error: ExportError, records: _Records) -> None:
    cause = error.__cause__ or error
    text = [f"export failed: {error}", "", "--- exception chain (innermost last) ---",
            *traceback.format_exception(cause), "", "--- exporter log records ---", *records.lines, ""]
    atomic_write(log_path, ANSI.sub("", "\n".join(text)))


# ------------------------------------------------------------------------------------- file checks
def check_onnx(path) -> dict:
    """Check an ONNX file: it parses, passes onnx.checker (full_check), has at least one input.

    Returns {"path", "opset", "inputs": [{"name", "shape", "dtype"}], "outputs": [...],
    "size_bytes", "slimmed"}; "slimmed" is None here (a file does not say whether it was).
    """
    path = Path(path)
    return _check(path, path.name)


def _rename_batch_dim(path: Path, dynamic_batch: bool) -> None:
    """Call the input's symbolic dim 0 "batch" everywhere (torch.export names it s0, s77, ...)."""
    if not dynamic_batch:
        return
    model = onnx.load(str(path))
    inputs = [i for i in model.graph.input if i.name not in {t.name for t in model.graph.initializer}]
    dims = inputs[0].type.tensor_type.shape.dim if inputs else []
    symbol = dims[0].dim_param if dims and dims[0].dim_param else None
    if not symbol or symbol == BATCH_DIM:
        return
    for value in (*model.graph.input, *model.graph.output, *model.graph.value_info):
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param == symbol:
                d.dim_param = BATCH_DIM
    onnx.save(model, str(path))


def _prove_dynamic_in_file(info: dict, name: str) -> None:
    for kind in ("inputs", "outputs"):
        for t in info[kind]:
            first = t["shape"][0] if t["shape"] else None
            if not isinstance(first, str):
                raise ExportError(f"{name}: {kind[:-1]} '{t['name']}' has a static batch dimension ({first}) in the "
                                  "file; the model fixes its batch size somewhere (a reshape to a constant?)")


def _check(path: Path, name: str) -> dict:
    # `name` is the file the user asked for: while exporting, `path` is still a temporary file.
    if not path.is_file():
        raise ExportError(f"{name}: no such file ({path})")
    try:
        model = onnx.load(str(path))
    except Exception as e:
        raise ExportError(f"{name}: not a valid ONNX file ({brief(e)})") from e
    try:
        # A path, not the loaded proto: the checker then also handles models over 2 GiB.
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as e:
        raise ExportError(f"{name}: fails onnx.checker ({brief(e)})") from e
    initializers = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in initializers]
    if not inputs:
        raise ExportError(f"{name}: the graph has no inputs (expected at least one)")
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), None)
    return {
        "path": str(path),
        "opset": opset,
        "inputs": [_tensor_info(i) for i in inputs],
        "outputs": [_tensor_info(o) for o in model.graph.output],
        "size_bytes": path.stat().st_size,
        "slimmed": None,
    }


def _tensor_info(value_info) -> dict:
    tensor_type = value_info.type.tensor_type
    shape = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None)
             for d in tensor_type.shape.dim]
    try:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).name
    except Exception:  # types numpy lacks (bfloat16, float8): keep ONNX's own name
        dtype = onnx.TensorProto.DataType.Name(tensor_type.elem_type).lower()
    return {"name": value_info.name, "shape": shape, "dtype": dtype}


def _prove_batches(path: Path, name: str, input_name: str, example: np.ndarray, batches) -> None:
    from edgerun.ort import OrtError, OrtRunner

    # Errors are re-worded: the runner names `path`, a temporary file the user never asked for.
    try:
        runner = OrtRunner(path)
    except OrtError as e:
        raise ExportError(f"{name}: onnxruntime cannot load it ({brief(e.__cause__ or e)})") from e
    with runner:
        for batch in batches:
            # np.resize repeats the example's own values: valid data for any dtype (token ids too).
            feed = {input_name: np.resize(example, (batch, *example.shape[1:]))}
            try:
                outputs = runner.infer(feed)
            except OrtError as e:
                raise ExportError(f"{name}: onnxruntime fails at batch {batch} "
                                  f"({brief(e.__cause__ or e)})") from e
            for out_name, value in outputs.items():
                if value.ndim == 0 or value.shape[0] != batch:
                    raise ExportError(f"{name}: output '{out_name}' has shape {value.shape} for "
                                      f"batch {batch}: the batch dimension is not dynamic")
