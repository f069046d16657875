"""Wall-clock timing: several methods in interleaved rounds, so load from other processes that
changes during a run slows them alike and their ratios stay meaningful."""
from __future__ import annotations

import gc
import statistics
import time
from dataclasses import dataclass
from typing import Callable

import torch


def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_training_step(engine, dataset, indices: list[int], device: torch.device, precision: str,
                        loss_of: Callable[[dict], torch.Tensor], label: str) -> tuple[dict, dict[str, float]]:
    """One optimizer step on the scenes `indices` of `dataset`, as the training loop takes it:
    collate, forward with the losses (`loss_of(batch)`, under bf16 autocast when `precision` is
    bf16), backward, the U-Net's gradient-scaling bookkeeping, the optimizer step; the device
    synchronised between phases. Returns the batch and the seconds of data, forward, backward and
    optimizer; a non-finite loss raises, naming `label` and the scenes."""
    from sparsegps.data import collate_scenes, move_batch
    from sparsegps.models.grad_scale import finish_grad_scaling_step

    synchronize(device)
    t0 = time.perf_counter()
    batch = move_batch(collate_scenes([dataset[i] for i in indices]), device)
    synchronize(device)
    t1 = time.perf_counter()
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        loss = loss_of(batch)
    synchronize(device)
    t2 = time.perf_counter()
    engine.backward(loss)
    finish_grad_scaling_step(engine.module)
    synchronize(device)
    t3 = time.perf_counter()
    engine.step()
    synchronize(device)
    t4 = time.perf_counter()
    if not torch.isfinite(loss.detach()):
        raise RuntimeError(f"{label}: loss is {float(loss)} on scenes {batch['scene_ids']}")
    return batch, {"data": t1 - t0, "forward": t2 - t1, "backward": t3 - t2, "optimizer": t4 - t3}


def cpu_seconds() -> float:
    """CPU time (user + system) used so far by this process and its finished, waited-for children
    (DataLoader workers once their loader is done). Unlike wall time, other processes competing
    for the cores do not inflate it."""
    try:
        import resource
    except ImportError:  # not on Unix
        return time.process_time()
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


@dataclass
class Timing:
    """Wall times (seconds) of the timed repeats of one measurement, and their CPU times when taken."""

    times: list[float]
    cpu_times: list[float] | None = None

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the repeats were."""
        return (max(self.times) - min(self.times)) / self.median if self.median > 0 else 0.0

    def to_dict(self) -> dict:
        out = {"seconds": self.median, "seconds_min": min(self.times), "seconds_max": max(self.times),
               "repeats": len(self.times)}
        if self.cpu_times:
            out["cpu_seconds"] = statistics.median(self.cpu_times)
        return out


def time_interleaved(calls: dict[str, Callable[[], object]], *, repeats: int, warmup: int, device: str = "cpu",
                     before_each: Callable[[], object] | None = None, track_cpu: bool = False) -> dict[str, Timing]:
    """Time several calls in rounds: each round runs every call once, in order, timed.

    On a machine shared with other work, load that changes during a run then slows every call
    alike, so ratios between them stay meaningful. `warmup` untimed runs of each call come first;
    `before_each` runs untimed before every timed call. With `track_cpu`, each Timing also holds
    the CPU seconds of each call (`cpu_seconds`).
    """
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    cpu: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            if before_each is not None:
                before_each()
            gc.collect()
            synchronize(device)
            cpu_start, start = cpu_seconds(), time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(cpu_seconds() - cpu_start)
    return {name: Timing(times[name], cpu[name] if track_cpu else None) for name in calls}




def time_call(fn: Callable[[], object], *, repeats: int, warmup: int, device: str = "cpu",
              before_each: Callable[[], object] | None = None) -> Timing:
    """`time_interleaved` with one call: `warmup` untimed runs, then `repeats` timed ones."""
    return time_interleaved({"call": fn}, repeats=repeats, warmup=warmup, device=device,
                            before_each=before_each)["call"]
