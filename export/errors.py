"""The export library's one error type."""


class ExportError(ValueError):
    """A bad model, file or option: the message is one line naming the file and what was expected."""


def brief(exc: BaseException, limit: int = 240) -> str:
    """One line from an exception raised by a library (torch, onnx, TensorRT messages run to pages)."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    text = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"
