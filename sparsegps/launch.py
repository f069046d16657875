"""How a process finds its world: the launcher's environment, read once before the process group.

- torchrun and the DeepSpeed launcher set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT;
- `srun` sets SLURM_PROCID, SLURM_NTASKS (SLURM_STEP_NUM_TASKS in a step) and SLURM_LOCALID, and the
  rendezvous comes from MASTER_ADDR / MASTER_PORT when set, else from the first host of the step's node
  list and a port derived from the job id, so every task of one `srun` joins one world;
- a plain process (neither) is a world of one on a free local port.

An environment that names a world only in part (RANK without WORLD_SIZE, a SLURM task without a task
count or a host to meet at) is refused with one line rather than run as several worlds of one.
"""
from __future__ import annotations

import itertools
import os
import re
import socket
from dataclasses import dataclass
from typing import Mapping

from sparsegps.errors import UsageError

TORCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")
NODELIST_VARIABLES = ("SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST", "SLURM_NODELIST")
# Under SLURM without MASTER_PORT: this plus the job id's last four digits (the same on every task).
SLURM_PORT_BASE = 15000


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank, the world's size, its rank on its node, the rendezvous,
    and which launcher said so (torchrun/deepspeed, slurm, alone)."""

    rank: int
    size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str

    def environment(self) -> dict[str, str]:
        """The torch.distributed variables for this world."""
        return {"RANK": str(self.rank), "WORLD_SIZE": str(self.size), "LOCAL_RANK": str(self.local_rank),
                "MASTER_ADDR": self.master_addr, "MASTER_PORT": str(self.master_port)}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _integer(env: Mapping[str, str], name: str, launcher: str) -> int:
    value = env.get(name, "")
    try:
        return int(value)
    except ValueError:
        raise UsageError(f"{launcher}: {name}={value!r} is not an integer") from None


def discover_world(env: Mapping[str, str] | None = None) -> World:
    """This process's world from the launcher's environment (see the module's docstring)."""
    env = os.environ if env is None else env
    if "RANK" in env:
        missing = [name for name in TORCH_VARIABLES if name not in env and name != "LOCAL_RANK"]
        if missing:
            raise UsageError(f"RANK is set but not {', '.join(missing)}: start the ranks with torchrun, the deepspeed "
                             f"launcher or srun, or unset RANK to run one process")
        world = World(_integer(env, "RANK", "launcher"), _integer(env, "WORLD_SIZE", "launcher"),
                      _integer(env, "LOCAL_RANK", "launcher") if "LOCAL_RANK" in env else 0,
                      env["MASTER_ADDR"], _integer(env, "MASTER_PORT", "launcher"), "torchrun/deepspeed")
    elif "SLURM_PROCID" in env:
        world = _slurm_world(env)
    else:
        return World(0, 1, 0, "127.0.0.1", free_port(), "alone")
    if not 0 <= world.rank < world.size:
        raise UsageError(f"{world.launcher}: rank {world.rank} is outside a world of {world.size}")
    return world


def _slurm_world(env: Mapping[str, str]) -> World:
    tasks_variable = next((n for n in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS") if n in env), None)
    if tasks_variable is None:
        raise UsageError("SLURM_PROCID is set but neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS: start the tasks "
                         "with srun (e.g. srun --ntasks-per-node=8 sparsegps pretrain ...)")
    rank, size = _integer(env, "SLURM_PROCID", "slurm"), _integer(env, tasks_variable, "slurm")
    local_rank = _integer(env, "SLURM_LOCALID", "slurm") if "SLURM_LOCALID" in env else 0
    if size == 1:
        return World(rank, 1, local_rank, "127.0.0.1", free_port(), "slurm")
    address = env.get("MASTER_ADDR")
    if not address:
        nodelist_variable = next((n for n in NODELIST_VARIABLES if env.get(n)), None)
        if nodelist_variable is None:
            raise UsageError(f"slurm: {size} tasks but no host to meet at: set MASTER_ADDR, or run under srun "
                             f"(which sets {' / '.join(NODELIST_VARIABLES)})")
        try:
            address = expand_nodelist(env[nodelist_variable])[0]
        except ValueError as e:
            raise UsageError(f"slurm: {nodelist_variable}={env[nodelist_variable]!r}: {e}; set MASTER_ADDR") from None
    if "MASTER_PORT" in env:
        port = _integer(env, "MASTER_PORT", "slurm")
    elif env.get("SLURM_JOB_ID", "").isdigit():
        port = SLURM_PORT_BASE + int(env["SLURM_JOB_ID"][-4:])
    else:
        raise UsageError(f"slurm: {size} tasks but no port to meet at: set MASTER_PORT (or SLURM_JOB_ID)")
    return World(rank, size, local_rank, address, port, "slurm")


def rank_in_environment() -> int:
    """This process's rank as the launcher's environment says (RANK, else SLURM_PROCID), before or
    after the process group exists; 0 when neither is set or readable."""
    value = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    return int(value) if value.isdigit() else 0


def export_world() -> World:
    """Discover this process's world and write it into the environment as the torch.distributed
    variables, so that every later reader (DeepSpeed, the device choice, the command line's
    rank-0 messages) sees the same world; calling it again reads them back."""
    world = discover_world()
    os.environ.update(world.environment())
    return world


def export_local_rank(rank: int, world_size: int) -> None:
    """For a process group made without LOCAL_RANK in the environment (by a script, or by an earlier
    run in this process whose environment was since changed): DeepSpeed's engine reads it, so a
    group of one gets 0; a larger group is an error naming the variable."""
    if "LOCAL_RANK" in os.environ:
        return
    if world_size > 1:
        from sparsegps.errors import UsageError

        raise UsageError(f"this process is rank {rank} of a process group of {world_size} made without LOCAL_RANK "
                         f"in its environment, which DeepSpeed reads: set LOCAL_RANK (the rank within its node)")
    os.environ["LOCAL_RANK"] = "0"


_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


def _split_top_level(text: str) -> list[str]:
    """`text` split at the commas outside brackets."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise ValueError("unbalanced ']'")
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise ValueError("unbalanced '['")
    parts.append(text[start:])
    return [p for p in parts if p]


def _expand_range_list(spec: str) -> list[str]:
    """'01-03,07' -> ['01', '02', '03', '07'] (zero padding kept)."""
    values = []
    for item in spec.split(","):
        match = _RANGE.match(item.strip())
        if not match:
            raise ValueError(f"bad range {item!r}")
        lo, hi = match.group(1), match.group(2)
        if hi is None:
            values.append(lo)
            continue
        if int(hi) < int(lo):
            raise ValueError(f"descending range {item!r}")
        width = len(lo) if lo.startswith("0") else 0
        values += [str(n).zfill(width) for n in range(int(lo), int(hi) + 1)]
    return values


def expand_nodelist(nodelist: str) -> list[str]:
    """SLURM's compressed host list in order: 'node[01-03,07],gpu5' -> node01, node02, node03, node07,
    gpu5; several bracket groups in one name expand as their product ('r[1-2]n[1-2]' -> r1n1, r1n2,
    r2n1, r2n2). Raises ValueError on a malformed list."""
    hosts = []
    for name in _split_top_level(nodelist.strip()):
        pieces = re.split(r"(\[[^\[\]]*\])", name)
        choices = [_expand_range_list(p[1:-1]) if p.startswith("[") else [p] for p in pieces]
        if any("[" in p or "]" in p for p in pieces if not p.startswith("[")):
            raise ValueError(f"bad host name {name!r}")
        hosts += ["".join(combination) for combination in itertools.product(*choices)]
    if not hosts:
        raise ValueError("no hosts")
    return hosts


def strip_local_rank(argv: list[str]) -> tuple[list[str], int | None]:
    """`argv` without the DeepSpeed launcher's `--local_rank=N` / `--local_rank N` (before or after
    the subcommand), and N (None when absent). A value that is not a number is left for argparse
    to refuse."""
    out, local_rank, i = [], None, 0
    names = ("--local_rank", "--local-rank")
    while i < len(argv):
        arg = argv[i]
        name, _, value = arg.partition("=")
        if name in names and value.isdigit():
            local_rank = int(value)
        elif arg in names and i + 1 < len(argv) and argv[i + 1].isdigit():
            local_rank = int(argv[i + 1])
            i += 1
        else:
            out.append(arg)
        i += 1
    return out, local_rank


__all__ = ["World", "discover_world", "expand_nodelist", "export_world", "free_port", "rank_in_environment",
           "strip_local_rank"]
