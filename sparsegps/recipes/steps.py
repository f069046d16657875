"""Run `sparsegps` commands as steps of a recipe: each in its own process, its progress bars and key
lines shown, its whole output kept in a log, its time recorded."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

DISTRIBUTED_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
SHOWN = ("%|", "wrote ", "scenes ", "texts ", "resumed", "Error", "error", "zero-shot:")


def run_command(args: list[str], log: Path) -> None:
    """Run `sparsegps ARGS`, showing the command, its progress bars and key lines, keeping the whole
    output in `log`; a failure ends the recipe naming the log."""
    cmd = [sys.executable, "-m", "sparsegps.cli", *args]
    print(f"\n$ sparsegps {shlex.join(args)}", flush=True)
    # each step is a world of its own: not the rendezvous of a process group this process may be in
    inherited = {k: v for k, v in os.environ.items() if k not in DISTRIBUTED_ENV}
    env = {**inherited, "PYTHONUNBUFFERED": "1"}
    with open(log, "wb") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        pending = b""
        while chunk := proc.stdout.read1(65536):
            f.write(chunk)
            pending += chunk
            *segments, pending = re.split(rb"(?<=[\r\n])", pending)  # progress bars end in \r
            for segment in segments:
                text = segment.decode(errors="replace")
                if any(key in text for key in SHOWN):
                    sys.stdout.write(text)
                    sys.stdout.flush()
        if proc.wait():
            raise SystemExit(f"step failed (exit {proc.returncode}); see {log}")
    sys.stdout.write("\n")


class Steps:
    """The steps of one recipe: `steps("name", [...])` runs a command; `seconds` holds each one's time."""

    def __init__(self, logs: Path):
        self.logs = logs
        self.logs.mkdir(parents=True, exist_ok=True)
        self.seconds: dict[str, float] = {}
        self.start = time.perf_counter()

    def __call__(self, name: str, args: list[str]) -> None:
        t = time.perf_counter()
        run_command(args, self.logs / f"{name}.log")
        self.seconds[name] = round(time.perf_counter() - t, 1)

    def total(self) -> float:
        return round(time.perf_counter() - self.start, 1)
