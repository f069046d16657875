"""Fine-tune GPS for 3D visual grounding (Nr3D, Sr3D, ScanRefer), and evaluate it.

GPS fine-tunes the whole pre-trained model with the grounding cross-entropy over each referral's
scene objects. `finetune_grounding(cfg, pretrained=...)` loads a pre-training export (its
architecture comes from the export) or builds `cfg.model` from scratch, replaces the model's loss
weights with `cfg.loss` (grounding on; referral-object contrast optional; MLM, scene-text and
object-text off by default), trains through the shared DeepSpeed loop, exports the weights with
`task="grounding"`, and scores the held-out shards with the benchmark's metrics
(`sparsegps.eval.grounding_model`).

Referrals per scene and step are bounded by `data.transforms.max_referrals` (a fresh random subset
each epoch), so a batch costs at most micro_batch x max_referrals grounding passes.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from dataclasses import dataclass, field
from typing import Literal

import torch.distributed as dist

from sparsegps.config import from_dict, to_dict
from sparsegps.data import ScenesDataset, TransformConfig
from sparsegps.errors import UsageError
from sparsegps.files import atomic_write_text
from sparsegps.models.gps import GPSModel, LossWeights, ModelConfig

from .checkpoint import export_state_dict, load_export, load_weights
from .engine import OptimConfig, zero_stage
from .loop import RunConfig, build_engine, setup_run, train_loop

# Model settings that are training choices, not architecture: with a pre-trained export they come
# from the config's `model` section; everything else comes from the export.
TRAINING_MODEL_FIELDS = ("attention_backend", "activation_checkpointing", "freeze_text")


@dataclass
class GroundDataConfig:
    train: list[str] = field(default_factory=list)  # shard files or directories
    val: list[str] = field(default_factory=list)
    transforms: TransformConfig = field(default_factory=lambda: TransformConfig(max_referrals=16))
    benchmark: Literal["nr3d", "sr3d", "scanrefer"] = "nr3d"  # ReferIt3D accuracy, or ScanRefer Acc@0.25 / 0.5
    proposals: str | None = None  # ScanRefer: detector boxes of the val scans (JSON or .npz); None: GT boxes
    eval_max_scenes: int | None = None  # val scenes of the final benchmark evaluation (None: all)
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
    data: GroundDataConfig = field(default_factory=GroundDataConfig)
    # The model trained from scratch; with an export, only TRAINING_MODEL_FIELDS are read. Its `loss`
    # is replaced by `loss` below either way.
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: GroundLossWeights = field(default_factory=GroundLossWeights)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(warmup_steps=200))


class ReferralScenesDataset(ScenesDataset):
    """`ScenesDataset` keeping only the text kinds the fine-tuning losses read."""

    def __init__(self, paths, transforms: TransformConfig, seed: int, text_kinds: frozenset[str]):
        super().__init__(paths, transforms, seed=seed)
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


def grounding_model_config(cfg: GroundConfig, export: dict | None) -> ModelConfig:
    """The model to fine-tune: the export's architecture (or `cfg.model`) with `cfg.loss` as its losses.
    With an export, every `model` value of the config that the export replaces is named in a warning."""
    base = cfg.model
    if export is not None:
        base = from_dict(ModelConfig, export["model_config"])
        base = dataclasses.replace(base, **{name: getattr(cfg.model, name) for name in TRAINING_MODEL_FIELDS})
        replaced = [f"model.{key} {mine!r} -> {theirs!r}" for key, mine, theirs in differences(cfg.model, base)
                    if key.split(".")[0] not in ("loss", "class_names")]
        if replaced:
            warnings.warn(f"the pre-trained export's architecture replaces {len(replaced)} value(s) of the config: "
                          + ", ".join(replaced), stacklevel=2)
    return dataclasses.replace(base, loss=LossWeights(**dataclasses.asdict(cfg.loss)))


def differences(a, b, prefix: str = "") -> list[tuple[str, object, object]]:
    """(dotted key, value in a, value in b) of every field where two configs of one class differ."""
    out = []
    for f in dataclasses.fields(a):
        x, y = getattr(a, f.name), getattr(b, f.name)
        if dataclasses.is_dataclass(x) and dataclasses.is_dataclass(y):
            out += differences(x, y, f"{prefix}{f.name}.")
        elif x != y:
            out.append((f"{prefix}{f.name}", x, y))
    return out


def check_ground_config(cfg: GroundConfig) -> None:
    if not cfg.data.train:
        raise ValueError("data.train names no shards")
    if cfg.data.proposals and cfg.data.benchmark != "scanrefer":
        raise ValueError(f"data.proposals is for ScanRefer (Acc@k of proposal boxes), not {cfg.data.benchmark}")
    if cfg.loss.grounding <= 0 and cfg.loss.referral_object <= 0:
        raise ValueError("loss.grounding and loss.referral_object are both 0: nothing would learn to ground")


def load_grounding_export(path: str) -> dict:
    """An export holding a whole GPS model (pre-training or grounding), with its metadata."""
    blob = load_export(path)
    if "model_config" not in blob or blob.get("task", "pretraining") not in ("pretraining", "grounding"):
        raise UsageError(f"{path}: not a GPS export (task {blob.get('task')!r}); use a pre-training or "
                         f"grounding export")
    return blob


def finetune_grounding(cfg: GroundConfig, pretrained: str | None = None, progress: bool = True) -> dict:
    """Fine-tune, export to `output_dir/export.pt`, and evaluate on `data.val`; returns a summary."""
    from sparsegps.eval.grounding import save_report
    from sparsegps.eval.grounding_diagnostics import save_diagnostics
    from sparsegps.eval.grounding_model import evaluate_grounding, save_predictions
    from sparsegps.eval.pretrain import evaluate_pretraining

    from .pretrain import load_pretrained_model

    check_ground_config(cfg)
    blob = load_grounding_export(pretrained) if pretrained else None
    voxel_size = cfg.data.transforms.voxel_size
    if blob is not None and blob.get("voxel_size") not in (None, voxel_size):
        warnings.warn(f"{pretrained} was trained at voxel size {blob['voxel_size']}, fine-tuning uses {voxel_size}",
                      stacklevel=2)
    if cfg.data.transforms.max_referrals is None:
        warnings.warn("data.transforms.max_referrals is not set: every referral of a scene enters each step",
                      stacklevel=2)
    cfg = dataclasses.replace(cfg, model=grounding_model_config(cfg, blob))  # config.yaml shows the model trained
    run = setup_run(cfg)
    train_set = ReferralScenesDataset(cfg.data.train, cfg.data.transforms, cfg.seed, text_kinds_for(cfg.model))
    model = GPSModel(cfg.model)
    if blob is not None:
        load_weights(model, blob["state_dict"], pretrained)
    engine, ds_config = build_engine(run, model, model.parameter_groups(cfg.optim.no_decay), cfg.optim)

    def monitor() -> dict:
        result = evaluate_pretraining(engine.module, cfg.data.val, cfg.data.transforms, run.device, run.precision,
                                      cfg.micro_batch, cfg.data.monitor_scenes, progress=False)
        return {k: result[k] for k in ("grounding_acc", "grounding_class_prior", "grounding_within_class_accuracy",
                                       "grounding_chance", "grounding_referrals")}

    extra = {"model_config": to_dict(cfg.model), "vocabulary": train_set.vocabulary, "voxel_size": voxel_size,
             "task": "grounding"}
    stats = train_loop(run, engine, train_set, client_state=extra, progress=progress,
                       desc="finetune-ground", evaluate=monitor if cfg.data.val else None)
    summary = {"ground_steps": stats["steps"], "ground_scenes_per_s": stats["scenes_per_s"],
               "ground_loss": stats.get("loss"), "pretrained": pretrained, "benchmark": cfg.data.benchmark,
               "world_size": run.world, "zero_stage": zero_stage(ds_config), "precision": run.precision,
               "train_scenes": len(train_set)}
    if run.rank == 0:
        export_state_dict(run.out / "checkpoints", run.out / "export.pt", extra=extra)
        if cfg.data.val:
            # The exported weights, on this rank alone: the same numbers `sparsegps eval-ground` gives.
            eval_model, _ = load_pretrained_model(run.out / "export.pt", run.device)
            report, records = evaluate_grounding(
                eval_model, cfg.data.val, cfg.data.benchmark, voxel_size, run.device,
                proposals_path=cfg.data.proposals, batch_size=cfg.micro_batch, max_scenes=cfg.data.eval_max_scenes,
                referral_chunk=cfg.data.eval_referral_chunk, precision=run.precision, progress=progress)
            report["checkpoint"] = str(run.out / "export.pt")
            diagnostics = report.pop("grounding_diagnostics", None)
            json_path, _ = save_report(report, run.out / "ground_report.json")
            save_predictions(records, run.out / "ground_predictions.jsonl")
            summary.update(benchmark_headline(report), report=str(json_path))
            if diagnostics is not None:
                save_diagnostics(diagnostics, run.out, "grounding", f"grounding after {stats['steps']} fine-tuning steps")
                summary.update(ground_class_prior=diagnostics["class_prior"],
                               ground_class_accuracy=diagnostics["class_accuracy"],
                               ground_within_class_accuracy=diagnostics["within_class_accuracy"])
        atomic_write_text(run.out / "summary.json", json.dumps(summary, indent=1))
    if dist.is_initialized():
        dist.barrier()
    return summary


def benchmark_headline(report: dict) -> dict:
    """The overall numbers of a grounding report, for summaries."""
    overall = report["splits"]["overall"]
    if report["benchmark"] == "referit3d":
        return {"ground_accuracy": overall["accuracy"], "ground_referrals": overall["total"]}
    return {**{f"ground_{k}": v for k, v in overall.items() if k.startswith("acc@")},
            "ground_referrals": overall["total"]}


__all__ = ["GroundConfig", "GroundDataConfig", "GroundLossWeights", "ReferralScenesDataset", "benchmark_headline",
           "finetune_grounding", "grounding_model_config", "load_grounding_export"]
