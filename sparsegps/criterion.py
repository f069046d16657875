"""The criteria: what a model's outputs cost, over the global batch.

`GPSCriterion` turns `GPSModel`'s features and logits into GPS's losses (and sparsegps's two that
train the backbone for what follows); `SegmentationCriterion` turns per-voxel logits into the
segmentation cross-entropy. Each loss is this rank's share of the mean of its terms over all ranks
(`losses.global_mean_share`): the counts of terms are summed over ranks once per call, and the
contrastive candidates are gathered from every rank (with gradients), so splitting a batch over
more ranks changes nothing but speed. Every rank issues the same collectives in the same order,
whatever its batch holds: a missing kind of text arrives as a placeholder whose terms weigh zero.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Literal

import torch
import torch.nn.functional as F

from sparsegps import losses as L
from sparsegps.distributed import all_reduce_sum, gather_rows

if TYPE_CHECKING:
    from sparsegps.models.gps import ModelConfig


@dataclass
class LossWeights:
    """The weight of each loss of `GPSCriterion` (0: off; the model then computes none of its
    outputs). A loss is declared here, in LABELS_CONSUMED, and computed in `GPSCriterion.__call__`
    from the outputs `GPSModel.forward` gives for a positive weight."""

    object_text: float = 1.0
    scene_text: float = 1.0
    referral_object: float = 1.0
    grounding: float = 1.0
    mlm: float = 1.0
    # Not in GPS's pre-training: GPS trains its object encoder beforehand on object classification
    # against class-name text embeddings (label smoothing 0.3); here that signal can train the
    # pooled object tokens end to end.
    object_class: float = 0.0
    # Not in GPS: every labelled voxel's feature, projected into the text space, against the
    # class-name texts, so a pre-trained model segments by naming classes (eval-seg --zero-shot).
    dense_text: float = 0.0
    # Not in GPS (PLA's caption-region association): each captioned object's voxels, projected as
    # dense_text projects them and averaged, against the batch's object captions (multi-positive
    # InfoNCE). Consumes texts only, so the voxels of classes whose labels are withheld
    # (`data.holdout: labels`) meet the words that name them, in the space where eval-seg
    # --zero-shot names classes.
    region_text: float = 0.0


LOSS_NAMES = tuple(f.name for f in dataclasses.fields(LossWeights))

# The labels each loss consumes besides the model's outputs (README, "presets by labels consumed"):
# "texts" (what captions and referrals say, their target objects included), "object_classes" (each
# object's class, or "a <class>" texts built from it), "voxel_classes" (per-voxel classes).
LABELS_CONSUMED: dict[str, Callable[["ModelConfig"], tuple[str, ...]]] = {
    "object_text": lambda m: ("texts",) if m.object_text == "caption" else ("object_classes",),
    "scene_text": lambda m: ("texts",),
    "referral_object": lambda m: ("texts",),
    "grounding": lambda m: ("texts",),
    "mlm": lambda m: ("texts",),
    "object_class": lambda m: ("object_classes",),
    "dense_text": lambda m: ("voxel_classes",),
    "region_text": lambda m: ("texts",),
}
LABEL_KINDS = ("texts", "object_classes", "voxel_classes")


def consumed_labels(model: "ModelConfig") -> list[str]:
    """The kinds of labels a pre-training with the losses of `model.loss` consumes, in LABEL_KINDS order."""
    used = {kind for name in LOSS_NAMES if getattr(model.loss, name) > 0 for kind in LABELS_CONSUMED[name](model)}
    return [kind for kind in LABEL_KINDS if kind in used]


def global_counts(device, **local) -> dict[str, torch.Tensor]:
    """Each count summed over ranks, in one collective."""
    values = torch.tensor([float(v) for v in local.values()], device=device, dtype=torch.float64)
    return dict(zip(local, all_reduce_sum(values).unbind()))


@dataclass
class GPSCriterion:
    """`criterion(outputs, batch) -> {"loss", "loss_<name>" for every name of LossWeights}`: the
    weighted sum and its parts (zero, still in the graph, for a weight of 0)."""

    weights: LossWeights
    object_class_smoothing: float = 0.3
    dense_class_balance: float = 0.0
    scene_text_gather: Literal["autograd", "gps"] = "autograd"  # gps: GPS's gather without gradient

    @classmethod
    def of(cls, cfg: "ModelConfig") -> "GPSCriterion":
        return cls(cfg.loss, cfg.object_class_smoothing, cfg.dense_class_balance, cfg.scene_text_gather)

    def __call__(self, out: dict, batch: dict) -> dict:
        w, objects, referrals = self.weights, out["objects"], out["referrals"]
        device = objects["tokens"].device
        counts = global_counts(
            device, referrals=referrals.count,
            masked_tokens=(out["mlm_labels"] != L.IGNORE_INDEX).sum() if "mlm_labels" in out else 0,
            object_texts=len(out["object_text_keys"]) if "object_text_keys" in out else 0,
            regions=len(out["region_keys"]) if "region_keys" in out else 0,
            labelled_objects=(batch["object_label"] >= 0).sum(), labelled_voxels=(batch["voxel_semantic"] >= 0).sum())
        losses = self._referral_losses(out, counts)
        if "object_text_embedding" in out:
            losses["loss_object_text"] = self._text_contrast(
                out["object_text_embedding"], out["object_text_keys"], out["text_embedding"], out["text_keys"],
                out["object_scale"], counts["object_texts"])
        if "region_embedding" in out:
            losses["loss_region_text"] = self._text_contrast(
                out["region_embedding"], out["region_keys"], out["region_text_embedding"], out["region_text_keys"],
                out["region_scale"], counts["regions"])
        if "scene_embedding" in out:
            losses["loss_scene_text"] = self._scene_text(out)
        if "object_class_logits" in out:
            losses["loss_object_class"] = self._object_class(out, batch, counts["labelled_objects"])
        if "dense_logits" in out:
            losses["loss_dense_text"] = self._dense_text(out, batch, counts["labelled_voxels"])
        total = objects["tokens"].sum() * 0.0
        for name in LOSS_NAMES:
            value = losses.setdefault(f"loss_{name}", total * 0.0)
            total = total + getattr(w, name) * value
        losses["loss"] = total
        return losses

    def _referral_losses(self, out: dict, counts: dict) -> dict:
        """Grounding cross-entropy, referral-object contrast and MLM over the fused referrals."""
        referrals = out["referrals"]
        real, target = referrals.real, referrals.target
        # padding is masked on real rows only: the placeholder's row stays finite (weight zero)
        obj_pad = out["objects"]["pad"][referrals.scene_index] & real[:, None]
        grounding = L.masked_object_cross_entropy(out["grounding_logits"].masked_fill(~real[:, None], 0.0), obj_pad,
                                                  target)
        referral = L.masked_object_cross_entropy(out["referral_logits"], obj_pad, target)
        losses = {"loss_grounding": L.global_mean_share((grounding * real).sum(), counts["referrals"]),
                  "loss_referral_object": L.global_mean_share((referral * real).sum(), counts["referrals"])}
        if "mlm_logits" in out:
            mlm_logits = out["mlm_logits"]
            mlm = L.mlm_loss(mlm_logits, out["mlm_labels"])
            losses["loss_mlm"] = L.global_mean_share(mlm.sum() + mlm_logits.sum() * 0.0, counts["masked_tokens"])
        return losses

    @staticmethod
    def _text_contrast(rows: torch.Tensor, row_keys: torch.Tensor, texts: torch.Tensor, text_keys: torch.Tensor,
                       scale: torch.Tensor, global_rows: torch.Tensor) -> torch.Tensor:
        """Rows (object tokens for object_text, projected object regions for region_text) against
        the distinct texts of all ranks (multi-positive InfoNCE; a row's positives are the texts of
        its key): gathered with gradients, a text held by several ranks counted once, so the loss
        does not depend on how the batch is split over ranks."""
        all_encoded, _ = gather_rows(texts)
        all_keys, _ = gather_rows(text_keys)
        keep = L.first_occurrences(all_keys) & (all_keys != 0)
        positive = row_keys[:, None] == all_keys[keep][None, :]
        per_row = L.multi_positive_info_nce(rows, all_encoded[keep], positive, scale)
        anchor = all_encoded.sum() * 0.0  # the placeholder and duplicates stay in the graph
        return L.global_mean_share(per_row.sum() + anchor, global_rows)

    def _scene_text(self, out: dict) -> torch.Tensor:
        """Scene against scene caption, candidates from all ranks (symmetric InfoNCE)."""
        per_row, global_rows = L.symmetric_info_nce(out["scene_embedding"], out["caption_embedding"],
                                                    out["scene_scale"], gather_grad=self.scene_text_gather == "autograd")
        anchor = out["caption_placeholder"].sum() * 0.0
        return L.global_mean_share(per_row.sum() + anchor, global_rows)


    def _object_class(self, out: dict, batch: dict, global_rows: torch.Tensor) -> torch.Tensor:
        """Each labelled object's class against the class-name texts (label smoothing as GPS's)."""
        labels = batch["object_label"].to(out["object_class_logits"].device)
        per_object = L.labelled_cross_entropy(out["object_class_logits"], labels, self.object_class_smoothing)
        return L.global_mean_share(per_object.sum(), global_rows)

    def _dense_text(self, out: dict, batch: dict, global_rows: torch.Tensor) -> torch.Tensor:
        """Each labelled voxel's class against the class-name texts, classes balanced."""
        logits = out["dense_logits"]
        labels = batch["voxel_semantic"].to(logits.device)
        per_voxel = L.labelled_cross_entropy(logits, labels)
        if self.dense_class_balance > 0:
            per_voxel = per_voxel * L.class_balance_weights(labels, logits.shape[1], self.dense_class_balance)
        return L.global_mean_share(per_voxel.sum(), global_rows)


@dataclass
class SegmentationCriterion:
    """Per-voxel cross-entropy (ignore label -1) over the labelled voxels of all ranks, classes
    weighted by `class_balance` (see `losses.class_balance_weights`). `remap` [store labels] maps the
    batch's label ids to the head's classes (-1: ignore)."""

    remap: torch.Tensor
    class_balance: float = 0.0

    def __call__(self, logits: torch.Tensor, batch: dict) -> dict:
        logits = logits.float()
        labels = batch["voxel_semantic"]
        remap = self.remap.to(labels.device)
        target = torch.where(labels >= 0, remap[labels.clamp(min=0)], torch.full_like(labels, -1))
        per_voxel = F.cross_entropy(logits, target, ignore_index=-1, reduction="none")
        if self.class_balance > 0:
            per_voxel = per_voxel * L.class_balance_weights(target, logits.shape[1], self.class_balance)
        labelled = all_reduce_sum((target >= 0).sum().to(torch.float64))
        loss = L.global_mean_share(per_voxel.sum(), labelled)
        return {"loss": loss, "loss_ce": loss}


__all__ = ["LABELS_CONSUMED", "LABEL_KINDS", "LOSS_NAMES", "GPSCriterion", "LossWeights", "SegmentationCriterion",
           "consumed_labels", "global_counts"]
