"""The export library's error type (a subclass of the project's one root, edgerun.errors.EdgeError)."""
from edgerun.errors import EdgeError, brief

__all__ = ["ExportError", "brief"]


class ExportError(EdgeError):
    """A bad model, file or option: the message is one line naming the file and what was expected."""
