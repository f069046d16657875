"""Fine-tune GPS for 3D visual grounding (Nr3D, Sr3D, ScanRefer), and evaluate it.

GPS fine-tunes the whole pre-trained model with the grounding cross-entropy over each referral's
scene objects. `finetune_grounding(cfg)` runs the grounding task (`sparsegps.train.task`): the
model of a pre-training export (`pretrained`; its architecture comes from the export, and the
config values it replaces are named in a warning) or `cfg.model` from scratch, with `cfg.loss` as its
losses (grounding on; referral-object contrast optional; MLM, scene-text and object-text off by
default); it exports the weights with task "grounding" and scores the held-out shards with the
benchmark's metrics (`sparsegps.eval.grounding_model`) and the grounding diagnostics.

Referrals per scene and step are bounded by `data.transforms.max_referrals` (a fresh random subset
each epoch), so a batch costs at most micro_batch x max_referrals grounding passes.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from sparsegps.config import differences, from_dict, to_dict
from sparsegps.data import ScenesDataset, TransformConfig
from sparsegps.errors import UsageError
from sparsegps.exports import ExportInfo, read_starting_export
from sparsegps.criterion import LossWeights
from sparsegps.models.gps import ModelConfig

from .engine import OptimConfig
from .run import DataConfig, Run, RunConfig
from .task import GPSTrainingTask, run_task

# Model settings that are training choices, not architecture: with a pre-trained export they come
# from the config's `model` section; everything else comes from the export.
TRAINING_MODEL_FIELDS = ("attention_backend", "activation_checkpointing", "freeze_text")


@dataclass
class GroundDataConfig(DataConfig):
    transforms: TransformConfig = field(default_factory=lambda: TransformConfig(max_referrals=16))
    benchmark: Literal["nr3d", "sr3d", "scanrefer"] = "nr3d"  # ReferIt3D accuracy, or ScanRefer Acc@0.25 / 0.5
    proposals: str | None = None  # ScanRefer: detector boxes of the val scans (JSON or .npz); None: GT boxes
    eval_referral_chunk: int = 64  # referrals grounded per forward in evaluation
    monitor_scenes: int = 64  # val scenes of the periodic (eval_every) grounding accuracy


@dataclass
class GroundLossWeights:
    """The fine-tuning losses; they replace the `loss` weights of the model config."""

    grounding: float = 1.0
    referral_object: float = 0.0
    object_text: float = 0.0
    scene_text: float = 0.0
    mlm: float = 0.0


@dataclass
class GroundConfig(RunConfig):
    output_dir: str = "runs/ground"
    pretrained: str | None = None  # a pre-training (or grounding) export to fine-tune; None: from scratch
    data: GroundDataConfig = field(default_factory=GroundDataConfig)
    # The model trained from scratch; with an export, only TRAINING_MODEL_FIELDS are read. Its `loss`
    # is replaced by `loss` below either way.
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: GroundLossWeights = field(default_factory=GroundLossWeights)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(warmup_steps=200))


class ReferralScenesDataset(ScenesDataset):
    """`ScenesDataset` keeping only the text kinds the fine-tuning losses read."""

    def __init__(self, paths, transforms: TransformConfig, seed: int, text_kinds: frozenset[str], data):
        super().__init__(paths, transforms, seed=seed, verify=data.verify, on_corrupt=data.on_corrupt)
        self.text_kinds = text_kinds

    def __getitem__(self, item: int | tuple[int, int]) -> dict:
        sample = super().__getitem__(item)
        sample["texts"] = [t for t in sample["texts"] if t.kind in self.text_kinds]
        return sample


def text_kinds_for(model_cfg: ModelConfig) -> frozenset[str]:
    kinds = {"referral"}
    if model_cfg.loss.scene_text > 0:
        kinds.add("scene_caption")
    if model_cfg.loss.object_text > 0 and model_cfg.object_text == "caption":
        kinds.add("object_caption")
    return frozenset(kinds)


def grounding_model_config(cfg: GroundConfig, export) -> ModelConfig:
    """The model to fine-tune: the export's architecture (or `cfg.model`) with `cfg.loss` as its losses.
    With an export, every `model` value of the config that the export replaces is named in a warning."""
    base = cfg.model
    if export is not None:
        base = from_dict(ModelConfig, export.info.model_config)
        base = dataclasses.replace(base, **{name: getattr(cfg.model, name) for name in TRAINING_MODEL_FIELDS})
        replaced = [f"model.{key} {mine!r} -> {theirs!r}" for key, mine, theirs in differences(cfg.model, base)
                    if key.split(".")[0] not in ("loss", "class_names")]
        if replaced:
            warnings.warn(f"the pre-trained export's architecture replaces {len(replaced)} value(s) of the config: "
                          + ", ".join(replaced), stacklevel=2)
    return dataclasses.replace(base, loss=LossWeights(**dataclasses.asdict(cfg.loss)))


class GroundingTask(GPSTrainingTask):
    name = "finetune-ground"
    summary_prefix = "ground"

    def configure(self) -> None:
        cfg = self.cfg
        if cfg.data.proposals and cfg.data.benchmark != "scanrefer":
            raise UsageError(f"data.proposals is for ScanRefer (Acc@k of proposal boxes), not {cfg.data.benchmark}")
        if cfg.loss.grounding <= 0 and cfg.loss.referral_object <= 0:
            raise UsageError("loss.grounding and loss.referral_object are both 0: nothing would learn to ground")
        self.start_from = read_starting_export(cfg.pretrained, ("pretraining", "grounding"),
                                               "finetune-ground --pretrained", cfg.data.transforms.voxel_size) \
            if cfg.pretrained else None
        if cfg.data.transforms.max_referrals is None:
            warnings.warn("data.transforms.max_referrals is not set: every referral of a scene enters each step",
                          stacklevel=2)
        # config.yaml shows the model trained
        self.cfg = dataclasses.replace(cfg, model=grounding_model_config(cfg, self.start_from))

    def dataset(self) -> ScenesDataset:
        cfg = self.cfg
        return ReferralScenesDataset(cfg.data.train, cfg.data.transforms, cfg.seed, text_kinds_for(cfg.model),
                                     cfg.data)

    def export_info(self, dataset) -> ExportInfo:
        return ExportInfo("grounding", to_dict(self.cfg.model), vocabulary=list(dataset.vocabulary),
                          voxel_size=self.cfg.data.transforms.voxel_size)

    def monitor(self, run: Run, model) -> dict | None:
        from sparsegps.eval.pretrain import evaluate_pretraining

        cfg = self.cfg
        if not cfg.data.val or not cfg.eval_every:
            return None
        result = evaluate_pretraining(model, cfg.data.val, cfg.data.transforms, run.device, run.precision,
                                      cfg.micro_batch, cfg.data.monitor_scenes, progress=False)
        return {k: result[k] for k in ("grounding_acc", "grounding_class_prior", "grounding_within_class_accuracy",
                                       "grounding_chance", "grounding_referrals")}

    def evaluate(self, run: Run, model, export: Path) -> dict:
        """The benchmark's report of the exported weights (each rank an even share of the scenes,
        rank 0 writing): the numbers `sparsegps eval-ground` gives."""
        from sparsegps.eval.grounding import save_report
        from sparsegps.eval.grounding_diagnostics import save_diagnostics
        from sparsegps.eval.grounding_model import evaluate_grounding, save_predictions

        cfg = self.cfg
        summary = {"benchmark": cfg.data.benchmark}
        if not cfg.data.val:
            return summary
        report, records = evaluate_grounding(
            model, cfg.data.val, cfg.data.benchmark,
            cfg.data.transforms.voxel_size, run.device, proposals_path=cfg.data.proposals, batch_size=cfg.micro_batch,
            max_scenes=cfg.data.eval_max_scenes, referral_chunk=cfg.data.eval_referral_chunk, precision=run.precision,
            progress=False)
        report["checkpoint"] = str(export)
        diagnostics = report.pop("grounding_diagnostics", None)
        json_path = run.out / "ground_report.json"
        if run.rank == 0:
            save_report(report, json_path)
            save_predictions(records, run.out / "ground_predictions.jsonl")
            if diagnostics is not None:
                save_diagnostics(diagnostics, run.out, "grounding", "grounding after fine-tuning")
        summary.update(benchmark_headline(report), report=str(json_path))
        if diagnostics is not None:
            summary.update(ground_class_prior=diagnostics["class_prior"],
                           ground_class_accuracy=diagnostics["class_accuracy"],
                           ground_within_class_accuracy=diagnostics["within_class_accuracy"])
        return summary


def finetune_grounding(cfg: GroundConfig, progress: bool = True) -> dict:
    """Fine-tune, export to RUN/export.safetensors, and evaluate on `data.val`; returns a summary."""
    return run_task(GroundingTask(cfg), progress)


def benchmark_headline(report: dict) -> dict:
    """The overall numbers of a grounding report, for summaries."""
    overall = report["splits"]["overall"]
    if report["benchmark"] == "referit3d":
        return {"ground_accuracy": overall["accuracy"], "ground_referrals": overall["total"]}
    return {**{f"ground_{k}": v for k, v in overall.items() if k.startswith("acc@")},
            "ground_referrals": overall["total"]}


__all__ = ["GroundConfig", "GroundDataConfig", "GroundLossWeights", "GroundingTask", "ReferralScenesDataset",
           "benchmark_headline", "finetune_grounding", "grounding_model_config"]
