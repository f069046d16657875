"""GPS pre-training on shards with DeepSpeed, from one CPU process to many GPUs on many nodes.

`pretrain(cfg)` builds the data pipeline, the model and a DeepSpeed engine (ZeRO stage from the
JSON named by `cfg.deepspeed`), runs `cfg.steps` optimizer steps of `cfg.global_batch` scenes
(micro-batches of `cfg.micro_batch` scenes per rank, accumulated over
`global_batch / (micro_batch * world)` micro-steps), evaluates on held-out scenes, and exports a
consolidated fp32 state dict that the fine-tuning commands load.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Literal

import torch.distributed as dist

from sparsegps.config import from_dict, to_dict
from sparsegps.data import SceneStore, ScenesDataset, TransformConfig
from sparsegps.errors import UsageError
from sparsegps.files import atomic_write_text
from sparsegps.models.gps import LOSS_NAMES, GPSModel, LossWeights, ModelConfig

from .checkpoint import export_state_dict, load_export, load_weights
from .engine import OptimConfig, zero_stage
from .loop import RunConfig, build_engine, setup_run, train_loop


@dataclass
class DataConfig:
    train: list[str] = field(default_factory=list)  # shard files or directories
    val: list[str] = field(default_factory=list)
    transforms: TransformConfig = field(default_factory=TransformConfig)
    eval_max_scenes: int | None = 256
    # Classes held out of pre-training (for zero-shot evaluation of classes it never saw): their
    # points take the ignore label, their objects no class target, and texts that name them are
    # dropped from batches (`transforms.HoldOutClasses`); the store is untouched. The export lists
    # the classes trained on (`trained_classes`).
    holdout_classes: list[str] = field(default_factory=list)


@dataclass
class PretrainConfig(RunConfig):
    output_dir: str = "runs/pretrain"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    # all: every loss of model.loss. objects: GPS's first stage, object classification of the pooled
    # tokens against the class-name texts alone (model.loss is replaced by object_class=1); a second
    # run with `init_from: STAGE1/export.pt` then trains everything from those weights.
    stage: Literal["all", "objects"] = "all"
    init_from: str | None = None  # a pre-training export whose weights start this run


OBJECT_STAGE_LOSS = LossWeights(**{**{name: 0.0 for name in LOSS_NAMES}, "object_class": 1.0})


def pretrain(cfg: PretrainConfig, progress: bool = True) -> dict:
    """Run pre-training (or continue it, as `cfg.resume` says); returns a summary (steps, scenes/s,
    final losses, held-out metrics). With held-out data, the grounding diagnostics go to
    RUN/grounding.{json,md,png}. A stop signal raises `sparsegps.errors.Preempted` after a complete
    checkpoint."""
    from sparsegps.eval.grounding_diagnostics import save_diagnostics
    from sparsegps.eval.pretrain import evaluate_pretraining

    if not cfg.data.train:
        raise UsageError("data.train names no shards")
    train_set = training_set(cfg)
    cfg = with_class_names(cfg, train_set.classes)
    if cfg.stage == "objects":
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, loss=OBJECT_STAGE_LOSS))
    run = setup_run(cfg)
    model = GPSModel(cfg.model)
    if cfg.init_from and not run.resumes:
        load_weights(model, load_export(cfg.init_from)["state_dict"], cfg.init_from)
    engine, ds_config = build_engine(run, model, model.parameter_groups(cfg.optim.no_decay), cfg.optim)

    def evaluate() -> dict:
        result = evaluate_pretraining(engine.module, cfg.data.val, cfg.data.transforms, run.device, run.precision,
                                      cfg.micro_batch, cfg.data.eval_max_scenes, progress=False)
        diagnostics.append(result.pop("grounding_diagnostics"))
        return result

    diagnostics: list[dict] = []

    labels = consumed_labels(cfg.model)
    extra = {"model_config": to_dict(cfg.model), "vocabulary": train_set.vocabulary,
             "trained_classes": train_set.classes, "holdout_classes": list(cfg.data.holdout_classes),
             "preset": preset_name(labels), "labels_consumed": labels, "voxel_size": cfg.data.transforms.voxel_size}
    stats = train_loop(run, engine, train_set, client_state=extra, progress=progress,
                       desc="pretrain", evaluate=evaluate if cfg.data.val else None)
    summary = {"pretrain_steps": stats.pop("steps"), "pretrain_scenes_per_s": stats.pop("scenes_per_s"),
               "pretrain_voxels_per_s": stats.pop("voxels_per_s"), "world_size": run.world,
               "zero_stage": zero_stage(ds_config), "precision": run.precision, "train_scenes": len(train_set),
               **stats}
    if cfg.data.val:
        summary.update(evaluate())
    if run.rank == 0:
        export_state_dict(run.out / "checkpoints", run.out / "export.pt", extra=extra)
        atomic_write_text(run.out / "summary.json", json.dumps(summary, indent=1))
        if diagnostics and diagnostics[-1]["referrals"]:
            save_diagnostics(diagnostics[-1], run.out, "grounding", f"held-out grounding after {summary['pretrain_steps']} "
                             "pre-training steps")
    if dist.is_initialized():
        dist.barrier()
    return summary


def training_set(cfg: PretrainConfig) -> ScenesDataset:
    """The training scenes with the run's transforms; with `data.holdout_classes`, labels index the
    classes trained on (the store's vocabulary without the held-out ones) and the held-out classes'
    labels and names never reach a batch."""
    from sparsegps.data.transforms import HoldOutClasses, build_transforms
    from sparsegps.language.templates import class_words

    vocabulary = SceneStore(cfg.data.train).vocabulary
    holdout = list(cfg.data.holdout_classes)
    unknown = [c for c in holdout if c not in vocabulary]
    if unknown:
        raise UsageError(f"data.holdout_classes: {unknown} not in the training shards' vocabulary {vocabulary}")
    transforms = build_transforms(cfg.data.transforms)
    if holdout:
        words = [w for c in holdout for w in class_words(c)]
        transforms.transforms.insert(0, HoldOutClasses(holdout, words))
    return ScenesDataset(cfg.data.train, transforms, seed=cfg.seed,
                         classes=[c for c in vocabulary if c not in holdout])


def with_class_names(cfg: PretrainConfig, classes: list[str]) -> PretrainConfig:
    """The config with `model.class_names` set to the classes trained on (the label ids of its
    batches index them); a different list given by the user is refused."""
    names = list(cfg.model.class_names)
    if names and names != list(classes):
        raise UsageError(f"model.class_names {names[:5]}... differs from the classes trained on "
                         f"{list(classes)[:5]}...; leave it empty to use the shards' vocabulary")
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, class_names=list(classes)))


LABEL_KINDS = ("texts", "object_classes", "voxel_classes")


def consumed_labels(model: ModelConfig) -> list[str]:
    """The kinds of labels a pre-training with these losses consumes: "texts" (what the captions and
    referrals say, their target objects included), "object_classes" (each object's class: object
    classification, or "a <class>" object texts), "voxel_classes" (per-voxel classes: dense_text)."""
    w = model.loss
    kinds = []
    if w.mlm > 0 or w.referral_object > 0 or w.grounding > 0 or w.scene_text > 0 or (
            w.object_text > 0 and model.object_text == "caption"):
        kinds.append("texts")
    if w.object_class > 0 or (w.object_text > 0 and model.object_text == "class_name"):
        kinds.append("object_classes")
    if w.dense_text > 0:
        kinds.append("voxel_classes")
    return kinds


def preset_name(labels: list[str]) -> str:
    """The preset a pre-training belongs to, named by the labels it consumed: language (texts only,
    GPS's signals), objects (+ object classes), dense (+ per-voxel classes)."""
    return "dense" if "voxel_classes" in labels else "objects" if "object_classes" in labels else "language"


def load_pretrained_model(path: str | os.PathLike, device="cpu") -> tuple[GPSModel, dict]:
    """A `GPSModel` with the weights of an export (see `sparsegps export`), and the export's metadata."""
    blob = load_export(path)
    model = GPSModel(from_dict(ModelConfig, blob["model_config"]))
    load_weights(model, blob["state_dict"], path)
    return model.to(device), blob
