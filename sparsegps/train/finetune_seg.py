"""Fine-tune the (pre-trained) backbone for semantic segmentation, and evaluate it.

`finetune_segmentation(cfg, pretrained=...)` trains a `SegmentationModel` (linear or language-
aligned head) with cross-entropy (ignore index -1) through the same DeepSpeed loop as
pre-training, from a pre-training export or from scratch, frozen, partially frozen or in full; it
exports the fine-tuned weights and evaluates mIoU on the held-out shards.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from sparsegps.config import from_dict, to_dict
from sparsegps.distributed import all_reduce_sum
from sparsegps.errors import UsageError
from sparsegps.files import atomic_write_text
from sparsegps.losses import class_balance_weights, global_mean_share
from sparsegps.data import ScenesDataset, TransformConfig
from sparsegps.models.backbone import SpUNetConfig
from sparsegps.models.gps import optimizer_groups
from sparsegps.models.seg_heads import LanguageSegHead, SegmentationModel, SegModelConfig

from .checkpoint import export_state_dict, load_export, load_weights
from .engine import OptimConfig
from .loop import RunConfig, build_engine, setup_run, train_loop


@dataclass
class SegDataConfig:
    train: list[str] = field(default_factory=list)
    val: list[str] = field(default_factory=list)
    transforms: TransformConfig = field(default_factory=TransformConfig)
    labels: str | None = None  # label map (scannet20, scannet200, nyu40, synthetic); None: the store's vocabulary
    eval_max_scenes: int | None = None
    tta_rotations: int = 1


@dataclass
class SegConfig(RunConfig):
    output_dir: str = "runs/seg"
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


class SegmentationLoss(nn.Module):
    """Wraps the model for the training loop: batch -> {"loss", "loss_ce"}."""

    def __init__(self, model: SegmentationModel, remap: np.ndarray, class_balance: float = 0.0):
        super().__init__()
        self.model = model
        self.class_balance = class_balance
        self.register_buffer("remap", torch.from_numpy(remap), persistent=False)

    def forward(self, batch: dict) -> dict:
        """Cross-entropy over the labelled voxels of all ranks (`global_mean_share`): a rank whose
        scenes have few labelled voxels is not over-weighted, one with none adds zero."""
        logits = self.model(batch).float()
        labels = batch["voxel_semantic"]
        target = torch.where(labels >= 0, self.remap[labels.clamp(min=0)], torch.full_like(labels, -1))
        per_voxel = F.cross_entropy(logits, target, ignore_index=-1, reduction="none")
        if self.class_balance > 0:
            per_voxel = per_voxel * class_balance_weights(target, logits.shape[1], self.class_balance)
        labelled = all_reduce_sum((target >= 0).sum().to(torch.float64))
        loss = global_mean_share(per_voxel.sum(), labelled)
        return {"loss": loss, "loss_ce": loss}


def zero_shot_head(cfg: SegModelConfig, pretrained: str | None, names: list[str]) -> LanguageSegHead | None:
    """With `head_init: zero_shot`, the language head of the export's zero-shot segmenter."""
    if cfg.head_init != "zero_shot":
        return None
    if cfg.head != "language" or pretrained is None:
        raise UsageError(f"model.head_init=zero_shot needs model.head=language (got {cfg.head}) and --pretrained")
    from .pretrain import load_pretrained_model

    gps, _ = load_pretrained_model(pretrained)
    if gps.cfg.loss.dense_text <= 0:
        raise UsageError(f"{pretrained}: pre-trained without the dense_text loss, so it has no zero-shot "
                         f"segmenter to start from; use model.head_init=text")
    return LanguageSegHead.from_zero_shot(gps, names)


def backbone_config_of_export(blob: dict) -> SpUNetConfig:
    if "backbone_config" in blob:
        return from_dict(SpUNetConfig, blob["backbone_config"])
    return from_dict(SpUNetConfig, blob["model_config"]["backbone"])


def finetune_segmentation(cfg: SegConfig, pretrained: str | None = None, progress: bool = True) -> dict:
    from sparsegps.eval.segmentation import evaluate_segmentation, write_report

    if not cfg.data.train:
        raise ValueError("data.train names no shards")
    blob = load_export(pretrained) if pretrained else None
    if blob is not None:  # the backbone's shape comes from the pre-trained model
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, backbone=backbone_config_of_export(blob)))
    run = setup_run(cfg)
    train_set = ScenesDataset(cfg.data.train, cfg.data.transforms, seed=cfg.seed)
    names, remap = class_names_and_remap(train_set.vocabulary, cfg.data.labels)
    model = SegmentationModel(cfg.model, names, head=zero_shot_head(cfg.model, pretrained, names))
    if blob is not None:
        try:
            model.load_backbone(blob["state_dict"])
        except RuntimeError as e:
            raise UsageError(f"{pretrained}: its backbone does not fit ({str(e).splitlines()[-1].strip()[:200]})") from None
    model.freeze(cfg.freeze)
    wrapped = SegmentationLoss(model, remap, cfg.class_balance)
    groups = optimizer_groups(model, lambda name: "backbone" if name.startswith("backbone.") else "heads",
                              cfg.optim.no_decay)
    engine, _ = build_engine(run, wrapped, groups, cfg.optim)
    extra = {"backbone_config": to_dict(model.cfg.backbone), "vocabulary": names, "task": "segmentation",
             "voxel_size": cfg.data.transforms.voxel_size, "model_config": to_dict(model.cfg)}
    stats = train_loop(run, engine, train_set, client_state=extra, progress=progress,
                       desc="finetune-seg")
    summary = {"seg_steps": stats["steps"], "seg_scenes_per_s": stats["scenes_per_s"],
               "seg_loss": stats.get("loss"), "pretrained": pretrained, "freeze": cfg.freeze}
    if run.rank == 0:
        export_state_dict(run.out / "checkpoints", run.out / "export.pt", extra=extra)
    if dist.is_initialized():
        dist.barrier()
    if cfg.data.val:  # from the export: under ZeRO-3 the live model holds only a shard of each weight
        trained, _ = load_segmentation_model(run.out / "export.pt", run.device)
        report, conf = evaluate_segmentation(trained, cfg.data.val, cfg.data.transforms.voxel_size, run.device,
                                             len(names), names, remap, cfg.data.tta_rotations,
                                             batch_size=cfg.micro_batch, max_scenes=cfg.data.eval_max_scenes,
                                             progress=progress)
        if run.rank == 0:
            write_report(report, conf, names, run.out, "segmentation (held-out)")
        summary.update(seg_miou=report["miou"], seg_accuracy=report["accuracy"])
    if run.rank == 0:
        atomic_write_text(run.out / "summary.json", json.dumps(summary, indent=1))
    return summary


def load_segmentation_model(path: str, device="cpu") -> tuple[SegmentationModel, dict]:
    """A fine-tuned `SegmentationModel` from its export."""
    blob = load_export(path)
    if blob.get("task") != "segmentation":
        raise UsageError(f"{path}: not a segmentation export (task {blob.get('task')!r}); run `sparsegps "
                         f"finetune-seg` first and pass its RUN/export.pt")
    cfg = from_dict(SegModelConfig, blob["model_config"])
    state = {k.removeprefix("model."): v for k, v in blob["state_dict"].items()}
    head = None
    if cfg.head == "language":  # its class embeddings are in the export: no text encoder to build
        head = LanguageSegHead(cfg.backbone.dec_channels[-1], state["head.class_embeddings"])
    model = SegmentationModel(cfg, blob["vocabulary"], head=head)
    load_weights(model, state, path)
    return model.to(device), blob
