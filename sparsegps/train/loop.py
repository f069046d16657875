"""The training loop shared by pre-training and fine-tuning.

`RunConfig` holds what every run has (batching, steps, device, precision, DeepSpeed JSON,
checkpointing, logging); `setup_run` joins the process group and builds the DeepSpeed engine;
`train_loop` runs the optimizer steps with gradient accumulation, an exact resume position
(epoch and scenes consumed, RNG states), atomic checkpoints, a progress bar, JSONL metrics, a NaN
guard, and periodic evaluation.
"""
from __future__ import annotations

import json
import math
import resource
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.distributed as dist

from sparsegps.config import save_config
from sparsegps.data import collate_scenes, move_batch
from sparsegps.files import atomic_save_figure

from .checkpoint import load_latest_checkpoint, rng_state, save_checkpoint, set_rng_state
from sparsegps.device import pick_device

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


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the message names the step and the batch's scenes."""


class ResumableSampler(torch.utils.data.Sampler):
    """This rank's share of a seeded per-epoch permutation, startable mid-epoch.

    Like DistributedSampler (the permutation is padded to a multiple of the world size and dealt
    out round-robin), plus a start position: the samples of this epoch already consumed."""

    def __init__(self, size: int, rank: int, world: int, seed: int, shuffle: bool = True):
        self.size, self.rank, self.world, self.seed, self.shuffle = size, rank, world, seed, shuffle
        self.epoch, self.start = 0, 0
        self.per_rank = math.ceil(size / world)

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def indices(self) -> list[int]:
        order = list(range(self.size))
        if self.shuffle:
            order = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        order += order[: self.per_rank * self.world - self.size]
        return order[self.rank::self.world]

    def __iter__(self):
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"unknown precision {precision!r} (auto, fp32, bf16)")
    if precision == "bf16" and device.type != "cuda":
        raise ValueError("precision bf16 needs a GPU; use fp32 on CPU")
    return precision


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


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


def setup_run(cfg: RunConfig, full_config=None) -> Run:
    device = pick_device(cfg.device)
    precision = resolve_precision(cfg.precision, device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_flush_denormal(True)  # denormal gradients slow spconv on CPU tenfold
    rank, world = init_distributed(device.type)
    per_step = cfg.micro_batch * world
    if cfg.global_batch % per_step:
        raise ValueError(f"global_batch {cfg.global_batch} is not a multiple of micro_batch x world "
                         f"({cfg.micro_batch} x {world})")
    out = Path(cfg.output_dir)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        save_config(full_config or cfg, out / "config.yaml")
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    return Run(cfg, device, precision, rank, world, cfg.global_batch // per_step, out)


def build_engine(run: Run, model: torch.nn.Module, groups: dict, optim: OptimConfig):
    """AdamW (or LAMB) with warmup + cosine, wrapped in a DeepSpeed engine from the run's JSON."""
    optimizer = build_optimizer(groups, optim, run.cfg.global_batch, run.device.type)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, optim.warmup_steps, run.cfg.steps, optim.min_lr_ratio))
    ds_config = deepspeed_config(run.cfg.deepspeed, micro_batch=run.cfg.micro_batch, grad_accum=run.grad_accum,
                                 clipping=optim.gradient_clipping, precision=run.precision)
    engine, _, _ = initialize_engine(model.to(run.device), optimizer, scheduler, ds_config)
    return engine, ds_config


def plot_losses(metrics_path: Path, out_png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if r.get("kind") == "train"]
    if not rows:
        return
    names = sorted(k for k in rows[0] if k.startswith("loss"))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    steps = [r["step"] for r in rows]
    for name in names:
        ax.plot(steps, [r[name] for r in rows], label="total" if name == "loss" else name.removeprefix("loss_"),
                linewidth=2.5 if name == "loss" else 1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    atomic_save_figure(fig, out_png)


def train_loop(run: Run, engine, dataset, *, client_state: dict, resume: bool, progress: bool = True,
               desc: str = "train", evaluate: Callable[[], dict] | None = None) -> dict:
    """Run `run.cfg.steps` optimizer steps of `engine` (whose forward returns a dict with "loss" and
    "loss_*" parts) on `dataset`. Returns throughput and the last logged losses."""
    from tqdm.auto import tqdm

    cfg, device = run.cfg, run.device
    ckpt_dir = run.out / "checkpoints"
    sampler = ResumableSampler(len(dataset), run.rank, run.world, cfg.seed)
    if len(sampler) < cfg.micro_batch:
        raise ValueError(f"{len(dataset)} scenes cannot fill one micro-batch of {cfg.micro_batch} on each of "
                         f"{run.world} rank(s)")
    step, epoch, consumed = 0, 0, 0
    metrics_path = run.out / "metrics.jsonl"
    if resume:
        client = load_latest_checkpoint(engine, ckpt_dir)
        if client is not None:
            step, epoch, consumed = client["step"], client["epoch"], client["consumed"]
            set_rng_state(client["rng"])
            if run.rank == 0:
                print(f"resumed from {ckpt_dir}/step{step} (epoch {epoch}, {consumed} scenes into it)")
    if run.rank == 0 and step == 0:
        metrics_path.unlink(missing_ok=True)

    def log(row: dict) -> None:
        if run.rank == 0:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(row) + "\n")

    bar = tqdm(total=cfg.steps, initial=step, desc=desc, unit="step", dynamic_ncols=True,
               disable=not progress or run.rank != 0)
    window = {"scenes": 0, "voxels": 0, "time": time.perf_counter(), "losses": {}, "micro": 0}
    totals = {"scenes": 0, "voxels": 0, "time": 0.0}
    last: dict = {}
    engine.train()
    while step < cfg.steps:
        dataset.set_epoch(epoch)
        sampler.set_position(epoch, consumed)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=cfg.micro_batch, sampler=sampler, num_workers=cfg.num_workers,
            collate_fn=collate_scenes, drop_last=True, pin_memory=device.type == "cuda",
            generator=torch.Generator(),  # keeps the global torch RNG untouched, so resumes are exact
            prefetch_factor=4 if cfg.num_workers else None)
        for batch in loader:
            batch = move_batch(batch, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.precision == "bf16"):
                outputs = engine(batch)
            loss = outputs["loss"]
            if not torch.isfinite(loss):
                parts = ", ".join(f"{k}={float(v):.4g}" for k, v in outputs.items() if k.startswith("loss_"))
                raise NonFiniteLossError(f"loss is {float(loss)} at step {step + 1} (epoch {epoch}); "
                                         f"scenes in the batch: {batch['scene_ids']}; parts: {parts}")
            engine.backward(loss)
            engine.step()
            consumed += cfg.micro_batch
            window["micro"] += 1
            window["scenes"] += batch["batch_size"] * run.world
            window["voxels"] += batch["coords"].shape[0] * run.world
            for k, v in outputs.items():
                if k.startswith("loss"):
                    window["losses"][k] = window["losses"].get(k, 0.0) + float(v.detach())
            if window["micro"] % run.grad_accum:
                continue
            step += 1
            bar.update(1)
            if step % cfg.log_every == 0 or step == cfg.steps:
                elapsed = time.perf_counter() - window["time"]
                last = {k: v / window["micro"] for k, v in window["losses"].items()}
                row = {"kind": "train", "step": step, "epoch": epoch, **last,
                       "lr": {g.get("name", str(i)): g["lr"] for i, g in enumerate(engine.optimizer.param_groups)},
                       "scenes_per_s": window["scenes"] / elapsed, "voxels_per_s": window["voxels"] / elapsed,
                       "peak_memory_mb": peak_memory_mb(device)}
                for key in ("scenes", "voxels"):
                    totals[key] += window[key]
                totals["time"] += elapsed
                bar.set_postfix(loss=f"{last['loss']:.3f}", scenes_s=f"{row['scenes_per_s']:.1f}")
                log(row)
                window.update(scenes=0, voxels=0, time=time.perf_counter(), losses={}, micro=0)
            if evaluate and cfg.eval_every and step % cfg.eval_every == 0 and step < cfg.steps:
                log({"kind": "eval", "step": step, **evaluate()})
                engine.train()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                save_checkpoint(engine, ckpt_dir, step, {**client_state, "step": step, "epoch": epoch,
                                                         "consumed": consumed, "rng": rng_state()},
                                cfg.keep_checkpoints)
            if step >= cfg.steps:
                break
        else:
            epoch, consumed = epoch + 1, 0
    bar.close()
    if run.rank == 0 and metrics_path.exists():
        plot_losses(metrics_path, run.out / "loss_curve.png", f"{desc}: training losses ({run.out.name})")
    if dist.is_initialized():
        dist.barrier()
    return {"steps": step, "epochs": epoch + consumed / sampler.per_rank,
            "scenes_per_s": totals["scenes"] / totals["time"] if totals["time"] else 0.0,
            "voxels_per_s": totals["voxels"] / totals["time"] if totals["time"] else 0.0,
            "peak_memory_mb": peak_memory_mb(device), **last}
