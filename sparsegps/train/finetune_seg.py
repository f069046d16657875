"""Fine-tune the (pre-trained) backbone for semantic segmentation, and evaluate it.

`finetune_segmentation(cfg)` runs the segmentation task (`sparsegps.train.task`): a
`SegmentationModel` (linear or language-aligned head) with `SegmentationCriterion` (cross-entropy,
ignore index -1, over the labelled voxels of all ranks), from a pre-training export (`pretrained`)
or from scratch, frozen, partially frozen or in full; it exports the fine-tuned weights and
evaluates mIoU on the held-out shards.
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar, Literal

import numpy as np
import torch

from sparsegps.config import differences, from_dict, to_dict
from sparsegps.criterion import SegmentationCriterion
from sparsegps.data import SceneStore, ScenesDataset
from sparsegps.errors import UsageError
from sparsegps.exports import Export, ExportInfo, build_model, read_starting_export
from sparsegps.models.backbone import SpUNetConfig
from sparsegps.models.seg_heads import LanguageSegHead, SegmentationModel, SegModelConfig

from .engine import OptimConfig, optimizer_groups, segmentation_role
from .run import DataConfig, Run, RunConfig
from .task import TrainingTask, run_task


@dataclass
class SegDataConfig(DataConfig):
    LIMITS: ClassVar[dict[str, str]] = {"labelled_points": ">= 1", "rooms": ">= 1"}

    labels: str | None = None  # label map (scannet20, scannet200, nyu40, synthetic); None: the store's vocabulary
    tta_rotations: int = 1
    labelled_points: int | None = None
    """Sparse annotation: the training rooms keep this many labelled points each (a fixed, seeded,
    class-blind choice per room, `transforms.LabelledPoints`; the shape of ScanNet's 20/50/100/200
    points per scene) and every other point is ignored. None: every label."""
    rooms: int | None = None
    """Limited rooms: train on the first this many rooms of the training stores (in store order,
    the same on every run; the shape of ScanNet's 1%/5%/10% scene lists). None: every room."""


@dataclass
class SegConfig(RunConfig):
    output_dir: str = "runs/seg"
    # a pre-training export whose backbone starts the run (or a Pointcept SpUNet-v1m1 checkpoint); None: scratch
    pretrained: str | None = None
    data: SegDataConfig = field(default_factory=SegDataConfig)
    model: SegModelConfig = field(default_factory=SegModelConfig)
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr_backbone=1e-3, lr_heads=1e-3, warmup_steps=50))
    freeze: Literal["none", "encoder", "backbone"] = "none"  # encoder: train decoder + head; backbone: linear probe
    # Cross-entropy weights per class: share ** -class_balance of the global batch's labelled voxels
    # (0: plain mean; see `losses.class_balance_weights`), as the dense_text pre-training loss.
    class_balance: float = 0.0


def class_names_and_remap(vocabulary: list[str], labels: str | None) -> tuple[list[str], np.ndarray]:
    """Classes to segment, and the map from store label ids to class ids (-1 = ignore)."""
    if labels is None:
        return list(vocabulary), np.arange(len(vocabulary), dtype=np.int64)
    from sparsegps.data.labels import load_label_map

    names = list(load_label_map(labels).names)
    index = {n: i for i, n in enumerate(names)}
    return names, np.array([index.get(v, -1) for v in vocabulary], dtype=np.int64)


def zero_shot_head(export: Export, names: list[str]) -> LanguageSegHead:
    """The language head of a pre-training export's zero-shot segmenter (its dense projection,
    temperature and text-space class-name embeddings)."""
    gps = build_model(export)
    if gps.cfg.loss.dense_text <= 0:
        raise UsageError(f"{export.path}: pre-trained without the dense_text loss, so it has no zero-shot "
                         f"segmenter to start from; use model.head_init=text")
    return LanguageSegHead.from_zero_shot(gps, names)


class SegmentationTask(TrainingTask):
    name = "finetune-seg"
    summary_prefix = "seg"

    def configure(self) -> None:
        cfg = self.cfg
        self.export = read_starting_export(cfg.pretrained, ("pretraining", "grounding", "backbone"),
                                           "finetune-seg --pretrained", cfg.data.transforms.voxel_size) \
            if cfg.pretrained else None
        if self.export is not None:
            backbone = from_dict(SpUNetConfig, self.export.info.model_config["backbone"])
            replaced = [f"model.backbone.{key} {mine!r} -> {theirs!r}"
                        for key, mine, theirs in differences(cfg.model.backbone, backbone)]
            if replaced:  # the backbone's shape comes from the pre-trained model
                warnings.warn(f"the pre-trained export's backbone replaces {len(replaced)} value(s) of the config: "
                              + ", ".join(replaced), stacklevel=2)
                self.cfg = cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone=backbone))
        if cfg.data.labelled_points is not None and cfg.data.transforms.voxelize_on == "device":
            raise UsageError("data.labelled_points needs data.transforms.voxelize_on=worker (labels are chosen after "
                             "voxelizing)")
        if cfg.model.head_init == "zero_shot" and (cfg.model.head != "language" or self.export is None):
            raise UsageError(f"model.head_init=zero_shot needs model.head=language (got {cfg.model.head}) and "
                             f"--pretrained")
        self.names, self.remap = class_names_and_remap(SceneStore(cfg.data.train).vocabulary, cfg.data.labels)

    def dataset(self) -> ScenesDataset:
        from sparsegps.data.transforms import LabelledPoints, build_transforms

        data = self.cfg.data
        transforms = build_transforms(data.transforms)
        if data.labelled_points is not None:
            transforms.transforms.append(LabelledPoints(data.labelled_points))
        return ScenesDataset(data.train, transforms, seed=self.cfg.seed, rooms=data.rooms, verify=data.verify,
                             on_corrupt=data.on_corrupt)

    def model(self, initialise: bool) -> SegmentationModel:
        cfg = self.cfg
        head = zero_shot_head(self.export, self.names) if cfg.model.head_init == "zero_shot" else None
        model = SegmentationModel(cfg.model, self.names, head=head)
        if self.export is not None and initialise:
            try:
                model.load_backbone(self.export.state_dict)
            except RuntimeError as e:
                raise UsageError(f"{self.export.path}: its backbone does not fit "
                                 f"({str(e).splitlines()[-1].strip()[:200]})") from None
        model.freeze(cfg.freeze)
        return model

    def criterion(self, model) -> SegmentationCriterion:
        return SegmentationCriterion(torch.from_numpy(self.remap), self.cfg.class_balance)

    def parameter_groups(self, model) -> dict:
        return optimizer_groups(model, segmentation_role, self.cfg.optim.no_decay)

    def export_info(self, dataset) -> ExportInfo:
        return ExportInfo("segmentation", to_dict(self.cfg.model), vocabulary=list(self.names),
                          voxel_size=self.cfg.data.transforms.voxel_size)

    def evaluate(self, run: Run, model, export: Path) -> dict:
        """mIoU of the exported weights."""
        from sparsegps.eval.segmentation import evaluate_segmentation, write_report

        cfg = self.cfg
        summary = {"freeze": cfg.freeze, "labelled_points": cfg.data.labelled_points, "rooms": cfg.data.rooms}
        if cfg.data.val:
            report, conf = evaluate_segmentation(model, cfg.data.val, cfg.data.transforms.voxel_size, run.device,
                                                 len(self.names), self.names, self.remap, cfg.data.tta_rotations,
                                                 batch_size=cfg.micro_batch, max_scenes=cfg.data.eval_max_scenes,
                                                 progress=False)
            if run.rank == 0:
                write_report(report, conf, self.names, run.out, "segmentation (held-out)")
            summary.update(seg_miou=report["miou"], seg_accuracy=report["accuracy"])
        return summary


def finetune_segmentation(cfg: SegConfig, progress: bool = True) -> dict:
    """Fine-tune (or train from scratch) and evaluate; returns the summary (RUN/summary.json)."""
    return run_task(SegmentationTask(cfg), progress)


__all__ = ["SegConfig", "SegDataConfig", "SegmentationTask", "class_names_and_remap", "finetune_segmentation",
           "zero_shot_head"]
