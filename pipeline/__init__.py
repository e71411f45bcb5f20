"""Edge deployment pipeline: prune → fine-tune → ONNX → INT8 → TensorRT → profile → package.

    import pipeline
    result = pipeline.run("configs/cpu.toml", overrides=["prune.macs=0.2"])

Importing this package stays light (no torch): the heavy parts load when a stage needs them.
"""


def run(config, overrides=(), **kwargs):
    """Run the pipeline; see pipeline.api.run. Returns a pipeline.api.RunResult."""
    from pipeline.api import run as _run
    return _run(config, overrides, **kwargs)
