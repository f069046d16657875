"""One training run, whatever it trains: config -> data -> model -> engine -> loop -> evaluation ->
export, written once.

A recipe (pre-training, segmentation or grounding fine-tuning) is a `TrainingTask`: it checks and
completes its config, names its data, builds its model, criterion and optimizer groups, says what
it monitors during training and evaluates after, and what its export records. `run_task` runs the
parts in that order, the same for every recipe: user errors are found before any work starts, the
run is set up (process group, device, run folder, resume), the engine built, the loop run, the
export written (rank 0) and the summary saved.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch.distributed as dist
from torch import nn

from sparsegps.criterion import GPSCriterion
from sparsegps.errors import UsageError
from sparsegps.exports import EXPORT_NAME, Export, ExportInfo, build_model, load_weights, read_export
from sparsegps.files import atomic_write_text
from sparsegps.models.gps import GPSModel

from .checkpoint import export_checkpoint
from .engine import check_optimizer_fits_zero, gps_role, optimizer_groups, read_deepspeed_json, zero_stage
from .loop import train_loop
from .run import Run, build_engine, release_folder, setup_run


class TrainingTask:
    """The parts of one recipe. `cfg` is a RunConfig subclass with `data.train`, `optim` and, for
    fine-tuning, `pretrained`. Subclasses set `name` (the command, on the progress bar) and
    `summary_prefix` (of the summary's keys: pretrain_steps, seg_steps...) and implement the methods
    that raise NotImplementedError."""

    name = "train"
    summary_prefix = "train"

    def __init__(self, cfg):
        self.cfg = cfg

    def configure(self) -> None:
        """Check the config and complete it (class names, an export's architecture), before any work
        starts: raise `UsageError` for what the user can fix."""

    def dataset(self):
        raise NotImplementedError

    def model(self, initialise: bool) -> nn.Module:
        """The module the engine trains (with pre-trained weights when `initialise`: not when the run
        resumes, whose checkpoint holds them)."""
        raise NotImplementedError

    def criterion(self, model: nn.Module) -> Callable[[object, dict], dict]:
        """`criterion(model outputs, batch) -> {"loss", "loss_<part>"...}`."""
        raise NotImplementedError

    def parameter_groups(self, model: nn.Module) -> dict:
        raise NotImplementedError

    def export_info(self, dataset) -> ExportInfo:
        raise NotImplementedError

    def monitor(self, run: Run, model: nn.Module) -> dict | None:
        """Held-out metrics every `eval_every` steps (every rank takes part); None: none."""
        return None

    def evaluate(self, run: Run, model: nn.Module | None, export: Path) -> dict:
        """The held-out metrics of the trained model: `model` is built from `export` on every rank
        (under ZeRO-3 the live model holds only a shard of each weight; None without `data.val`),
        every rank calls this, each scores an even share of the held-out scenes, and rank 0 writes
        the reports."""
        return {}


class GPSTrainingTask(TrainingTask):
    """A task that trains the whole `GPSModel` (`cfg.model`) with `GPSCriterion` and GPS's optimizer
    groups, from the weights of the export `start_from` when `configure` sets one (pre-training's
    `init_from`, grounding fine-tuning's `pretrained`)."""

    start_from: Export | None = None

    def model(self, initialise: bool) -> GPSModel:
        model = GPSModel(self.cfg.model)
        if self.start_from is not None and initialise:
            if self.start_from.info.task == "backbone":  # a U-Net alone (a Pointcept checkpoint): the rest is fresh
                backbone = {k.removeprefix("backbone."): v for k, v in self.start_from.state_dict.items()}
                load_weights(model.backbone, {**model.backbone.state_dict(), **backbone}, self.start_from.path)
            else:
                load_weights(model, self.start_from.state_dict, self.start_from.path)
        return model

    def criterion(self, model: nn.Module) -> GPSCriterion:
        return GPSCriterion.of(self.cfg.model)

    def parameter_groups(self, model: nn.Module) -> dict:
        return optimizer_groups(model, gps_role, self.cfg.optim.no_decay)


def run_task(task: TrainingTask, progress: bool = True) -> dict:
    """Train `task`; returns its summary (also in RUN/summary.json). A stop signal raises
    `sparsegps.errors.Preempted` after a complete checkpoint."""
    if not task.cfg.data.train:
        raise UsageError("data.train names no shards; set data.train in the config or with --set data.train=[DIR]")
    task.configure()
    check_optimizer_fits_zero(task.cfg.optim.optimizer, zero_stage(read_deepspeed_json(task.cfg.deepspeed)))
    dataset = task.dataset()
    run = setup_run(task.cfg)
    try:
        model = task.model(initialise=not run.resumes)
        engine, ds_config = build_engine(run, model, task.parameter_groups(model), task.cfg.optim)
        info = task.export_info(dataset)
        evaluate = (lambda: task.monitor(run, engine.module) or {}) if _has_monitor(task) else None
        stats = train_loop(run, engine, dataset, task.criterion(engine.module), client_state=dataclasses.asdict(info),
                           progress=progress, desc=task.name, evaluate=evaluate)
        prefix = task.summary_prefix
        summary = {f"{prefix}_steps": stats.pop("steps"), f"{prefix}_scenes_per_s": stats.pop("scenes_per_s"),
                   f"{prefix}_voxels_per_s": stats.pop("voxels_per_s"), "world_size": run.world,
                   "zero_stage": zero_stage(ds_config), "precision": run.precision, "train_scenes": len(dataset),
                   "pretrained": getattr(task.cfg, "pretrained", None), **stats}
        export = run.out / EXPORT_NAME
        if run.rank == 0:
            export_checkpoint(run.checkpoints, export, source=str(run.out))
        if dist.is_initialized():
            dist.barrier()
        # without held-out data there is nothing to evaluate the export on: it is not read again
        evaluated = build_model(read_export(export), run.device) if task.cfg.data.val else None
        summary.update(task.evaluate(run, evaluated, export))
        if run.rank == 0:
            atomic_write_text(run.out / "summary.json", json.dumps(summary, indent=1))
        if dist.is_initialized():
            dist.barrier()
        return summary
    finally:
        release_folder(run.out)  # the folder is free again, however the run ended


def _has_monitor(task: TrainingTask) -> bool:
    return type(task).monitor is not TrainingTask.monitor


__all__ = ["GPSTrainingTask", "TrainingTask", "run_task"]
