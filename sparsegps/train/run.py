"""What every training run has: its config, its process group, device and precision, its engine."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from sparsegps.config import save_config
from sparsegps.device import pick_device
from sparsegps.errors import UsageError

from .engine import OptimConfig, build_optimizer, deepspeed_config, init_distributed, initialize_engine, lr_factor


@dataclass
class RunConfig:
    micro_batch: int = 8  # scenes per rank per forward
    global_batch: int = 8  # scenes per optimizer step, over all ranks and accumulation
    steps: int = 1000  # optimizer steps
    device: str = "auto"  # auto, cpu, cuda
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU), fp32, bf16
    deepspeed: str | None = None  # DeepSpeed JSON (configs/deepspeed/zero{1,2,3}.json); None: no ZeRO
    seed: int = 0
    output_dir: str = "runs/run"
    checkpoint_every: int = 500
    keep_checkpoints: int = 3
    log_every: int = 10
    eval_every: int = 0  # steps between held-out evaluations (0: only at the end)
    num_workers: int = 2
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


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise UsageError(f"precision: unknown {precision!r} (auto, fp32, bf16)")
    if precision == "bf16" and device.type != "cuda":
        raise UsageError("precision: bf16 needs a GPU; use fp32 (or auto) on CPU")
    return precision


def setup_run(cfg: RunConfig, resume: bool = False) -> Run:
    """Join the process group, pick device and precision, and save the resolved config (all of
    `cfg`, whichever subclass of RunConfig it is) in the run's folder. With `resume`, a run folder
    without any checkpoint is refused before anything is built."""
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_flush_denormal(True)  # denormal gradients slow spconv on CPU tenfold
    rank, world = init_distributed(device.type, cfg.dist_timeout_s)
    per_step = cfg.micro_batch * world
    if cfg.global_batch % per_step:
        raise UsageError(f"global_batch {cfg.global_batch} is not a multiple of micro_batch x world "
                         f"({cfg.micro_batch} x {world}); set --set global_batch={per_step * max(1, cfg.global_batch // per_step)} "
                         f"or another multiple of {per_step}")
    out = Path(cfg.output_dir)
    if resume and not any((out / "checkpoints").glob("step*")):
        raise UsageError(f"--resume: no complete checkpoint in {out / 'checkpoints'}; start the run without --resume")
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(cfg, out / "config.yaml")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    return Run(cfg, device, precision, rank, world, cfg.global_batch // per_step, out)


def build_engine(run: Run, model: torch.nn.Module, groups: dict, optim: OptimConfig):
    """AdamW (or LAMB) with warmup + cosine, wrapped in a DeepSpeed engine from the run's JSON."""
    optimizer = build_optimizer(groups, optim, run.cfg.global_batch, run.device.type)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, optim.warmup_steps, run.cfg.steps, optim.min_lr_ratio))
    ds_config = deepspeed_config(run.cfg.deepspeed, micro_batch=run.cfg.micro_batch, grad_accum=run.grad_accum,
                                 clipping=optim.gradient_clipping, precision=run.precision,
                                 monitor=run.cfg.monitor, monitor_dir=run.out / "monitor")
    engine, _, _ = initialize_engine(model.to(run.device), optimizer, scheduler, ds_config)
    return engine, ds_config
