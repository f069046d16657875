"""When a run must save between its scheduled checkpoints: a stop signal, or the checkpoint clock.

`StopSignals` turns SIGTERM (what SLURM and Kubernetes send before killing a job, and what torchrun
forwards) and SIGUSR1 (`sbatch --signal=USR1@120`) into a flag instead of an exit, while training
runs. `CheckpointClock` says when `checkpoint_every_minutes` have passed, by rank 0's clock alone.
Neither decides anything on its own: the loop adds both to the one collective it issues per
micro-batch, so every rank sees the same answer at the same step (a rank that got no signal stops
with the others), finishes the step, saves a complete checkpoint and stops.
"""
from __future__ import annotations

import signal
import threading
import time

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGUSR1") if hasattr(signal, name))


class StopSignals:
    """While entered, SIGTERM and SIGUSR1 set `received` (the first one's number) instead of ending
    the process; the previous handlers come back on exit. Outside the main thread, does nothing."""

    def __init__(self):
        self.received: int | None = None
        self._previous: dict[int, object] = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received = signum

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous = {}


def ignore_stop_signals_in_worker(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: workers outlive a stop signal sent to every process of a job
    (SLURM signals them all; torch's worker handler would end them, and the training process would
    then fail on a dead worker). The training process shuts them down itself when it stops."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class CheckpointClock:
    """`due()` once `minutes` have passed since the last `reset()`, on rank 0; always False on other
    ranks and when `minutes` is 0 (only rank 0's answer counts, so the ranks' clocks never disagree)."""

    def __init__(self, minutes: float, rank: int):
        self.seconds = minutes * 60.0
        self.rank = rank
        self.reset()

    def reset(self) -> None:
        self.last = time.monotonic()

    def due(self) -> bool:
        return self.rank == 0 and self.seconds > 0 and time.monotonic() - self.last >= self.seconds


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


__all__ = ["CheckpointClock", "STOP_SIGNALS", "StopSignals", "ignore_stop_signals_in_worker", "signal_name"]
