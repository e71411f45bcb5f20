"""The pipeline's errors. The CLI prints them as one line: exit 1 for user errors, 2 for failed gates."""
from __future__ import annotations

from edgerun.errors import EdgeError


class PipelineError(EdgeError):
    """A user error (bad config, missing file, bad input): one line naming what and where."""


class ContractError(Exception):
    """A stage read a config key or a stage it did not declare: a bug in the stage, never the user's."""


class GateFailed(EdgeError):
    """An accuracy gate failed (exit 2). ``record`` is the failed stage's StageRecord."""

    def __init__(self, message: str, record):
        super().__init__(message)
        self.record = record
