"""A Hugging Face causal LM (LLaMA family) → one ONNX file with an explicit KV cache.

The file has onnxruntime-genai's layout (also Optimum's): inputs ``input_ids`` (or ``inputs_embeds``)
[batch, sequence], ``attention_mask`` [batch, total_sequence], ``position_ids`` [batch, sequence],
``past_key_values.{i}.key|value`` [batch, kv_heads, past_sequence, head_dim]; outputs ``logits``
[batch, sequence, vocab] and ``present.{i}.key|value`` [batch, kv_heads, total_sequence, head_dim].

Exporter: torch.onnx.export(dynamo=True), the project's shipped exporter, on a small wrapper that turns
the flat past tensors into a transformers ``DynamicCache`` (full-attention layers) and the model's cache
back into flat present tensors. The example has batch 2, sequence 3 and past 4 so that torch.export
specialises none of the dynamic dims (it fixes a dim seen as 0 or 1). The written file is proved before
it takes ``path``: every dim above is symbolic in the file, onnxruntime runs it at two batches and two
lengths, with and without past, with the shapes the layout promises, and its logits match torch's.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import onnx

from edgerun.io import atomic_write
from export.errors import ExportError, brief
from export.onnx_export import _cause, _check, _check_opset, _exporter_log

# transformers model_type values whose decoder layers are plain full-attention LLaMA-style layers with
# a DynamicCache. Gemma 2/3 (hybrid sliding caches, soft-capping) and the multimodal wrappers are not.
SUPPORTED = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma")
EXAMPLE = {"batch": 2, "sequence": 3, "past": 4}
# (batch, sequence, past) runs that prove the file: two batches, two lengths, with and without past.
PROOF_RUNS = ((1, 5, 0), (3, 2, 0), (1, 1, 6), (3, 4, 2))


def export_decoder(model, path, *, opset: int = 18, embeds: bool = False, parity_atol: float = 1e-3) -> dict:
    """Export ``model`` (a transformers ``*ForCausalLM`` of a SUPPORTED family) to ``path``.

    ``embeds=True``: the first input is ``inputs_embeds`` float [batch, sequence, hidden] instead of
    ``input_ids`` (for a vision-language model that mixes image features in). ``parity_atol``: the
    largest max-abs difference of the file's logits from torch's allowed in the proof, relative to
    max(1, the largest |logit|). Returns {"path", "opset", "model_type", "num_layers", "num_attention_heads",
    "kv_heads", "head_dim", "hidden_size", "vocab", "dtype", "embeds", "input_names", "output_names",
    "max_abs_vs_torch", "size_bytes"}. The file appears only when every check passed.
    """
    import torch

    path = Path(path)
    _check_opset(opset, path.name)
    facts = decoder_facts(model, path.name)
    facts.update(embeds=bool(embeds), opset=opset)
    wrapper = _flat_cache(model, facts["num_layers"], embeds)
    example = _example(facts, embeds, **EXAMPLE)
    in_names, out_names = _names(facts["num_layers"], embeds)
    was_training = model.training
    model.eval()
    result = {}

    def write(tmp: str) -> None:   # everything is proved on the temporary file before it takes `path`
        tmp = Path(tmp)
        with _exporter_log(), torch.no_grad(), warnings.catch_warnings():
            # torch.onnx notes that it keeps one name for dims torch.export found equal: expected here.
            warnings.filterwarnings("ignore", message=r".*axis name.*will not be used")
            try:
                torch.onnx.export(wrapper, tuple(torch.from_numpy(v) for v in example.values()), str(tmp),
                                  dynamo=True, external_data=False, opset_version=opset, verbose=False,
                                  input_names=in_names, output_names=out_names,
                                  dynamic_shapes=_dynamic_shapes(facts["num_layers"], embeds))
            except Exception as e:
                raise ExportError(f"{path.name}: torch.onnx.export failed ({_cause(e)})") from e
        _name_total_dim(tmp)
        info = _check(tmp, path.name)
        if info["opset"] != opset:
            raise ExportError(f"{path.name}: asked for opset {opset}, the exporter wrote {info['opset']}")
        _prove_layout(info, facts, in_names, out_names, path.name)
        result["max_abs_vs_torch"] = _prove_runs(tmp, wrapper, facts, parity_atol, path.name)
    try:
        atomic_write(path, write)
    finally:
        model.train(was_training)
    return {**facts, **result, "path": str(path), "input_names": in_names, "output_names": out_names,
            "size_bytes": path.stat().st_size}


def decoder_facts(model, name: str = "model") -> dict:
    """The shape facts of a supported causal LM, or one line saying why it is not one."""
    config = getattr(model, "config", None)
    kind = getattr(config, "model_type", None)
    if config is None or not type(model).__name__.endswith("ForCausalLM") or not hasattr(model, "lm_head"):
        raise ExportError(f"{name}: {type(model).__name__} is not a transformers causal LM "
                          f"(expected a *ForCausalLM with an lm_head, e.g. LlamaForCausalLM)")
    if kind not in SUPPORTED:
        raise ExportError(f"{name}: model family {kind!r} is not supported (supported: {', '.join(SUPPORTED)})")
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    dtype = next(model.parameters()).dtype
    return {"model_type": kind, "num_layers": config.num_hidden_layers, "num_attention_heads": heads,
            "kv_heads": getattr(config, "num_key_value_heads", None) or heads, "head_dim": head_dim,
            "hidden_size": config.hidden_size, "vocab": config.vocab_size, "dtype": str(dtype).split(".")[-1]}


def _flat_cache(model, num_layers: int, embeds: bool):
    """model(first, attention_mask, position_ids, *past) -> (logits, *present), past and present flat
    as key0, value0, key1, value1, ... (defined here: torch is imported only when exporting)."""
    import torch
    from transformers import DynamicCache

    class FlatCache(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, first, attention_mask, position_ids, *past):
            # No config: every layer a full DynamicLayer, so present holds the whole sequence as the layout
            # says (a config with sliding_window would make window layers that drop old keys).
            cache = DynamicCache()
            for i in range(num_layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.model(**{"inputs_embeds" if embeds else "input_ids": first}, attention_mask=attention_mask,
                             position_ids=position_ids, past_key_values=cache, use_cache=True)
            present = [t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)]
            return (out.logits, *present)

    return FlatCache().eval()


def _names(num_layers: int, embeds: bool) -> tuple[list[str], list[str]]:
    kv = [(i, k) for i in range(num_layers) for k in ("key", "value")]
    inputs = ["inputs_embeds" if embeds else "input_ids", "attention_mask", "position_ids",
              *[f"past_key_values.{i}.{k}" for i, k in kv]]
    return inputs, ["logits", *[f"present.{i}.{k}" for i, k in kv]]


def _dynamic_shapes(num_layers: int, embeds: bool):
    from torch.export import Dim

    batch, seq, past, total = Dim("batch"), Dim("sequence"), Dim("past_sequence"), Dim("total_sequence")
    # The wrapper's *past is one argument to torch.export: its shapes are one tuple.
    return ({0: batch, 1: seq}, {0: batch, 1: total}, {0: batch, 1: seq}, ({0: batch, 2: past},) * (2 * num_layers))


def _example(facts: dict, embeds: bool, batch: int, sequence: int, past: int, seed: int = 0) -> dict:
    """A valid feed: random tokens (or embeddings) and past, a full mask, positions after the past."""
    rng = np.random.default_rng(seed)
    dtype = np.dtype(facts["dtype"]) if facts["dtype"] in ("float32", "float16", "float64") else np.float32
    first = (rng.standard_normal((batch, sequence, facts["hidden_size"])).astype(dtype) if embeds
             else rng.integers(0, facts["vocab"], (batch, sequence), dtype=np.int64))
    feed = {"first": first, "attention_mask": np.ones((batch, past + sequence), np.int64),
            "position_ids": np.tile(np.arange(past, past + sequence, dtype=np.int64), (batch, 1))}
    shape = (batch, facts["kv_heads"], past, facts["head_dim"])
    for i in range(2 * facts["num_layers"]):
        feed[f"past{i}"] = rng.standard_normal(shape).astype(dtype)
    return feed


def _name_total_dim(path: Path) -> None:
    """Call the outputs' "past_sequence + sequence" dim "total_sequence", as the layout names it."""
    model = onnx.load(str(path))
    for value in (*model.graph.output, *model.graph.value_info):
        for d in value.type.tensor_type.shape.dim:
            if d.dim_param.replace(" ", "") == "past_sequence+sequence":
                d.dim_param = "total_sequence"
    onnx.save(model, str(path))


def _prove_layout(info: dict, facts: dict, in_names: list, out_names: list, name: str) -> None:
    got_in = [t["name"] for t in info["inputs"]]
    got_out = [t["name"] for t in info["outputs"]]
    if got_in != in_names or got_out != out_names:
        raise ExportError(f"{name}: the file's inputs/outputs are {got_in} -> {got_out}, expected "
                          f"{in_names[:4]}... -> {out_names[:2]}...")
    kv, hd = facts["kv_heads"], facts["head_dim"]
    expected = {in_names[0]: ["batch", "sequence", *([facts["hidden_size"]] if facts["embeds"] else [])],
                "attention_mask": ["batch", "total_sequence"], "position_ids": ["batch", "sequence"],
                "logits": ["batch", "sequence", facts["vocab"]]}
    expected.update({n: ["batch", kv, "past_sequence", hd] for n in in_names[3:]})
    expected.update({n: ["batch", kv, "total_sequence", hd] for n in out_names[1:]})
    for t in (*info["inputs"], *info["outputs"]):
        if t["shape"] != expected[t["name"]]:
            raise ExportError(f"{name}: '{t['name']}' has shape {t['shape']} in the file, expected "
                              f"{expected[t['name']]} (a dim the exporter fixed or merged)")


def _prove_runs(path: Path, wrapper, facts: dict, atol: float, name: str) -> float:
    """Run the file at PROOF_RUNS; shapes as promised, logits as torch's. Returns the worst max-abs."""
    import torch

    from edgerun.ort import OrtError, OrtRunner

    try:
        runner = OrtRunner(path)
    except OrtError as e:
        raise ExportError(f"{name}: onnxruntime cannot load it ({brief(e.__cause__ or e)})") from e
    worst = 0.0
    with runner, torch.no_grad():
        for seed, (batch, seq, past) in enumerate(PROOF_RUNS):
            feed = _example(facts, facts["embeds"], batch, seq, past, seed=seed)
            try:
                out = runner.infer(dict(zip(runner.input_names, feed.values(), strict=True)))
            except OrtError as e:
                raise ExportError(f"{name}: onnxruntime fails at batch {batch}, sequence {seq}, past {past} "
                                  f"({brief(e.__cause__ or e)})") from e
            expected = (batch, facts["kv_heads"], past + seq, facts["head_dim"])
            shapes = {k: v.shape for k, v in out.items()}
            if shapes["logits"] != (batch, seq, facts["vocab"]) or any(
                    s != expected for k, s in shapes.items() if k != "logits"):
                raise ExportError(f"{name}: at batch {batch}, sequence {seq}, past {past} the outputs have "
                                  f"shapes {sorted(set(shapes.values()))}: a dynamic dim is not dynamic")
            reference = wrapper(*(torch.from_numpy(v) for v in feed.values()))[0].float().numpy()
            diff = float(np.abs(out["logits"].astype(np.float32) - reference).max())
            if not np.isfinite(diff) or diff > atol * max(1.0, float(np.abs(reference).max())):
                raise ExportError(f"{name}: logits differ from torch's by {diff:.3g} (max-abs) at batch {batch}, "
                                  f"sequence {seq}, past {past}; allowed {atol:g} x max(1, |logit|)")
            worst = max(worst, diff)
    return worst
