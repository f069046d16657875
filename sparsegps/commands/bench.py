"""Benchmarks: `sparsegps bench NAME [flags]`. Throughput against GPS's pipeline, and `transfer`,
what pre-training buys downstream.

Every speed is reported as a ratio to a baseline measured in the same run on the same machine.
`sparsegps bench list` shows the benchmarks and whether each is installed; `sparsegps bench NAME
--help` shows a benchmark's flags; `sparsegps bench all --quick --out DIR` runs every installed
one with the flags given.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

# name -> (module, one-line description)
BENCHMARKS: dict[str, tuple[str, str]] = {
    "data": ("sparsegps.benchmarks.bench_data",
             "scenes/s reading scenes: HDF5 shards vs per-scene .pth (GPS) vs per-scene .npy folders"),
    "encoder": ("sparsegps.benchmarks.bench_encoder",
                "object encoding: spconv U-Net + instance pooling vs GPS's PointNet++"),
    "shards": ("sparsegps.benchmarks.bench_shards",
               "many shards: store setup from index.json; descriptors and memory per DataLoader worker"),
    "batch-prep": ("sparsegps.benchmarks.bench_batch_prep",
                   "stored scene -> model input: shards + voxelization vs GPS's per-object resampling"),
    "attention": ("sparsegps.benchmarks.bench_spatial_attention",
                  "fused spatial attention kernel vs the materialised PyTorch reference"),
    "train-step": ("sparsegps.benchmarks.bench_train_step", "one pre-training step, end to end, under ZeRO 0-3"),
    "step": ("sparsegps.benchmarks.bench_step",
             "where a pre-training step's time goes, by component; forms of the model against each other"),
    "runs": ("sparsegps.benchmarks.bench_runs",
             "whole pre-training runs of several installs or configs, alternated: scenes/s"),
    "scaling": ("sparsegps.benchmarks.bench_scaling", "throughput as batch size and scene size grow"),
    "grad-underflow": ("sparsegps.benchmarks.bench_grad_underflow",
                       "how much of the U-Net's gradient fp16 loses, with and without gradient scaling"),
    "transfer": ("sparsegps.benchmarks.bench_transfer",
                 "what pre-training buys: fine-tuning per preset vs scratch, seeds, test rooms (a learning benchmark)"),
}


def availability(name: str) -> str | None:
    """None when the benchmark can run, else why not."""
    module = BENCHMARKS[name][0]
    try:
        found = importlib.util.find_spec(module) is not None
    except ImportError as e:
        return f"not available ({e})"
    return None if found else "not available (not installed in this version)"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", choices=[*BENCHMARKS, "list", "all"],
                        help="which benchmark ('list' shows them all, 'all' runs every installed one)")
    parser.add_argument("flags", nargs=argparse.REMAINDER,
                        help="the benchmark's own flags (see `sparsegps bench NAME --help`)")
    parser.epilog = "benchmarks:\n" + "\n".join(f"  {n:<12} {d}" for n, (_, d) in BENCHMARKS.items())


def run_benchmark(name: str, flags: list[str]) -> dict:
    """Run benchmark `name` with its command-line `flags`; returns its result dict.

    A module either exposes `add_arguments(parser)` and `run(args) -> dict`, or parses its own
    flags in `main(argv) -> dict`.
    """
    why = availability(name)
    if why is not None:
        from sparsegps.errors import UsageError

        raise UsageError(f"benchmark {name!r} is {why}")
    module = importlib.import_module(BENCHMARKS[name][0])
    if not hasattr(module, "add_arguments"):
        return module.main(list(flags))
    parser = argparse.ArgumentParser(prog=f"sparsegps bench {name}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    args = parser.parse_args(flags)
    args.argv = list(flags)
    return module.run(args)


def run(args) -> int:
    if args.name == "list":
        width = max(map(len, BENCHMARKS))
        for name, (_, description) in BENCHMARKS.items():
            print(f"{name:<{width}}  {availability(name) or 'available':<46}  {description}")
        return 0
    names = [n for n in BENCHMARKS if availability(n) is None] if args.name == "all" else [args.name]
    if args.name == "all":
        skipped = [n for n in BENCHMARKS if n not in names]
        if skipped:
            print(f"skipping (not available): {', '.join(skipped)}", file=sys.stderr)
    for name in names:
        run_benchmark(name, list(args.flags))
    return 0
