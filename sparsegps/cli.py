"""The `sparsegps` command. Each subcommand lives in `sparsegps/commands/<name>.py` with
`add_arguments(parser)` and `run(args) -> int`; only the chosen one is imported."""
from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import os
import sys
import time
import warnings

from sparsegps import __version__

# Seconds a rank other than 0 waits before exiting on an error a user can fix (rank 0 prints it).
ERROR_GRACE_S = 3.0

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("sparsegps.commands.synth", "generate procedural rooms with language and pack them to shards"),
    "pack": ("sparsegps.commands.pack", "pack scenes (SceneVerse, ScanNet v2, per-scene .npy folders) into shards"),
    "inspect": ("sparsegps.commands.inspect", "summarise shards and verify their checksums"),
    "show": ("sparsegps.commands.show", "draw a scene, a sentence about it and what a model makes of it"),
    "annotate": ("sparsegps.commands.annotate", "add scene-graph language to packed scenes"),
    "pretrain": ("sparsegps.commands.pretrain", "pre-train GPS on shards with DeepSpeed"),
    "export": ("sparsegps.commands.export", "write a consolidated fp32 state dict from a training checkpoint"),
    "eval-pretrain": ("sparsegps.commands.eval_pretrain", "grounding accuracy and retrieval of a pre-trained model"),
    "finetune-seg": ("sparsegps.commands.finetune_seg", "fine-tune the backbone for semantic segmentation"),
    "eval-seg": ("sparsegps.commands.eval_seg", "evaluate semantic segmentation (mIoU) on shards"),
    "finetune-ground": ("sparsegps.commands.finetune_ground", "fine-tune grounding on Nr3D / Sr3D / ScanRefer"),
    "eval-ground": ("sparsegps.commands.eval_ground", "evaluate grounding with the benchmark's metrics"),
    "probe": ("sparsegps.commands.probe", "probe one skill of a model (relations: spatial reasoning on "
              "ground-truth objects)"),
    "bench": ("sparsegps.commands.bench", "throughput benchmarks against GPS's pipeline"),
    "doctor": ("sparsegps.commands.doctor", "check torch, the GPU, spconv, torch-scatter, Triton, DeepSpeed, the text encoder"),
}


def _available() -> dict[str, tuple[str, str]]:
    return {n: c for n, c in COMMANDS.items() if importlib.util.find_spec(c[0]) is not None}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [a for a in argv if a != "--debug"]
    # the deepspeed launcher passes --local_rank=N before the subcommand (`--module sparsegps.cli`);
    # it sets LOCAL_RANK too, which is what the training commands read
    from sparsegps.launch import strip_local_rank

    argv, local_rank = strip_local_rank(argv)
    if local_rank is not None:
        os.environ.setdefault("LOCAL_RANK", str(local_rank))
    commands = _available()
    if not argv or argv[0] not in commands:
        parser = argparse.ArgumentParser(
            prog="sparsegps", formatter_class=argparse.RawDescriptionHelpFormatter,
            description="Grounded 3D vision-language pre-training (GPS) on sparse voxels, at scale.",
            epilog="commands:\n" + "\n".join(f"  {n:<16} {h}" for n, (_, h) in commands.items())
            + "\n\nRun `sparsegps COMMAND --help` for a command's options. Errors a user can fix (a missing "
            "file, a bad config) print one line and exit 2; add --debug to any command for the traceback.")
        parser.add_argument("command", choices=list(commands), help="what to run")
        parser.add_argument("--version", action="version", version=f"sparsegps {__version__}")
        parser.parse_args(argv[:1])
        return 2
    name = argv[0]
    # spconv's import warns about torch.cuda.amp decorators it uses; nothing a user can act on
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"spconv\.")
    # torch.fx warns once about a deprecated tracing check that DeepSpeed's hooks call
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)
    module = importlib.import_module(commands[name][0])
    parser = argparse.ArgumentParser(prog=f"sparsegps {name}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    args = parser.parse_args(argv[1:])
    from sparsegps.errors import CollectiveError, JobFailed, Preempted
    from sparsegps.launch import rank_in_environment
    from sparsegps.runtime import configure_process

    configure_process()

    try:
        status = int(module.run(args) or 0)
    except Preempted as e:  # a signal stopped training after a complete checkpoint
        if rank_in_environment() == 0:
            print(str(e), file=sys.stderr)
        return e.exit_code
    except JobFailed as e:  # a recipe's command failed: its log says why
        if debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 1
    except _expected_errors() as e:
        if debug:
            raise
        rank = rank_in_environment()
        if rank == 0:
            print(f"error: {one_line(e)}", file=sys.stderr)
        else:
            # The launcher ends every rank when the first one exits: an error every rank met (a bad
            # config) is said once, by rank 0, which does not wait; one that only this rank met (a
            # damaged scene in its batch) is said here once rank 0 had the time to say its own (on a
            # line of its own: rank 0's progress bar may hold the current one).
            time.sleep(ERROR_GRACE_S)
            print(f"\nerror: rank {rank}: {one_line(e)}", file=sys.stderr)
        return 2
    except CollectiveError as e:  # another rank failed or stopped answering
        if debug:
            raise
        # the rank that failed says why first; the launcher usually ends this one meanwhile
        time.sleep(ERROR_GRACE_S)
        print(f"\nerror: {e}", file=sys.stderr)
        return 1
    from sparsegps.distributed import leave

    leave()  # every rank got here: the command succeeded on all of them
    return status


def one_line(error: BaseException) -> str:
    """The error's message; for one re-raised from a DataLoader worker (whose message carries the
    worker's traceback), the original message alone, with the worker named."""
    text = str(error)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.splitlines() if line.strip()][-1]
    origin = text.splitlines()[0].removeprefix("Caught ").rstrip(".")  # "ShardError in DataLoader worker process 0"
    return f"{last.split(': ', 1)[-1]} (in {origin.split(' in ', 1)[-1]})"


def _expected_errors() -> tuple[type[BaseException], ...]:
    """Failures a user can fix: one line, exit status 2 (`--debug` shows the traceback)."""
    from sparsegps.data.scene import SceneFormatError
    from sparsegps.errors import UsageError

    return UsageError, SceneFormatError, FileNotFoundError, IsADirectoryError, PermissionError


if __name__ == "__main__":
    sys.exit(main())
