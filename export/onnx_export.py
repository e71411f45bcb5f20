"""torch → ONNX with a dynamic batch dimension, and ONNX file checks.

Exporter choice: torch.onnx.export(dynamo=True), the torch.export-based exporter (the default
since torch 2.9). The TorchScript exporter (dynamo=False) still works in torch 2.13 but warns
that it will be removed, and on the small ViT here it emitted Where/Equal/ConstantOfShape shape
plumbing and symbolic output dims ("Transposetokens_dim_1"). The dynamo exporter gave, for the
CNN, the ViT (reshape/permute attention, LayerNorm, GELU) and a model returning a tuple, graphs
with fused LayerNormalization, static non-batch dims and max-abs ≤ 1e-6 against torch at batch
1/7/64. Its cost is time (seconds per model instead of a fraction of one). The batch dimension is
declared with torch.export.Dim, the dynamo way (dynamic_axes is TorchScript-only).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx

from export.errors import ExportError, brief


def export_onnx(model, example_input, path, *, opset=18, input_name="input",
                output_names=("logits",), dynamic_batch=True, slim=False,
                check_batches=(1, 7, 64)) -> dict:
    """Export `model(example_input)` to `path`; prove the batch dimension in onnxruntime.

    Returns the file's info (see check_onnx) plus "slimmed". The file appears only when every
    check passed: it is written under a temporary name in the same folder, then renamed.
    """
    import torch

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    output_names = list(output_names)
    tmp = temp_beside(path)
    was_training = model.training
    model.eval()
    try:
        dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
        try:
            # external_data=False: one self-contained file that can be copied to a device and
            # renamed atomically (the dynamo exporter writes weights to a side file by default).
            torch.onnx.export(model, (example_input,), str(tmp), dynamo=True, external_data=False,
                              opset_version=opset, input_names=[input_name],
                              output_names=output_names, dynamic_shapes=dynamic_shapes,
                              verbose=False)
        except Exception as e:
            raise ExportError(f"{path.name}: torch.onnx.export failed ({brief(e)})") from e

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
        example = example_input.detach().cpu().numpy()
        batches = check_batches if dynamic_batch else (example.shape[0],)
        _prove_batches(tmp, path.name, input_name, example, batches)
        os.replace(tmp, path)
    finally:
        model.train(was_training)
        tmp.unlink(missing_ok=True)
    info.update(path=str(path), size_bytes=path.stat().st_size, slimmed=bool(slim))
    return info


def check_onnx(path) -> dict:
    """Check an ONNX file: it parses, passes onnx.checker (full_check), has at least one input.

    Returns {"path", "opset", "inputs": [{"name", "shape", "dtype"}], "outputs": [...],
    "size_bytes", "slimmed"}; "slimmed" is None here (a file does not say whether it was).
    """
    path = Path(path)
    return _check(path, path.name)


def temp_beside(path: Path) -> Path:
    """A fresh temporary file next to `path`, so that os.replace onto `path` is atomic."""
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".partial")
    os.close(fd)
    return Path(name)


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
    from export.runners import OrtRunner

    # Errors are re-worded: the runner names `path`, a temporary file the user never asked for.
    try:
        runner = OrtRunner(path)
    except ExportError as e:
        raise ExportError(f"{name}: onnxruntime cannot load it ({brief(e.__cause__ or e)})") from e
    with runner:
        for batch in batches:
            # np.resize repeats the example's own values: valid data for any dtype (token ids too).
            feed = {input_name: np.resize(example, (batch, *example.shape[1:]))}
            try:
                outputs = runner.infer(feed)
            except ExportError as e:
                raise ExportError(f"{name}: onnxruntime fails at batch {batch} "
                                  f"({brief(e.__cause__ or e)})") from e
            for out_name, value in outputs.items():
                if value.ndim == 0 or value.shape[0] != batch:
                    raise ExportError(f"{name}: output '{out_name}' has shape {value.shape} for "
                                      f"batch {batch}: the batch dimension is not dynamic")
