"""The decoder's engine stage: nothing is built here. A decoder's TensorRT engine comes from TensorRT Edge-LLM on the
device, from the Hugging Face folder the bundle carries (hf/, EDGE_LLM.md); the shapes are checked against its
kernels' documented limits by the package stage's pre-flight."""
from __future__ import annotations

from pipeline.runner import Context, Output


def engine_keys(cfg):
    return []


def engine(ctx: Context) -> Output:
    return Output(status="skipped", reason="a decoder's engine is built on the device by TensorRT Edge-LLM from the "
                                           "bundle's hf/ folder (EDGE_LLM.md); not built here")
