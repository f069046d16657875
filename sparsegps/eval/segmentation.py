"""Semantic segmentation evaluation on every original point.

Per-voxel logits are mapped back to the points through the grid-sampling inverse map, optionally
averaged over rotations about z (test-time augmentation); points labelled `ignore_index` count
nowhere. IoU_k = TP / (TP + FP + FN); classes with no ground truth and no prediction are absent
and left out of the mean (reported as null).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from sparsegps.data import SceneStore, collate_scenes, move_batch
from sparsegps.data.transforms import model_input, scene_to_sample
from sparsegps.distributed import all_reduce_sum, even_shard, rank, world_size
from sparsegps.files import atomic_save_figure, atomic_write_text

IGNORE_INDEX = -1


def confusion_matrix(pred: np.ndarray, target: np.ndarray, num_classes: int,
                     ignore_index: int = IGNORE_INDEX) -> np.ndarray:
    """[K, K] counts, rows = ground truth, columns = prediction; ignored points are skipped."""
    keep = (target != ignore_index) & (target >= 0) & (target < num_classes)
    idx = target[keep].astype(np.int64) * num_classes + pred[keep].astype(np.int64)
    return np.bincount(idx, minlength=num_classes ** 2).reshape(num_classes, num_classes)


def segmentation_metrics(conf: np.ndarray, class_names: list[str]) -> dict:
    """mIoU, per-class IoU, overall accuracy and mean class accuracy from a confusion matrix."""
    conf = conf.astype(np.float64)
    tp = np.diag(conf)
    gt, pr = conf.sum(1), conf.sum(0)
    union = gt + pr - tp
    iou = np.where(union > 0, tp / np.maximum(union, 1), np.nan)
    acc = np.where(gt > 0, tp / np.maximum(gt, 1), np.nan)
    present = ~np.isnan(iou)
    return {
        "miou": float(np.nanmean(iou)) if present.any() else float("nan"),
        "accuracy": float(tp.sum() / conf.sum()) if conf.sum() else float("nan"),
        "mean_class_accuracy": float(np.nanmean(acc)) if (gt > 0).any() else float("nan"),
        "per_class_iou": {n: (None if np.isnan(v) else float(v)) for n, v in zip(class_names, iou)},
        "points": int(conf.sum()),
    }


def plot_confusion(conf: np.ndarray, class_names: list[str], path: Path, title: str) -> None:
    """Row-normalised confusion matrix as a heat map."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = conf.sum(1, keepdims=True)
    norm = np.divide(conf, rows, out=np.zeros_like(conf, dtype=np.float64), where=rows > 0)
    k = len(class_names)
    size = max(5.0, 0.38 * k + 2)
    fig, ax = plt.subplots(figsize=(size + 1, size))
    im = ax.imshow(norm, cmap="viridis", vmin=0, vmax=1)
    ax.set_xticks(range(k), class_names, rotation=90, fontsize=7)
    ax.set_yticks(range(k), class_names, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("ground truth")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, label="fraction of ground-truth points")
    fig.tight_layout()
    atomic_save_figure(fig, path)


@torch.no_grad()
def evaluate_segmentation(model, paths, voxel_size: float, device, num_classes: int, class_names: list[str],
                          label_remap: np.ndarray | None = None, tta_rotations: int = 1, batch_size: int = 4,
                          max_scenes: int | None = None, progress: bool = True) -> tuple[dict, np.ndarray]:
    """Point-level metrics of `model` (batch -> voxel logits) on the scenes at `paths`.

    `label_remap` maps the store's label ids to the model's classes (-1 = ignore). On several ranks
    each rank scores an even share of the scenes (`even_shard`: the same number of batches each,
    fill-in repeats not counted) and the confusion matrices are summed, so every scene counts once."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    store = SceneStore(paths)
    n = len(store) if max_scenes is None else min(max_scenes, len(store))
    conf = np.zeros((num_classes, num_classes), np.int64)
    indices, counted = even_shard(n, rank(), world_size())
    for start in tqdm(range(0, len(indices), batch_size), desc="eval-seg", unit="batch",
                      disable=not progress or rank() != 0):
        chosen = indices[start:start + batch_size]
        scenes = [store[i] for i in chosen]
        point_logits = None
        for r in range(tta_rotations):
            angle = 2 * math.pi * r / tta_rotations
            samples = [model_input(scene_to_sample(scene), voxel_size, i, angle) for i, scene in zip(chosen, scenes)]
            batch = move_batch(collate_scenes(samples), device)
            logits = model(batch).float().softmax(-1).cpu()
            offsets = batch["voxel_offsets"].cpu()
            per_scene = [logits[offsets[b]:offsets[b + 1]][torch.from_numpy(samples[b]["inverse"])]
                         for b in range(len(samples))]
            point_logits = per_scene if point_logits is None else [a + p for a, p in zip(point_logits, per_scene)]
        for scene, probs, keep in zip(scenes, point_logits, counted[start:start + batch_size]):
            if not keep:
                continue
            target = scene.semantic.astype(np.int64)
            if label_remap is not None:
                target = np.where(target >= 0, label_remap[np.clip(target, 0, None)], IGNORE_INDEX)
            conf += confusion_matrix(probs.argmax(-1).numpy(), target, num_classes)
    conf = all_reduce_sum(torch.from_numpy(conf).to(device)).cpu().numpy()
    model.train(was_training)
    return segmentation_metrics(conf, class_names), conf


def write_report(report: dict, conf: np.ndarray, class_names: list[str], out_dir: Path, title: str) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)

    atomic_write_text(out_dir / "seg_report.json", json.dumps({**report, "confusion": conf.tolist(),
                                                               "classes": class_names}, indent=1))
    plot_confusion(conf, class_names, out_dir / "confusion.png", title)


def format_table(report: dict) -> str:
    lines = ["| class | IoU |", "| --- | --- |"]
    for name, v in report["per_class_iou"].items():
        lines.append(f"| {name} | {'absent' if v is None else f'{v:.3f}'} |")
    lines.append(f"| **mIoU** | **{report['miou']:.3f}** |")
    lines.append(f"| accuracy | {report['accuracy']:.3f} |")
    return "\n".join(lines)


def harmonic_mean(a: float, b: float) -> float:
    """2ab / (a + b): hIoU of a base and a novel mIoU (0 when either is 0, nan when either is nan)."""
    if math.isnan(a) or math.isnan(b):
        return float("nan")
    return 2 * a * b / (a + b) if a + b > 0 else 0.0


def zero_shot_report(report: dict, confusion: np.ndarray, seen: list[str], names: list[str]) -> dict:
    """A zero-shot evaluation split by base classes (`seen`: labelled in pre-training) and novel ones
    (the other evaluated classes), with hIoU, against two baselines from the ground truth alone:

    prior     each point labelled at random with the classes' point shares q: class k's expected
              IoU is q_k / (2 - q_k) (TP = N q^2, FP = FN = N q (1 - q)), above 0 for every
              present class, novel ones included, so it can be beaten on both
    majority  every point labelled with the most frequent class: its IoU is its share, every other
              class 0 (a novel class's majority mIoU is 0 by construction)

    Keys: unseen_classes, miou_seen, miou_unseen, hiou, and prior_* / majority_* of the same."""
    truth = confusion.sum(axis=1).astype(np.float64)
    present = truth > 0
    in_seen = np.array([n in seen for n in names])

    def mean(values, mask):
        picked = [v for v, m, p in zip(values, mask, present) if m and p and v is not None and not np.isnan(v)]
        return float(np.mean(picked)) if picked else float("nan")

    iou = [report["per_class_iou"].get(n) for n in names]
    share = truth / truth.sum() if truth.sum() else truth
    prior = share / (2 - share)
    majority = np.zeros(len(truth))
    if truth.sum():
        majority[int(truth.argmax())] = truth.max() / truth.sum()
    out = {"unseen_classes": [n for n, s, p in zip(names, in_seen, present) if not s and p]}
    for prefix, values in (("", iou), ("prior_", list(prior)), ("majority_", list(majority))):
        seen_miou, novel_miou = mean(values, in_seen), mean(values, ~in_seen)
        out.update({f"{prefix}miou_seen": seen_miou, f"{prefix}miou_unseen": novel_miou,
                    f"{prefix}hiou": harmonic_mean(seen_miou, novel_miou)})
        if prefix:
            out[f"{prefix}miou"] = mean(values, np.ones(len(names), bool))
    return out
