"""Flags every benchmark shares, the reproducing command line, and `python -m` entry points."""
from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path
from typing import Sequence

import torch

from sparsegps.runtime import configure_process


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every benchmark takes: device, quick mode, output folder, repeats, seed."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where models run")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and one repeat: a smoke test that finishes in under a minute")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for <name>.json, <name>.md (and <name>.png); default: print only")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median is reported)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs before timing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic scenes")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")


def resolve_common(args: argparse.Namespace, *, repeats: int = 3, warmup: int = 1) -> argparse.Namespace:
    """Fill in repeat counts (quick mode: one warm-up run, one timed run), set threads, check the device."""
    if args.repeats is None:
        args.repeats = 1 if args.quick else repeats
    if args.warmup is None:
        args.warmup = 1 if args.quick else warmup
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("error: --repeats must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for but torch sees no CUDA device")
    configure_process(threads=args.threads)
    return args


def configs_folder() -> Path:
    """`configs/` of the working directory, else the one beside this package in a source checkout."""
    for folder in (Path("configs"), Path(__file__).resolve().parents[1] / "configs"):
        if (folder / "deepspeed").is_dir():
            return folder
    raise SystemExit("error: no configs/ folder found here or in the source checkout; pass --config and "
                     "--deepspeed-dir")


def command_line(name: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["sparsegps", "bench", name, *argv])


def main_for(module, name: str, argv: Sequence[str] | None = None) -> dict:
    """Parse `argv` with the module's `add_arguments` and run it (what `python -m` does)."""
    parser = argparse.ArgumentParser(prog=f"sparsegps bench {name}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return module.run(args)
