"""Failures a user can fix, reported by the command line as one line and exit status 2."""
from __future__ import annotations


class UsageError(Exception):
    """An expected failure: a missing or unreadable file, a checkpoint of another model, a resume
    with nothing to resume. The message names the file and says what to do."""


__all__ = ["UsageError"]
