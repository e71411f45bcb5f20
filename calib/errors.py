class CalibError(ValueError):
    """A bad calibration input or model: the message is one line naming the file and what was expected."""
