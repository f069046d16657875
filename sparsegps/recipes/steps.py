"""Run `sparsegps` commands as the jobs of a recipe (the demo, the grounding recipe, the transfer
benchmark): each in its own process, after the jobs it waits for, `parallel` at a time with the
cores shared between them; its whole output kept in LOGS/<name>.log and its time recorded.

One job at a time, a job's progress bars and key lines are shown as it runs; several at a time,
each job's command is shown when it starts and its time when it ends. A job with a `result` file
that already exists is not run again, so a killed recipe continues where it stopped.
"""
from __future__ import annotations

import concurrent.futures
import os
import re
import shlex
import subprocess
import sys
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from sparsegps.errors import JobFailed, UsageError


class OutOfTime(Exception):
    """A job was not started: the runner's deadline had passed (`Jobs(deadline=...)`)."""

DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SHOWN = ("%|", "wrote ", "scenes ", "texts ", "resumed", "Error", "error", "zero-shot:")


@dataclass
class Job:
    """One `sparsegps` command, the jobs it waits for, and the file whose existence means it is done
    (None: it always runs)."""

    name: str
    argv: list[str]
    after: list[str] = field(default_factory=list)
    result: Path | None = None
    exclusive: bool = False  # runs alone, with every core (no other job runs beside it)
    ranks: int = 1  # local data-parallel ranks (torch.distributed.run), the job's cores shared between them

    @property
    def done(self) -> bool:
        return self.result is not None and self.result.exists()


class Jobs:
    """`jobs.add(Job(...))` runs a job once the jobs it waits for have ended, at most `parallel` at a
    time, the earliest added first among those ready; an exclusive job waits for the running ones to
    end, runs alone with every core, and no later job starts before it. `seconds` holds each run
    job's time. Once a job fails, no further job starts (those not started fail with it), the
    running ones are stopped (SIGTERM: a training command saves a checkpoint and exits) and
    `jobs.wait()` raises the first failure once they have ended: no command outlives the recipe."""

    def __init__(self, logs: Path, parallel: int = 1, deadline: float | None = None):
        """`deadline`: a `time.perf_counter()` after which no job starts (those not started fail
        with `OutOfTime`; the running ones end as they would)."""
        self.logs, self.parallel, self.deadline = logs, max(1, parallel), deadline
        self.logs.mkdir(parents=True, exist_ok=True)
        # torch threads per job: the cores shared between the jobs running at once (one job: as set)
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.cores = cores
        self.threads = None if self.parallel == 1 else max(1, cores // self.parallel)
        self.futures: dict[str, Future] = {}
        self.seconds: dict[str, float] = {}
        self.pending: list[Job] = []  # in the order added
        self.running = 0
        self.exclusive_running = False
        self.failure: BaseException | None = None  # the first job's failure; nothing starts after it
        self.processes: dict[str, subprocess.Popen] = {}  # of the running jobs
        self.lock = threading.RLock()
        self.start = time.perf_counter()

    def add(self, job: Job) -> None:
        with self.lock:
            self.futures[job.name] = Future()
            self.pending.append(job)
            self._dispatch()

    def wait(self, names: list[str] | None = None) -> None:
        """Wait until the jobs `names` (default: all) have ended; raise the first failure."""
        futures = [self.futures[name] for name in (names if names is not None else list(self.futures))]
        concurrent.futures.wait(futures)
        if names is None and self.failure is not None:
            raise self.failure  # not the stopped jobs' exits
        for future in futures:
            future.result()

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 1)

    def _dispatch(self) -> None:
        """Start the ready jobs, earliest added first, while slots are free; after a failure, fail
        every job not started (called under the lock, on every add and every end)."""
        for job in list(self.pending):
            waits = [self.futures[name] for name in job.after if name in self.futures]
            if self.failure is not None:
                self.pending.remove(job)
                self.futures[job.name].set_exception(self.failure)
                continue
            ready = all(w.done() for w in waits)
            if ready and not job.done and self.deadline is not None and time.perf_counter() > self.deadline:
                self.pending.remove(job)
                self.futures[job.name].set_exception(OutOfTime(f"{job.name}: not started, out of time"))
                continue
            if ready and job.done:
                self.pending.remove(job)
                self.seconds[job.name] = 0.0
                print(f"{job.name}: done before", flush=True)
                self.futures[job.name].set_result(None)
            elif ready and job.exclusive:
                if self.running == 0:
                    self.pending.remove(job)
                    self._start(job)
                return  # nothing later starts before it
            elif ready and not self.exclusive_running and self.running < self.parallel:
                self.pending.remove(job)
                self._start(job)

    def _start(self, job: Job) -> None:
        self.running += 1
        self.exclusive_running = job.exclusive
        threading.Thread(target=self._run, args=(job,), name=f"job {job.name}", daemon=True).start()

    def _run(self, job: Job) -> None:
        t = time.perf_counter()
        log = self.logs / (job.name.replace("/", "_") + ".log")
        with self.lock:
            print(f"\n$ sparsegps {shlex.join(job.argv)}" if self.parallel == 1 else
                  f"[start] {job.name}: sparsegps {shlex.join(job.argv)}", flush=True)
        error = None
        try:
            code = run_command(job.argv, log, show=self.parallel == 1, threads=self.job_threads(job),
                               started=lambda process: self._started(job, process), ranks=job.ranks)
            if code or (job.result is not None and not job.done):
                error = JobFailed(f"{job.name} failed (exit {code}); see {log}\n$ sparsegps {shlex.join(job.argv)}")
        except Exception as e:  # noqa: BLE001 - handed to whoever waits
            error = e
        with self.lock:
            self.running -= 1
            self.exclusive_running = False
            self.processes.pop(job.name, None)
            if error is None:
                self.seconds[job.name] = round(time.perf_counter() - t, 1)
                if self.parallel > 1:
                    print(f"[done {len(self.seconds)}/{len(self.futures)}] {job.name} "
                          f"({self.seconds[job.name]:.0f} s)", flush=True)
                self.futures[job.name].set_result(None)
            else:
                if self.failure is None:
                    self.failure = error
                    for process in self.processes.values():
                        process.terminate()
                self.futures[job.name].set_exception(error)
            self._dispatch()

    def job_threads(self, job: Job) -> int | None:
        """Torch threads per process of `job`: its cores (every core when exclusive, else the runner's
        share; None: as the environment sets) over its ranks."""
        cores = self.cores if job.exclusive else self.threads
        if job.ranks == 1:
            return None if job.exclusive else cores
        return max(1, (cores or self.cores) // job.ranks)

    def _started(self, job: Job, process: subprocess.Popen) -> None:
        with self.lock:
            self.processes[job.name] = process
            if self.failure is not None:  # failed while this one was starting
                process.terminate()


def command(name: str, settings: Mapping[str, object] | None = None, /, **flags) -> list[str]:
    """The arguments of `sparsegps NAME`: each flag (`output_dir=path` -> `--output-dir path`; True:
    the bare flag; None or False: left out; a list: its items), then each config setting as
    `--set key=value` (a list written `[a,b]`, a float with `g`).

        command("eval-seg", checkpoint=export, data=test, zero_shot=True)
        command("pretrain", {"steps": 200, "data.val": []}, config=path, overwrite=True)
    """
    argv = [name]
    for key, value in flags.items():
        flag = "--" + key.replace("_", "-")
        if value is True:
            argv.append(flag)
        elif isinstance(value, (list, tuple)):
            argv += [flag, *map(str, value)]
        elif value is not None and value is not False:
            argv += [flag, str(value)]
    for key, value in (settings or {}).items():
        argv += ["--set", f"{key}={setting_text(value)}"]
    return argv


def setting_text(value: object) -> str:
    """A config value as `--set` reads it (YAML flow): lists as [a,b], floats as %g, paths as text."""
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(setting_text, value)) + "]"
    if isinstance(value, float):  # with a dot in the mantissa: YAML 1.1 reads 1e-05 as a string
        mantissa, e, exponent = f"{value:g}".partition("e")
        return f"{mantissa}{'' if '.' in mantissa or not e else '.0'}{e}{exponent}"
    return str(value)


def parse_settings(items: list[str]) -> dict[str, str]:
    """`KEY=VALUE` strings of a recipe's own flag (e.g. the demo's --pretrain-set) as settings."""
    bad = [item for item in items if "=" not in item]
    if bad:
        raise UsageError(f"expected KEY=VALUE, got {bad[0]!r}")
    return dict(item.split("=", 1) for item in items)


def local_ranks(global_batch: int, cores: int, most: int = 2) -> int:
    """Data-parallel ranks for a CPU training job on `cores` cores: the most, up to `most`, that
    divide `global_batch`. spconv's CPU gathers and scatters run on one thread, so on 2 cores two
    ranks of one thread pre-train 1.2x faster than one process of two (benchmarks/RESULTS.md, "step")."""
    return max(r for r in range(1, max(1, min(cores, most)) + 1) if global_batch % r == 0)


def run_recipe(main: Callable[[], int]) -> None:
    """A recipe's `python -m` entry point: exit with `main()`'s status; a failed job is one message
    naming the job, its log and its command, and a bad config one naming the file and key (exit 1),
    without a traceback."""
    try:
        sys.exit(main())
    except (JobFailed, UsageError) as e:
        sys.exit(f"error: {e}")


def command_environment(threads: int | None = None) -> dict[str, str]:
    """This process's environment for a `sparsegps` command of its own: without this process's
    rendezvous (a command meets only its own ranks), unbuffered, with `threads` threads if given."""
    env = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_command(args: list[str], log: Path, show: bool = True, threads: int | None = None,
                started: Callable[[subprocess.Popen], None] | None = None, ranks: int = 1) -> int:
    """Run `sparsegps ARGS` as a world of its own (not the rendezvous of a process group this
    process may be in; with `ranks` > 1, a world of that many local ranks started by
    `torch.distributed.run`), keeping its whole output in `log` and, with `show`, printing its
    progress bars and key lines; `started` is handed the process; returns its exit code."""
    cmd = [sys.executable, "-m", "sparsegps.cli", *args]
    if ranks > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
               "-m", "sparsegps.cli", *args]
    env = command_environment(threads)
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        if started is not None:
            started(proc)
        pending = b""
        while chunk := proc.stdout.read1(65536):
            f.write(chunk)
            if not show:
                continue
            pending += chunk
            *segments, pending = re.split(rb"(?<=[\r\n])", pending)  # progress bars end in \r
            for segment in segments:
                text = segment.decode(errors="replace")
                if any(key in text for key in SHOWN):
                    sys.stdout.write(text)
                    sys.stdout.flush()
        code = proc.wait()
    if show:
        sys.stdout.write("\n")
    return code


__all__ = ["Job", "JobFailed", "Jobs", "command", "local_ranks", "parse_settings", "run_command", "run_recipe",
           "setting_text"]
