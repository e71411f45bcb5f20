"""The calibration library's error type (a subclass of the project's one root, EdgeError)."""
from edgerun.errors import EdgeError


class CalibError(EdgeError):
    """A bad calibration input or model: the message is one line naming the file and what was expected."""
