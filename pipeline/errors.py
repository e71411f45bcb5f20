"""The project's own errors. The CLI prints them as one line: exit 1 for user errors, 2 for gates."""


class PipelineError(Exception):
    """A user error (bad config, missing file, bad input): one line naming what and where."""


class GateFailed(Exception):
    """An accuracy gate failed; the message names the stage, the metric, the drop and the limit."""
