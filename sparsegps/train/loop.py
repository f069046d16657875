"""The training loop shared by pre-training and fine-tuning.

Each part decides one thing: `Position` where the run is (step, epoch, scenes consumed; restored
exactly on resume) and which micro-batches come next; `Schedule` when to log, evaluate and save;
`TrainMeter` what was measured (reduced over ranks); `MetricsLog` where it goes. `train_loop`
only runs micro-batches through the engine and lets each part act.

On several ranks every rank runs the same micro-batches count, issues the same collectives (the
model's, the meter's, the finiteness check's) and saves and evaluates at the same steps. A failed
collective (a timeout after `dist_timeout_s`, mismatched sizes) ends the run with an error naming
the rank and the step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from sparsegps.data import collate_scenes, move_batch
from sparsegps.distributed import all_reduce_sum
from sparsegps.errors import UsageError

from .checkpoint import load_latest_checkpoint, rng_state, save_checkpoint, set_rng_state
from .meter import MetricsLog, TrainMeter, peak_memory_mb
from .run import Run, RunConfig, build_engine, resolve_precision, setup_run


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the message names the step and the batch's scenes."""


class CollectiveError(RuntimeError):
    """A collective failed or timed out; the message names the rank and the step."""


class ResumableSampler(torch.utils.data.Sampler):
    """This rank's share of a seeded per-epoch permutation, startable mid-epoch.

    Like DistributedSampler (the permutation is repeated to a multiple of the world size and dealt
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
        total = self.per_rank * self.world
        order = (order * math.ceil(total / max(self.size, 1)))[:total]
        return order[self.rank::self.world]

    def __iter__(self):
        return iter(self.indices()[self.start:])

    def __len__(self) -> int:
        return self.per_rank - self.start


@dataclass
class Schedule:
    """When the loop logs, evaluates and saves: the same answer on every rank."""

    steps: int
    log_every: int
    eval_every: int
    checkpoint_every: int

    def log(self, step: int) -> bool:
        return step % self.log_every == 0 or step == self.steps

    def evaluate(self, step: int) -> bool:
        return bool(self.eval_every) and step % self.eval_every == 0 and step < self.steps

    def checkpoint(self, step: int) -> bool:
        return step % self.checkpoint_every == 0 or step == self.steps


@dataclass
class Position:
    """Optimizer steps taken, the epoch, and the scenes of this epoch this rank has consumed."""

    step: int = 0
    epoch: int = 0
    consumed: int = 0
    micro: int = 0

    def state(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "consumed": self.consumed, "rng": rng_state()}

    def micro_batches(self, run: Run, dataset, sampler: ResumableSampler) -> Iterator[dict]:
        """Micro-batches from the current position on, epoch after epoch, on the run's device."""
        cfg = run.cfg
        while True:
            dataset.set_epoch(self.epoch)
            sampler.set_position(self.epoch, self.consumed)
            loader = torch.utils.data.DataLoader(
                dataset, batch_size=cfg.micro_batch, sampler=sampler, num_workers=cfg.num_workers,
                collate_fn=collate_scenes, drop_last=True, pin_memory=run.device.type == "cuda",
                generator=torch.Generator(),  # keeps the global torch RNG untouched, so resumes are exact
                prefetch_factor=4 if cfg.num_workers else None)
            for batch in loader:
                self.consumed += cfg.micro_batch
                self.micro += 1
                yield move_batch(batch, run.device)
            self.epoch, self.consumed = self.epoch + 1, 0


def check_finite(outputs: dict, batch: dict, position: Position) -> None:
    """Stop every rank when the loss of any rank is NaN or Inf (one collective per micro-batch)."""
    local = torch.isfinite(outputs["loss"].detach()).logical_not().to(torch.float64).reshape(1)
    if all_reduce_sum(local).item() == 0:
        return
    where = (f"scenes in the batch: {batch['scene_ids']}" if local.item() else "on another rank")
    parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in outputs.items() if k.startswith("loss_"))
    raise NonFiniteLossError(f"loss is {float(outputs['loss'].detach())} at step {position.step + 1} (epoch "
                             f"{position.epoch}); {where}; parts: {parts}")


def restore(run: Run, engine, checkpoints) -> Position:
    """The position of the newest complete checkpoint, with its RNG states and engine state."""
    client = load_latest_checkpoint(engine, checkpoints)
    if client is None:
        raise UsageError(f"--resume: no complete checkpoint in {checkpoints}; start the run without --resume")
    set_rng_state(client["rng"])
    if run.rank == 0:
        print(f"resumed from {checkpoints}/step{client['step']} (epoch {client['epoch']}, "
              f"{client['consumed']} scenes into it)")
    return Position(client["step"], client["epoch"], client["consumed"])


def train_loop(run: Run, engine, dataset, *, client_state: dict, resume: bool, progress: bool = True,
               desc: str = "train", evaluate: Callable[[], dict] | None = None) -> dict:
    """Run `run.cfg.steps` optimizer steps of `engine` (whose forward returns a dict with "loss" and
    "loss_*" parts) on `dataset`. Returns throughput and the last logged losses."""
    from tqdm.auto import tqdm

    cfg, checkpoints = run.cfg, run.out / "checkpoints"
    sampler = ResumableSampler(len(dataset), run.rank, run.world, cfg.seed)
    if len(sampler) < cfg.micro_batch:
        raise UsageError(f"{len(dataset)} scenes cannot fill one micro-batch of {cfg.micro_batch} on each of "
                         f"{run.world} rank(s)")
    position = restore(run, engine, checkpoints) if resume else Position()
    schedule = Schedule(cfg.steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every)
    meter, log = TrainMeter(run.device), MetricsLog(run.out, run.rank, engine, fresh=position.step == 0)
    bar = tqdm(total=cfg.steps, initial=position.step, desc=desc, unit="step", dynamic_ncols=True,
               disable=not progress or run.rank != 0)
    last: dict = {}
    engine.train()
    batches = position.micro_batches(run, dataset, sampler) if position.step < cfg.steps else iter(())
    try:
        for batch in batches:
            with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.precision == "bf16"):
                outputs = engine(batch)
            check_finite(outputs, batch, position)
            engine.backward(outputs["loss"])
            engine.step()
            meter.add(outputs, batch)
            if position.micro % run.grad_accum:
                continue
            position.step += 1
            step = position.step
            bar.update(1)
            if schedule.log(step):
                last = meter.reduce()
                lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(engine.optimizer.param_groups)}
                log.write({"kind": "train", "step": step, "epoch": position.epoch, **last, "lr": lrs})
                bar.set_postfix(loss=f"{last['loss']:.3f}", scenes_s=f"{last['scenes_per_s']:.1f}")
            if evaluate is not None and schedule.evaluate(step):
                log.write({"kind": "eval", "step": step, **evaluate()})
                engine.train()
            if schedule.checkpoint(step):
                save_checkpoint(engine, checkpoints, step, {**client_state, **position.state()}, cfg.keep_checkpoints)
            if step >= cfg.steps:
                break
    except RuntimeError as e:
        if run.world > 1 and is_collective_failure(e):
            raise CollectiveError(
                f"rank {run.rank} of {run.world}, step {position.step + 1}: a collective failed or timed out "
                f"after dist_timeout_s={cfg.dist_timeout_s:g} ({str(e).splitlines()[0][:300]}). Ranks issued "
                f"different collectives; rerun with TORCH_DISTRIBUTED_DEBUG=DETAIL to see which") from e
        raise
    bar.close()
    log.plot(run.out / "loss_curve.png", f"{desc}: training losses ({run.out.name})")
    if dist.is_initialized():
        dist.barrier()
    last = {k: v for k, v in last.items() if k.startswith("loss")}
    return {"steps": position.step, "epochs": position.epoch + position.consumed / sampler.per_rank,
            **meter.throughput(), "peak_memory_mb": peak_memory_mb(run.device), **last}


def is_collective_failure(error: BaseException) -> bool:
    """A failure raised by a collective backend (gloo, NCCL), a timeout or a peer gone."""
    dist_error = getattr(dist, "DistError", ())
    text = str(error).lower()
    return isinstance(error, dist_error) or any(
        word in text for word in ("gloo", "nccl", "timed out", "timeout", "connection closed", "connection reset"))


__all__ = ["CollectiveError", "NonFiniteLossError", "Position", "ResumableSampler", "Run", "RunConfig", "Schedule",
           "build_engine", "resolve_precision", "setup_run", "train_loop"]
