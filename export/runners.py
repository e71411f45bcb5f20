"""onnxruntime runner with the same contract as Polygraphy's: a context manager with
`infer(feed: dict[str, ndarray]) -> dict[str, ndarray]`. Never imports torch: a Jetson runs it.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from export.errors import ExportError, brief


def available_ort_providers() -> list[str]:
    import onnxruntime as ort

    return list(ort.get_available_providers())


class OrtRunner:
    """An onnxruntime session on `path`.

    `providers` is passed to onnxruntime as given: names, or (name, options) pairs such as those
    of export.tensorrt.ort_tensorrt_provider_options. A provider missing from this onnxruntime
    build is an error, not a silent fall back to the CPU (which would make every timing lie).
    `threads` = 0 lets onnxruntime choose; `provider_options` is onnxruntime's list of option
    dicts, one per provider name.
    """

    def __init__(self, path, providers=("CPUExecutionProvider",), threads=0, provider_options=None):
        import onnxruntime as ort

        self.path = Path(path)
        name = self.path.name
        if not self.path.is_file():
            raise ExportError(f"{name}: no such file ({self.path})")
        providers = list(providers)
        wanted = [p[0] if isinstance(p, (tuple, list)) else p for p in providers]
        available = ort.get_available_providers()
        missing = [p for p in wanted if p not in available]
        if missing:
            raise ExportError(f"{name}: onnxruntime here has no {', '.join(missing)} "
                              f"(available: {', '.join(available)})")
        options = ort.SessionOptions()
        options.intra_op_num_threads = int(threads)
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=options,
                                                providers=providers,
                                                provider_options=provider_options)
        except Exception as e:
            raise ExportError(f"{name}: onnxruntime cannot load it ({brief(e)})") from e
        self.providers = self.session.get_providers()
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.session = None

    def infer(self, feed: dict) -> dict:
        if self.session is None:
            raise ExportError(f"{self.path.name}: this runner was closed")
        if set(feed) != set(self.input_names):
            raise ExportError(f"{self.path.name}: expected inputs {self.input_names}, "
                              f"got {sorted(feed)}")
        try:
            outputs = self.session.run(self.output_names, {k: np.asarray(v) for k, v in feed.items()})
        except Exception as e:
            raise ExportError(f"{self.path.name}: onnxruntime failed ({brief(e)})") from e
        return dict(zip(self.output_names, outputs))


def run_onnx(path, inputs: np.ndarray, batch_size=256, **runner_kwargs) -> dict:
    """Run a single-input model over `inputs` in batches; outputs concatenated along axis 0."""
    inputs = np.asarray(inputs)
    if len(inputs) == 0 or batch_size < 1:
        raise ExportError(f"{Path(path).name}: run_onnx needs at least one input row and "
                          f"batch_size ≥ 1 (got {len(inputs)} rows, batch_size {batch_size})")
    with OrtRunner(path, **runner_kwargs) as runner:
        if len(runner.input_names) != 1:
            raise ExportError(f"{Path(path).name}: run_onnx needs a single-input model, "
                              f"this one has {runner.input_names}")
        (input_name,) = runner.input_names
        chunks = [runner.infer({input_name: inputs[i:i + batch_size]})
                  for i in range(0, len(inputs), batch_size)]
    return {name: np.concatenate([c[name] for c in chunks]) for name in runner.output_names}
