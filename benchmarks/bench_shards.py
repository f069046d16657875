"""Reading from many shards: store setup, and descriptors and resident memory per DataLoader worker.

At SceneVerse's scale (68k scenes in ~840 shards) every DataLoader worker of every rank reads from
every shard. The benchmark writes `--shards` small shards of `--scenes-per-shard` scenes each (one
folder with its `index.json`) and measures:

- store setup: `SceneStore(folder)` (from `index.json`, no shard opened) against `SceneStore` of the
  same shards named as files (each opened to count its scenes, what every setup did before);
- `--passes` epochs over every scene, each in its own shuffled order, through one DataLoader whose
  `--workers` workers persist (as in training), for each cap on open shards per worker
  (`--max-open`; 0: no cap, each worker keeps every shard it touched open): the most descriptors
  each worker held, its peak resident memory (RSS, and USS: the pages no other process shares) and
  the shards it kept open.

Descriptors are counted in /proc/self/fd after every item, memory read with psutil: Linux only.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sparsegps.benchmarks.arguments import add_common_arguments, command_line, main_for, resolve_common
from sparsegps.benchmarks.machine import machine_info
from sparsegps.benchmarks.report import Result, finish
from sparsegps.benchmarks.scenes import SCANNET20, random_room
from sparsegps.data.store import SceneStore, raise_open_file_limit, write_scenes

NAME = "shards"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--shards", type=int, default=None, help="shards to write and read (default 1000; quick 40)")
    parser.add_argument("--scenes-per-shard", type=int, default=2)
    parser.add_argument("--points", type=int, default=2000, help="points per scene (small: the shard count matters)")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader workers (default 8; quick 2)")
    parser.add_argument("--passes", type=int, default=None,
                        help="epochs read by the same workers (default 4; quick 2): without a cap, what a worker "
                             "holds open grows with every epoch")
    parser.add_argument("--max-open", type=int, nargs="+", default=[64, 0],
                        help="caps on open shards per worker to measure (0: none)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to write the shards (default: a temporary folder, removed after)")


class ProbedScenes(torch.utils.data.Dataset):
    """Reads scene i from a store; returns what the reading process holds right after."""

    def __init__(self, folder: Path, max_open: int):
        self.store = SceneStore(folder, max_open=max_open if max_open > 0 else 1 << 30)

    def __len__(self) -> int:
        return len(self.store)

    def __getitem__(self, i: int) -> dict:
        import psutil

        self.store[i]
        info = torch.utils.data.get_worker_info()
        memory = psutil.Process().memory_full_info()
        return {"worker": info.id if info else -1, "descriptors": len(os.listdir("/proc/self/fd")),
                "rss": memory.rss, "uss": memory.uss, "open_shards": len(self.store._open)}


def _keep(item):
    return item


def read_passes(folder: Path, orders: list[list[int]], workers: int, max_open: int) -> tuple[float, dict[int, dict]]:
    """Seconds of reading every order in turn through one DataLoader with persistent workers, and per
    worker the most it held of each probe."""
    order = [i for o in orders for i in o]
    loader = torch.utils.data.DataLoader(ProbedScenes(folder, max_open), batch_size=None, sampler=order,
                                         num_workers=workers, collate_fn=_keep,
                                         prefetch_factor=2 if workers else None)
    peaks: dict[int, dict] = {}
    start = time.perf_counter()
    for item in loader:
        peak = peaks.setdefault(item["worker"], {k: 0 for k in item if k != "worker"})
        for key, value in item.items():
            if key != "worker":
                peak[key] = max(peak[key], value)
    return time.perf_counter() - start, peaks


def write_shards(folder: Path, shards: int, per_shard: int, points: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    scenes = (random_room(f"scene{i:06d}", rng, num_objects=4, num_points=points) for i in range(shards * per_shard))
    write_scenes(tqdm(scenes, total=shards * per_shard, desc="writing shards", unit="scene", leave=False), folder,
                 vocabulary=SCANNET20, source="benchmark", max_scenes_per_shard=per_shard, progress=False)


def run(args: argparse.Namespace) -> dict:
    resolve_common(args, repeats=1, warmup=0)
    shards = args.shards or (40 if args.quick else 1000)
    workers = args.workers if args.workers is not None else (2 if args.quick else 8)
    passes = args.passes or (2 if args.quick else 4)
    if not Path("/proc/self/fd").is_dir():
        raise SystemExit("error: bench shards counts descriptors in /proc/self/fd (Linux)")
    import resource

    soft_before = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    soft, hard = raise_open_file_limit()
    machine = machine_info("cpu")
    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sparsegps-bench-shards-"))
    result = Result(NAME, command_line(NAME, getattr(args, "argv", None)), dict(vars(args)),
                    baseline="no cap on open shards (every shard a worker touched stays open)")
    result.config.update(shards=shards, workers=workers, passes=passes)
    try:
        folder = root / "shards"
        write_shards(folder, shards, args.scenes_per_shard, args.points, args.seed)
        files = sorted(folder.glob("*.h5"))
        setup = {}
        for name, paths in (("index.json", folder), ("shard files", files)):
            start = time.perf_counter()
            store = SceneStore(paths)
            setup[name] = time.perf_counter() - start
            assert len(store) == shards * args.scenes_per_shard
        rng = np.random.default_rng(args.seed + 1)
        orders = [rng.permutation(shards * args.scenes_per_shard).tolist() for _ in range(passes)]
        scenes_read = sum(map(len, orders))
        rows = []
        for max_open in tqdm(args.max_open, desc="reading", unit="cap", leave=False):
            seconds, peaks = read_passes(folder, orders, workers, max_open)
            per_worker = [peaks[w] for w in sorted(peaks)]
            rows.append({
                "max_open": max_open or "none", "workers": workers, "seconds": seconds,
                "scenes_per_s": scenes_read / seconds,
                "descriptors_max": max(p["descriptors"] for p in per_worker),
                "descriptors_median": float(np.median([p["descriptors"] for p in per_worker])),
                "open_shards_max": max(p["open_shards"] for p in per_worker),
                "rss_mb_max": max(p["rss"] for p in per_worker) / 2**20,
                "uss_mb_max": max(p["uss"] for p in per_worker) / 2**20,
                "uss_mb_median": float(np.median([p["uss"] for p in per_worker])) / 2**20,
            })
        result.rows = rows
        result.details = {"setup_seconds": setup, "open_file_limit": {"soft_before": soft_before, "soft": soft,
                                                                      "hard": hard}}
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    result.notes += [
        f"{shards} shards of {args.scenes_per_shard} scenes ({args.points} points each), read {passes} times, each "
        f"epoch in its own shuffled order, by the same {workers} DataLoader workers (prefetch 2); open_shards_max "
        f"without a cap is how many distinct shards a worker touched",
        f"store setup: {setup['index.json'] * 1e3:.0f} ms from index.json (no shard opened) vs "
        f"{setup['shard files'] * 1e3:.0f} ms opening the {shards} shards named as files",
        "descriptors: the most open in a worker at any item (/proc/self/fd: its shards, two each, plus what the "
        "worker inherits: pipes, shared-memory and library descriptors); rss / uss: its peak resident memory, and "
        "the part no other process shares",
        f"open-file limit: soft {soft_before} raised to {soft} (hard {hard}) by raise_open_file_limit, which "
        "training runs at start; workers inherit it",
    ]
    return finish(result, machine, ["max_open", "workers", "seconds", "scenes_per_s", "descriptors_max",
                                    "descriptors_median", "open_shards_max", "rss_mb_max", "uss_mb_max",
                                    "uss_mb_median"], args.out)


def main(argv: list[str] | None = None) -> dict:
    return main_for(sys.modules[__name__], NAME, argv)


if __name__ == "__main__":
    main()
