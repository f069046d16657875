"""A run folder belongs to one run: `RUN/.lock`, created by rank 0 when the run starts and removed
when it ends (success, error or stop), names the process that holds it.

A second run started in the folder is refused in one line naming the holder. A lock whose process
is gone (on this host: no such pid; a run killed with SIGKILL, or a machine that rebooted) is stale:
the new run takes it over and says so. A lock held on another host cannot be checked from here and
is refused; its file is named, to be removed by hand once that run is known to be gone.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import time
from pathlib import Path

LOCK_NAME = ".lock"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _holder(path: Path) -> dict | None:
    """The lock's contents; None when it is unreadable (damaged: a live writer never leaves it so)."""
    try:
        holder = json.loads(path.read_text())
        return holder if isinstance(holder, dict) and isinstance(holder.get("pid"), int) else None
    except (OSError, ValueError):
        return None


def acquire(folder: Path) -> str | None:
    """Take `folder`'s lock for this process; the error (one line) when another live run holds it."""
    path = folder / LOCK_NAME
    me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S"),
          "command": " ".join(sys.argv[:3])}
    # written whole to a file of this process's own, then linked into place: a lock is never seen
    # half-written by another run while its writer lives
    mine = folder / f"{LOCK_NAME}.{me['pid']}.tmp"
    mine.write_text(json.dumps(me))
    try:
        for _ in range(3):  # two runs taking over one stale lock: one of them links it first
            try:
                os.link(mine, path)
                return None
            except FileExistsError:
                pass
            holder = _holder(path)
            if holder is not None and (holder.get("host") != me["host"] or _alive(holder["pid"])):
                where = "" if holder.get("host") == me["host"] else f"; if that run is gone, remove {path}"
                return (f"{folder} belongs to a running run (pid {holder['pid']} on {holder.get('host')}, since "
                        f"{holder.get('started')}: {holder.get('command', '?')}); give this run another "
                        f"--output-dir, or wait for that one{where}")
            described = f"pid {holder['pid']}, since {holder.get('started')}" if holder else "unreadable"
            print(f"warning: {path}: a stale lock ({described}, no such process); taken over", flush=True)
            path.unlink(missing_ok=True)
    finally:
        mine.unlink(missing_ok=True)
    return f"{path}: could not take the folder's lock (another run is taking it over at the same moment)"


def release(folder: Path) -> None:
    """Remove `folder`'s lock if this process holds it."""
    path = folder / LOCK_NAME
    holder = _holder(path)
    if holder is not None and holder["pid"] == os.getpid() and holder.get("host") == socket.gethostname():
        path.unlink(missing_ok=True)
