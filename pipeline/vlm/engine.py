"""The VLM's engine stage: nothing is built here (no TensorRT on this machine). The vision tower's engine is built
on the device from the bundle's trt/vision.onnx with edgerun/build_engine.sh, the decoder's by TensorRT Edge-LLM
from hf/ (JETSON.md in the bundle)."""
from __future__ import annotations

from pipeline.runner import Context, Output


def engine_keys(cfg):
    return []


def engine(ctx: Context) -> Output:
    return Output(status="skipped", reason="a VLM's engines are built on the device: the vision tower from "
                                           "trt/vision.onnx, the decoder by TensorRT Edge-LLM (JETSON.md)")
