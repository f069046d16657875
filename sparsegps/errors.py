"""Failures a user can fix, reported by the command line as one line and exit status 2; the stop
on a signal, reported as one line and exit status 128 + the signal's number; a recipe's failed
command, reported as one line naming its log and exit status 1."""
from __future__ import annotations


class UsageError(Exception):
    """An expected failure: a missing or unreadable file, a checkpoint of another model, a resume
    with nothing to resume. The message names the file and says what to do."""


class Preempted(Exception):
    """Training stopped on a signal (SIGTERM, SIGUSR1) after every rank finished its step and a
    complete checkpoint was saved; the same command with `--resume auto` continues the run. The
    command line exits with `exit_code` (128 + the signal's number, as a shell reports a process
    the signal ended), so schedulers and torchrun see a stopped run, not a finished one."""

    def __init__(self, signal_name: str, signal_number: int, step: int, checkpoint: str):
        super().__init__(f"stopped by {signal_name} after step {step}: checkpoint {checkpoint} saved; the same "
                         f"command with --resume auto continues the run")
        self.signal_name, self.step, self.checkpoint = signal_name, step, checkpoint
        self.exit_code = 128 + signal_number


class CollectiveError(RuntimeError):
    """A collective of a run on several ranks failed or timed out: another rank ended or stopped
    answering. The message names this rank and the step; the command line prints it as one line
    (exit status 1) after leaving the failing rank the time to print its own error first."""


class JobFailed(RuntimeError):
    """A command that a recipe ran as a job (the demo, the grounding recipe, the transfer benchmark)
    exited non-zero or without its result; the message names the job, its log and its command."""


__all__ = ["CollectiveError", "JobFailed", "Preempted", "UsageError"]
