"""The project's one error root. Every package subclasses it; the CLIs print it as one line (exit 1)."""
from __future__ import annotations


class EdgeError(Exception):
    """A user error (bad input, config, file or environment): one line naming what, where and why."""


def brief(exc: BaseException, limit: int = 240) -> str:
    """One line from an exception raised by a library (torch, onnx, TensorRT messages run to pages)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
