"""What every training run has: its config, its process group, device and precision, its run folder
(checked to be one folder for every rank), whether it resumes, its engine."""
from __future__ import annotations

import os
import secrets
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch
import torch.distributed as dist

from sparsegps.config import save_config
from sparsegps.data.store import raise_open_file_limit
from sparsegps.data.transforms import TransformConfig
from sparsegps.device import pick_device
from sparsegps.errors import UsageError
from sparsegps.launch import export_world

from . import folder_lock
from .checkpoint import complete_checkpoints, remove_checkpoints
from .engine import (OptimConfig, build_optimizer, check_optimizer_fits_zero, deepspeed_config, init_distributed,
                     initialize_engine, lr_factor, zero_stage)


@dataclass
class DataConfig:
    """The data of a training run; each recipe's data config extends it."""
    # allowed values, checked on load (`sparsegps.config.check_limits`)
    LIMITS: ClassVar[dict[str, str]] = {"eval_max_scenes": ">= 1"}

    train: list[str] = field(default_factory=list)  # shard files or directories
    val: list[str] = field(default_factory=list)  # held-out shards evaluated during and after training
    transforms: TransformConfig = field(default_factory=TransformConfig)
    eval_max_scenes: int | None = None  # held-out scenes evaluated (None: all)
    # A training scene that fails its checksum (or holds a non-finite coordinate): error ends the run
    # with one line naming file, scene and field; skip trains on the next readable scene in its place
    # and reports each skipped scene once (a warning) and their count and files in summary.json.
    on_corrupt: Literal["error", "skip"] = "error"
    # Check every training scene against its shard's checksum (about 1% of a tiny_cpu step); off,
    # coordinates are still checked finite.
    verify: bool = True


@dataclass
class RunConfig:
    # allowed values, checked on load (`sparsegps.config.check_limits`)
    LIMITS: ClassVar[dict[str, str]] = {"micro_batch": ">= 1", "global_batch": ">= 1", "steps": ">= 1",
                                        "checkpoint_every": ">= 1", "checkpoint_every_minutes": ">= 0",
                                        "keep_checkpoints": ">= 1", "log_every": ">= 1", "eval_every": ">= 0",
                                        "num_workers": ">= 0", "max_open_shards": ">= 1", "dist_timeout_s": "> 0"}

    micro_batch: int = 8  # scenes per rank per forward
    global_batch: int = 8  # scenes per optimizer step, over all ranks and accumulation
    steps: int = 1000  # optimizer steps
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 on GPU, fp32 on CPU
    deepspeed: str | None = None  # DeepSpeed JSON (configs/deepspeed/zero{1,2,3}.json); None: no ZeRO
    seed: int = 0
    output_dir: str = "runs/run"  # one folder every rank sees (a shared file system across nodes)
    # never: start afresh (refused in a folder with an earlier run's checkpoints, unless `overwrite`);
    # auto: continue from the newest complete checkpoint, or start afresh when there is none (one
    # command starts and restarts a run); must: continue, refusing a folder without checkpoints.
    # CLI: --resume [auto]
    resume: Literal["never", "auto", "must"] = "never"
    # with resume never: remove an earlier run's checkpoints from output_dir and start afresh. CLI: --overwrite
    overwrite: bool = False
    checkpoint_every: int = 500
    # also save when this many minutes have passed since the last checkpoint, by rank 0's clock (0: off)
    checkpoint_every_minutes: float = 0.0
    keep_checkpoints: int = 3
    log_every: int = 10
    eval_every: int = 0  # steps between held-out evaluations (0: only at the end)
    num_workers: int = 2  # DataLoader workers per rank; they live for the whole run
    max_open_shards: int = 64  # shards each worker keeps open (least recently used closed first)
    # A collective that waits longer than this fails with an error naming the rank and the step,
    # instead of hanging (set TORCH_DISTRIBUTED_DEBUG=DETAIL to see which collectives disagreed).
    dist_timeout_s: float = 1800.0
    # Live metrics through DeepSpeed's monitor, besides metrics.jsonl: every loss, the learning rate
    # of each group and the throughput per logged step. csv: RUN/monitor/*.csv; tensorboard:
    # RUN/monitor (needs `pip install sparsegps[tensorboard]`); wandb: needs `pip install wandb`.
    monitor: Literal["none", "csv", "tensorboard", "wandb"] = "none"


@dataclass
class Run:
    """What `setup_run` prepared: device, precision, ranks, accumulation, output folder."""

    cfg: RunConfig
    device: torch.device
    precision: str
    rank: int
    world: int
    grad_accum: int
    out: Path
    resumes: bool = False  # output_dir holds checkpoints to continue from

    @property
    def checkpoints(self) -> Path:
        return self.out / "checkpoints"


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise UsageError(f"precision: unknown {precision!r} (auto, fp32, bf16)")
    if precision == "bf16" and device.type != "cuda":
        raise UsageError("precision: bf16 needs a GPU; use fp32 (or auto) on CPU")
    return precision


def setup_run(cfg: RunConfig) -> Run:
    """Join the process group, pick device and precision, check that `output_dir` is one folder for
    every rank, decide whether the run resumes (`cfg.resume`), and save the resolved config (all of
    `cfg`, whichever subclass of RunConfig it is) in the run's folder. A resume with nothing to
    resume is refused before anything is built."""
    if not dist.is_initialized():
        export_world()  # the device follows the launcher's local rank
    raise_open_file_limit()
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    rank, world = init_distributed(device.type, cfg.dist_timeout_s)
    if rank == 0 and world > 1:
        print(f"{world} ranks, rendezvous at {os.environ['MASTER_ADDR']}:{os.environ['MASTER_PORT']}", flush=True)
    per_step = cfg.micro_batch * world
    if cfg.global_batch % per_step:
        raise UsageError(f"global_batch {cfg.global_batch} is not a multiple of micro_batch x world "
                         f"({cfg.micro_batch} x {world}); set --set global_batch={per_step * max(1, cfg.global_batch // per_step)} "
                         f"or another multiple of {per_step}")
    out = Path(cfg.output_dir)
    check_shared_directory(out)
    _agree(lambda: folder_lock.acquire(out))  # before anything in the folder is read or removed
    try:
        resumes = decide_resume(cfg.resume, out / "checkpoints", cfg.overwrite)
        if rank == 0:
            save_config(cfg, out / "config.yaml")
    except BaseException:
        release_folder(out)
        raise
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    return Run(cfg, device, precision, rank, world, cfg.global_batch // per_step, out, resumes)


SHARED_TOKEN = ".sparsegps-shared-check"


def check_shared_directory(directory: Path) -> None:
    """Make sure `directory` is one folder for every rank: rank 0 creates it and writes a token
    holding a random nonce, and every rank reads it back. A rank that cannot see it (a node-local
    disk) stops every rank with one line naming the rank, its host and the folder. Every rank must
    call it; in a world of one it only creates the folder."""
    if dist.get_rank() == 0:
        directory.mkdir(parents=True, exist_ok=True)
    if dist.get_world_size() == 1:
        return
    token = directory / SHARED_TOKEN
    sent = [(secrets.token_hex(16), str(directory)) if dist.get_rank() == 0 else None]
    if dist.get_rank() == 0:
        token.write_text(sent[0][0])
    dist.broadcast_object_list(sent, src=0)
    nonce, named = sent[0]  # the folder as rank 0 names it
    dist.barrier()
    try:
        problem = None if token.read_text() == nonce else "sees another run's token (two runs share output_dir?)"
    except OSError as e:
        problem = f"cannot read rank 0's token ({type(e).__name__})"
    reports = [None] * dist.get_world_size()
    dist.all_gather_object(reports, (dist.get_rank(), socket.gethostname(), problem))
    if dist.get_rank() == 0:
        token.unlink(missing_ok=True)
    failed = [r for r in reports if r[2] is not None]
    if failed:
        rank, host, problem = failed[0]
        others = f" (and {len(failed) - 1} more rank(s))" if len(failed) > 1 else ""
        raise UsageError(f"output_dir {named} is not one folder for all ranks: rank {rank} on {host} "
                         f"{problem}{others}; put output_dir on a file system every node mounts")


def _agree(decide) -> object:
    """`decide()` on rank 0, its answer on every rank; an answer that is a string is an error every
    rank raises (one line)."""
    decision: list = [decide() if dist.get_rank() == 0 else None]
    if dist.get_world_size() > 1:
        dist.broadcast_object_list(decision, src=0)
    if isinstance(decision[0], str):
        raise UsageError(decision[0])
    return decision[0]


def release_folder(out: Path) -> None:
    """Give up the run folder's lock (rank 0 holds it; every rank may call this)."""
    if not dist.is_initialized() or dist.get_rank() == 0:
        folder_lock.release(out)


def decide_resume(mode: str, checkpoints: Path, overwrite: bool = False) -> bool:
    """Whether the run continues from `checkpoints` (decided on rank 0, the same on every rank):
    never: no, and a folder with an earlier run's checkpoints is refused unless `overwrite` (then
    they are removed, so they are neither resumed later nor kept in place of the new run's); auto:
    when a checkpoint exists; must: yes, refusing when none does."""
    def decide():
        complete, broken = complete_checkpoints(checkpoints)
        exists = bool(complete or broken)
        if mode == "must" and not exists:
            return (f"--resume: no complete checkpoint in {checkpoints}; start the run without --resume, "
                    f"or with --resume auto")
        if mode == "never" and exists:
            if not overwrite:
                names = ", ".join(c.tag for c in complete) or "incomplete ones"
                return (f"{checkpoints.parent} holds an earlier run's checkpoints ({names}): continue it with "
                        f"--resume auto, or start afresh with --overwrite (which removes them)")
            removed = remove_checkpoints(checkpoints)
            print(f"warning: starting afresh in {checkpoints.parent} (--overwrite): removed the checkpoints of an "
                  f"earlier run ({', '.join(removed)})", flush=True)
            return False
        return exists and mode != "never"

    return _agree(decide)


def build_engine(run: Run, model: torch.nn.Module, groups: dict, optim: OptimConfig):
    """AdamW (or LAMB, without ZeRO) with warmup + cosine, wrapped in a DeepSpeed engine from the run's JSON."""
    ds_config = deepspeed_config(run.cfg.deepspeed, micro_batch=run.cfg.micro_batch, grad_accum=run.grad_accum,
                                 clipping=optim.gradient_clipping, precision=run.precision,
                                 monitor=run.cfg.monitor, monitor_dir=run.out / "monitor")
    check_optimizer_fits_zero(optim.optimizer, zero_stage(ds_config))
    optimizer = build_optimizer(groups, optim, run.cfg.global_batch, run.device.type)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, optim.warmup_steps, run.cfg.steps, optim.min_lr_ratio))
    engine, _, _ = initialize_engine(model.to(run.device), optimizer, scheduler, ds_config)
    return engine, ds_config
