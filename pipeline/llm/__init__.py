"""The decoder's stages (task.kind = "generate"): the same stages in the same order as pipeline/stages.py lists,
with what a decoder needs in each — token data, a Hugging Face model folder between stages, logit distillation
over [B, T, V], an ONNX file with a KV cache, INT4 weights, time to first token and tokens/s.

`pipeline.llm.lm` is the one place that knows the libraries underneath (transformers, tokenizers, the decoder
exporter, NNCF's INT4, the runtime's generation loop); the stage modules here call it and the task
(pipeline/tasks/generate.py) for what the gates compare.
"""


def is_decoder(cfg) -> bool:
    """Whether a config runs the decoder stages: task.kind = generate, or auto with a decoder model."""
    kind = cfg.task.kind
    return kind == "generate" or (kind == "auto" and bool(cfg.model.pretrained or cfg.model.name == "decoder"))
