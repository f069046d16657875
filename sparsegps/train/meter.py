"""What the training loop measures and where it writes it.

`TrainMeter` adds up each micro-batch's losses, scenes and voxels; at a logged step it reduces them
over ranks (one collective, which every rank issues at the same steps), so the logged losses are the
global batch's and the throughput counts every rank's scenes. `MetricsLog` writes rows to
`metrics.jsonl` and to DeepSpeed's monitor (CSV, TensorBoard, Weights & Biases) on rank 0, and
draws the loss curve."""
from __future__ import annotations

import json
import resource
import time
from pathlib import Path

import torch

from sparsegps.distributed import all_reduce_sum, world_size
from sparsegps.files import atomic_save_figure


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_memory_mb() -> float | None:
    """The process's resident memory now (Linux; None elsewhere): with the peak, whether a long run's
    memory stays flat."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20
    except (OSError, IndexError, ValueError):
        return None


class TrainMeter:
    def __init__(self, device: torch.device):
        self.device = device
        self.total_scenes, self.total_voxels, self.total_time = 0.0, 0.0, 0.0
        self._reset()

    def _reset(self) -> None:
        self.losses: dict[str, torch.Tensor] = {}
        self.micro, self.scenes, self.voxels = 0, 0, 0
        self.start = time.perf_counter()

    def add(self, outputs: dict, batch: dict) -> None:
        for k, v in outputs.items():
            if k.startswith("loss"):
                self.losses[k] = self.losses.get(k, 0.0) + v.detach().float()
        self.micro += 1
        self.scenes += batch["batch_size"]
        self.voxels += batch["coords"].shape[0]

    def reduce(self) -> dict:
        """Mean losses over the window's micro-batches and all ranks, and the window's throughput;
        starts a new window. Every rank must call it at the same steps."""
        names = sorted(self.losses)
        local = torch.stack([self.losses[k] for k in names] + [torch.tensor(float(n), device=self.device)
                                                               for n in (self.scenes, self.voxels)])
        summed = all_reduce_sum(local.to(self.device, torch.float64)).tolist()
        elapsed = time.perf_counter() - self.start
        scenes, voxels = summed[-2], summed[-1]
        row = {k: v / (self.micro * world_size()) for k, v in zip(names, summed)}
        row.update(scenes_per_s=scenes / elapsed, voxels_per_s=voxels / elapsed,
                   peak_memory_mb=peak_memory_mb(self.device), rss_mb=resident_memory_mb())
        self.total_scenes += scenes
        self.total_voxels += voxels
        self.total_time += elapsed
        self._reset()
        return row

    def throughput(self) -> dict:
        t = self.total_time or float("inf")
        return {"scenes_per_s": self.total_scenes / t, "voxels_per_s": self.total_voxels / t}


class MetricsLog:
    """metrics.jsonl (appended; emptied when a run starts afresh) and DeepSpeed's monitor, rank 0 only."""

    def __init__(self, out: Path, rank: int, engine, fresh: bool):
        self.path, self.rank, self.engine = out / "metrics.jsonl", rank, engine
        if rank == 0 and fresh:
            self.path.unlink(missing_ok=True)

    def write(self, row: dict) -> None:
        if self.rank != 0:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        monitor = getattr(self.engine, "monitor", None)
        if monitor is not None and monitor.enabled:
            kind, step = row["kind"], row["step"]
            events = []
            for key, value in row.items():
                if isinstance(value, dict):  # learning rate per group
                    events += [(f"{kind}/{key}/{name}", float(v), step) for name, v in value.items()]
                elif isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    events.append((f"{kind}/{key}", float(value), step))
            monitor.write_events(events)

    def plot(self, out_png: Path, title: str) -> None:
        if self.rank == 0 and self.path.exists():
            plot_losses(self.path, out_png, title)


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
