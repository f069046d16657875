"""The training loop shared by pre-training and fine-tuning.

Each part decides one thing: `SampleOrder` which samples each step reads, the same on any number of
ranks; `Position` where the run is (optimizer steps, samples consumed; restored exactly on resume);
`Schedule` when to log, evaluate and save; `StopSignals` and `CheckpointClock` when to save and stop
besides; `TrainMeter` what was measured (reduced over ranks); `MetricsLog` where it goes.
`train_loop` only runs micro-batches through the engine and lets each part act.

On several ranks every rank runs the same micro-batches count, issues the same collectives (the
model's, the meter's, and one per micro-batch that carries the finiteness of the loss, stop signals
and the checkpoint clock) and saves and evaluates at the same steps. A failed collective (a timeout
after `dist_timeout_s`, mismatched sizes) ends the run with an error naming the rank and the step.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from sparsegps.data import collate_scenes, move_batch
from sparsegps.distributed import all_reduce_sum, gather_objects
from sparsegps.errors import CollectiveError, Preempted, UsageError
from sparsegps.models.grad_scale import finish_grad_scaling_step
from sparsegps.runtime import release_free_memory

from .checkpoint import load_latest_checkpoint, rng_state, save_checkpoint, seed_rng, set_rng_state
from .meter import MetricsLog, TrainMeter, peak_memory_mb
from .order import RankSampler, SampleOrder
from .preemption import STOP_SIGNALS, CheckpointClock, StopSignals, ignore_stop_signals_in_worker, signal_name
from .run import Run

# Batches each DataLoader worker prepares ahead: 2 x workers micro-batches wait in shared memory.
PREFETCH_FACTOR = 2


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or Inf; the message names the step and the batch's scenes."""


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
    """Optimizer steps taken and samples of the run's `SampleOrder` consumed by all ranks together
    (the data position, independent of the world size)."""

    step: int = 0
    samples: int = 0
    micro: int = 0

    def state(self, order: SampleOrder) -> dict:
        return {"step": self.step, "samples": self.samples, "epoch": order.epoch_of(self.samples),
                "rng": rng_state()}

    def micro_batches(self, run: Run, dataset, order: SampleOrder) -> Iterator[dict]:
        """This rank's micro-batches from the current position on, without end, on the run's device.
        One DataLoader serves the whole run, so its workers start once."""
        cfg = run.cfg
        sampler = RankSampler(order, self.samples, run.rank, run.world, cfg.micro_batch)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=cfg.micro_batch, sampler=sampler, num_workers=cfg.num_workers,
            collate_fn=collate_scenes, pin_memory=run.device.type == "cuda",
            generator=torch.Generator(),  # keeps the global torch RNG untouched, so resumes are exact
            worker_init_fn=ignore_stop_signals_in_worker if cfg.num_workers else None,
            prefetch_factor=PREFETCH_FACTOR if cfg.num_workers else None)
        batches = iter(loader)
        try:
            for batch in batches:
                self.samples += cfg.micro_batch * run.world
                self.micro += 1
                yield move_batch(batch, run.device)
        finally:
            # Workers ignore stop signals (`ignore_stop_signals_in_worker`), so the terminate() with
            # which multiprocessing ends them at exit cannot: they are shut down here, when the loop
            # stops reading (the generator is closed), not left to the iterator's garbage collection.
            shutdown = getattr(batches, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()


@dataclass
class Agreement:
    """What every rank learns from the one collective it issues per micro-batch."""

    nonfinite_here: bool  # this rank's loss is NaN or Inf
    nonfinite: bool  # some rank's is
    stop_signal: int | None  # a stop signal some rank received (SIGTERM before SIGUSR1), else None
    checkpoint_due: bool  # rank 0's checkpoint clock says save


def agree(loss: torch.Tensor, signals: StopSignals, clock: CheckpointClock) -> Agreement:
    """One all-reduce of [loss not finite, SIGTERM received, SIGUSR1 received, clock due] over ranks."""
    nonfinite = torch.isfinite(loss.detach()).logical_not().to(torch.float64).reshape(1)
    flags = [float(signals.received == signum) for signum in STOP_SIGNALS] + [float(clock.due())]
    local = torch.cat([nonfinite, torch.tensor(flags, dtype=torch.float64, device=nonfinite.device)])
    summed = all_reduce_sum(local).tolist()
    stop = next((signum for signum, count in zip(STOP_SIGNALS, summed[1:-1]) if count > 0), None)
    return Agreement(bool(local[0].item()), summed[0] > 0, stop, summed[-1] > 0)


def check_finite(agreed: Agreement, outputs: dict, batch: dict, position: Position, order: SampleOrder) -> None:
    """Stop every rank when the loss of any rank is NaN or Inf."""
    if not agreed.nonfinite:
        return
    where = f"scenes in the batch: {batch['scene_ids']}" if agreed.nonfinite_here else "on another rank"
    parts = ", ".join(f"{k}={float(v.detach()):.4g}" for k, v in outputs.items() if k.startswith("loss_"))
    raise NonFiniteLossError(f"loss is {float(outputs['loss'].detach())} at step {position.step + 1} (epoch "
                             f"{order.epoch_of(position.samples)}); {where}; parts: {parts}")


def restore(run: Run, engine, order: SampleOrder) -> Position:
    """The position of the newest complete checkpoint, with its engine state and RNG states (on
    another world size: seeded from (seed, step, rank))."""
    found = load_latest_checkpoint(engine, run.checkpoints)
    if found is None:
        raise UsageError(f"--resume: no complete checkpoint in {run.checkpoints}; start the run without --resume")
    checkpoint, client = found
    step = int(client["step"])
    # checkpoints of earlier versions counted scenes per rank: every step consumed global_batch samples
    samples = int(client.get("samples", step * run.cfg.global_batch))
    if "rng" in client:
        set_rng_state(client["rng"])
    else:
        seed_rng(run.cfg.seed, step, run.rank)
    if run.rank == 0:
        print(f"resumed from {checkpoint.path} (step {step}, {samples} samples consumed, epoch "
              f"{order.epoch_of(samples)}; written by {checkpoint.world_size} rank(s), now {run.world})", flush=True)
    return Position(step, samples)


def train_loop(run: Run, engine, dataset, criterion: Callable[[object, dict], dict], *, client_state: dict,
               progress: bool = True, desc: str = "train", evaluate: Callable[[], dict] | None = None) -> dict:
    """Run `run.cfg.steps` optimizer steps of `engine` on `dataset`, `criterion(engine(batch), batch)`
    giving the losses (a dict with "loss" and "loss_*" parts), from the newest checkpoint when the
    run resumes. Returns throughput and the last logged losses. SIGTERM or SIGUSR1 on any rank: every
    rank finishes the step, a complete checkpoint is saved and `Preempted` is raised."""
    from tqdm.auto import tqdm

    cfg = run.cfg
    order = SampleOrder(len(dataset), cfg.global_batch, cfg.seed)
    dataset_store = getattr(dataset, "store", None)
    if dataset_store is not None:
        dataset_store.max_open = cfg.max_open_shards
    position = restore(run, engine, order) if run.resumes else Position()
    schedule = Schedule(cfg.steps, cfg.log_every, cfg.eval_every, cfg.checkpoint_every)
    clock = CheckpointClock(cfg.checkpoint_every_minutes, run.rank)
    meter, log = TrainMeter(run.device), MetricsLog(run.out, run.rank, engine, fresh=position.step == 0)
    bar = tqdm(total=cfg.steps, initial=position.step, desc=desc, unit="step", dynamic_ncols=True,
               disable=not progress or run.rank != 0)
    last: dict = {}
    damaged = DamagedScenes(run.rank)
    engine.train()
    batches = position.micro_batches(run, dataset, order) if position.step < cfg.steps else (b for b in ())
    try:
        # closing the generator shuts the DataLoader's workers down, on success, stop or error alike
        with contextlib.closing(batches), StopSignals() as signals:
            for batch in batches:
                with torch.autocast(run.device.type, dtype=torch.bfloat16, enabled=run.precision == "bf16"):
                    losses = criterion(engine(batch), batch)
                agreed = agree(losses["loss"], signals, clock)
                check_finite(agreed, losses, batch, position, order)
                engine.backward(losses["loss"])
                if position.micro % run.grad_accum == 0:  # the optimizer steps in engine.step()
                    finish_grad_scaling_step(engine.module)
                engine.step()
                meter.add(losses, batch)
                damaged.note(batch.get("skipped", ()), position.step + 1)
                if position.micro % run.grad_accum:
                    continue
                position.step += 1
                step = position.step
                bar.update(1)
                if schedule.log(step):
                    last = meter.reduce()
                    lrs = {g.get("name", str(i)): g["lr"] for i, g in enumerate(engine.optimizer.param_groups)}
                    log.write({"kind": "train", "step": step, "epoch": order.epoch_of(position.samples), **last,
                               "lr": lrs})
                    bar.set_postfix(loss=f"{last['loss']:.3f}", scenes_s=f"{last['scenes_per_s']:.1f}")
                    release_free_memory()  # after the resident memory was logged
                if evaluate is not None and schedule.evaluate(step) and agreed.stop_signal is None:
                    log.write({"kind": "eval", "step": step, **evaluate()})
                    engine.train()
                if schedule.checkpoint(step) or agreed.checkpoint_due or agreed.stop_signal is not None:
                    saved = save_checkpoint(engine, run.checkpoints, step, {**client_state, **position.state(order)},
                                            cfg.keep_checkpoints)
                    clock.reset()
                    if agreed.stop_signal is not None:
                        bar.close()
                        raise Preempted(signal_name(agreed.stop_signal), agreed.stop_signal, step, str(saved))
                if step >= cfg.steps:
                    break
    except RuntimeError as e:
        if run.world > 1 and is_collective_failure(e) and _peer_gone(e):
            raise CollectiveError(
                f"rank {run.rank} of {run.world}, step {position.step + 1}: another rank ended (its error, if it "
                f"printed one, comes first) ({str(e).splitlines()[0][:200]})") from e
        if run.world > 1 and is_collective_failure(e):
            raise CollectiveError(
                f"rank {run.rank} of {run.world}, step {position.step + 1}: a collective failed or timed out "
                f"after dist_timeout_s={cfg.dist_timeout_s:g} ({str(e).splitlines()[0][:300]}). Ranks issued "
                f"different collectives; rerun with TORCH_DISTRIBUTED_DEBUG=DETAIL to see which") from e
        raise
    finally:
        bar.close()  # an error is printed on a line of its own
    log.plot(run.out / "loss_curve.png", f"{desc}: training losses ({run.out.name})")
    skipped = damaged.gathered()
    if dist.is_initialized():
        dist.barrier()
    last = {k: v for k, v in last.items() if k.startswith("loss")}
    return {"steps": position.step, "epochs": position.samples / order.per_epoch, "samples": position.samples,
            **meter.throughput(), "peak_memory_mb": peak_memory_mb(run.device), **last, **skipped}


class DamagedScenes:
    """The damaged scenes this rank's data passed over (`data.on_corrupt: skip`): a warning naming
    each the first time, and in the summary their count and files over all ranks."""

    def __init__(self, rank: int):
        self.rank, self.seen = rank, {}

    def note(self, skipped, step: int) -> None:
        for file, scene, reason in skipped:
            if (file, scene) not in self.seen:
                self.seen[(file, scene)] = reason
                print(f"warning: rank {self.rank}, step {step}: skipped damaged scene {scene!r} of {file} ({reason})",
                      flush=True)

    def gathered(self) -> dict:
        """{"skipped_scenes": count, "skipped_files": [...]} over every rank (a collective), or {} when
        no rank skipped any."""
        everything = {(file, scene) for file, scene in gather_objects(list(self.seen))}
        if not everything:
            return {}
        return {"skipped_scenes": len(everything), "skipped_files": sorted({file for file, _ in everything})}


def _peer_gone(error: BaseException) -> bool:
    text = str(error).lower()
    return "connection closed" in text or "connection reset" in text


def is_collective_failure(error: BaseException) -> bool:
    """A failure raised by a collective backend (gloo, NCCL), a timeout or a peer gone."""
    dist_error = getattr(dist, "DistError", ())
    text = str(error).lower()
    return isinstance(error, dist_error) or any(
        word in text for word in ("gloo", "nccl", "timed out", "timeout", "connection closed", "connection reset"))


__all__ = ["CollectiveError", "NonFiniteLossError", "Position", "Schedule", "train_loop"]
