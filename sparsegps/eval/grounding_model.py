"""Grounding predictions of a GPS model on stored referrals, and the benchmark reports built from them.

`predict_referrals` runs the model in eval mode, without augmentation, over every referral of every
scene. The objects of a batch of scenes are encoded once; the batch's referrals are then grounded
in chunks of `referral_chunk` (text encoder + grounding encoder + head), so scenes with hundreds of
referrals (Nr3D, Sr3D) keep memory flat. `evaluate_grounding` turns the predictions into
`referral_record`s and the benchmark's report (Nr3D / Sr3D: `evaluate_referit3d`; ScanRefer:
`evaluate_scanrefer`).

ScanRefer with detector proposals: each proposal box becomes an object of its scene, made of the
points inside it (the smallest box wins where boxes overlap), so the model chooses among the
proposals and its prediction is a proposal index, as `referral_record` expects.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple, Sequence

import numpy as np
import torch

from sparsegps.data import NO_INSTANCE, SceneObject, SceneStore, collate_scenes, move_batch
from sparsegps.data.transforms import model_input, scene_to_sample
from sparsegps.distributed import even_shard, gather_objects, rank, world_size
from sparsegps.errors import UsageError
from sparsegps.files import atomic_write_text

from .grounding import evaluate_referit3d, evaluate_scanrefer, load_proposal_boxes, referral_record
from .grounding_diagnostics import grounding_diagnostics

BENCHMARKS = ("nr3d", "sr3d", "scanrefer")
PROPOSAL_LABEL = "proposal"


class ProposalError(UsageError, ValueError):
    """A proposal file that cannot be read or lacks an evaluated scan; the message names the file."""


class ReferralPrediction(NamedTuple):
    scene_index: int  # position of the scene in the store
    scene_id: str
    text_index: int  # position of the referral in the scene's texts
    predicted_id: int  # instance id of the chosen object; a proposal index when grounding among proposals
    scores: np.ndarray | None = None  # the model's score of every object of the scene, in scene order


def assign_points_to_boxes(xyz: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Index of the box [P, 6] (center, size) holding each point, -1 for none: int32 [N].

    Where boxes overlap, a point goes to the smallest of them (the most specific proposal)."""
    owner = np.full(len(xyz), NO_INSTANCE, np.int32)
    boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 6)
    lo, hi = boxes[:, :3] - boxes[:, 3:] / 2, boxes[:, :3] + boxes[:, 3:] / 2
    for k in np.argsort(-boxes[:, 3:].prod(axis=1), kind="stable"):  # largest first: smaller ones overwrite
        inside = ((xyz >= lo[k]) & (xyz <= hi[k])).all(axis=1)
        owner[inside] = k
    return owner


def proposal_objects(boxes: np.ndarray) -> list[SceneObject]:
    """One object per proposal box; its instance id is the proposal index."""
    return [SceneObject(k, PROPOSAL_LABEL, box[:3], box[3:]) for k, box in enumerate(boxes)]


def check_proposals(proposals: dict[str, np.ndarray], scene_ids: Sequence[str], path) -> None:
    """Every evaluated scan must have an entry (an empty list when the detector found nothing)."""
    missing = [s for s in scene_ids if s not in proposals]
    if missing:
        raise ProposalError(f"{path}: no proposals for {len(missing)} of the {len(scene_ids)} evaluated scans "
                         f"(first: {missing[:5]}); a scan without detections needs an empty list")


class _EvalScenes(torch.utils.data.Dataset):
    """The stored scenes `indices` voxelized as they are (no augmentation); objects replaced by
    proposals if given.

    Each item carries the scene's referrals as (text index, utterance) and its `counted` flag; the
    collated batch has no texts, since `predict_referrals` grounds the referrals itself."""

    def __init__(self, store: SceneStore, indices: list[int], counted: list[bool], voxel_size: float,
                 proposals: dict | None):
        self.store, self.indices, self.counted = store, indices, counted
        self.proposals, self.voxel_size = proposals, voxel_size

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, item: int) -> dict:
        index = self.indices[item]
        scene = self.store[index]
        sample = scene_to_sample(scene)
        if self.proposals is not None:
            boxes = self.proposals[scene.scene_id]
            sample["instance"] = assign_points_to_boxes(scene.xyz, boxes)
            sample["objects"] = proposal_objects(boxes)
        sample = model_input(sample, self.voxel_size, index)
        sample["referrals"] = [(k, t.text) for k, t in enumerate(scene.texts) if t.kind == "referral"]
        sample["texts"] = []
        sample["counted"] = self.counted[item]
        return sample


def _collate(samples: list[dict]) -> tuple[dict, list[list[tuple[int, str]]], list[bool]]:
    return collate_scenes(samples), [s["referrals"] for s in samples], [s["counted"] for s in samples]


def grounding_logits(model, objects: dict, texts: list[str], scene_index: torch.Tensor) -> torch.Tensor:
    """Scores [R, L] of each referral over the objects of its scene (-inf on padding), as in
    `GPSModel.forward`, for objects already encoded by `model.encode_objects`."""
    return model.ground(model.encode_text(texts, scene_index.device), scene_index, objects)[2]


@torch.no_grad()
def predict_referrals(model, paths, voxel_size: float, device, batch_size: int = 4, max_scenes: int | None = None,
                      *, proposals: dict[str, np.ndarray] | None = None, referral_chunk: int = 64,
                      precision: str = "fp32", num_workers: int = 0,
                      progress: bool = True) -> list[ReferralPrediction]:
    """The object `model` (a `GPSModel`) chooses for every referral of the first `max_scenes` scenes
    at `paths`, in store order. With `proposals` ({scan id: [P, 6] boxes}) it chooses a proposal.

    On several ranks (a model of each rank's own, as built from an export) each rank grounds an even
    share of the scenes (`even_shard`) and every rank gets all the predictions, each scene's once."""
    from tqdm.auto import tqdm

    if referral_chunk < 1:
        raise ValueError(f"referral_chunk must be >= 1, got {referral_chunk}")
    device = torch.device(device)
    store = SceneStore(paths)
    count = len(store) if max_scenes is None else min(max_scenes, len(store))
    scene_ids = store.scene_ids()[:count]
    if proposals is not None:
        check_proposals(proposals, scene_ids, "proposals")
    indices, counted = even_shard(count, rank(), world_size())
    loader = torch.utils.data.DataLoader(_EvalScenes(store, indices, counted, voxel_size, proposals),
                                         batch_size=batch_size, collate_fn=_collate, num_workers=num_workers)
    was_training = model.training
    model.eval()
    predictions: list[ReferralPrediction] = []
    bar = tqdm(total=len(indices), desc="ground", unit="scene", disable=not progress or rank() != 0)
    for batch, referrals, keep in loader:
        scene_indices = batch["indices"]
        offsets = batch["object_offsets"].tolist()
        instances = batch["object_instance"].tolist()
        rows = [(b, k, text) for b, refs in enumerate(referrals) for k, text in refs]
        groundable = [row for row in rows if offsets[row[0] + 1] > offsets[row[0]]]
        chosen: dict[tuple[int, int], tuple[int, np.ndarray]] = {}
        if groundable:
            batch = move_batch(batch, device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                objects = model.encode_objects(batch)
                for start in range(0, len(groundable), referral_chunk):
                    chunk = groundable[start:start + referral_chunk]
                    scene_index = torch.tensor([b for b, _, _ in chunk], device=device)
                    logits = grounding_logits(model, objects, [text for _, _, text in chunk], scene_index)
                    scores = logits.float().cpu().numpy()
                    for (b, k, _), row in zip(chunk, scores):
                        row = row[:offsets[b + 1] - offsets[b]]
                        chosen[b, k] = instances[offsets[b] + int(row.argmax())], row
        for b, k, _ in rows:  # a scene with no objects (no proposals) predicts nothing
            if not keep[b]:  # a fill-in repeat of this rank's share
                continue
            predicted, scores = chosen.get((b, k), (NO_INSTANCE, None))
            predictions.append(ReferralPrediction(scene_indices[b], scene_ids[scene_indices[b]], k, predicted,
                                                  scores))
        bar.update(len(referrals))
    bar.close()
    model.train(was_training)
    return sorted(gather_objects(predictions), key=lambda p: (p.scene_index, p.text_index))


def grounding_records(store: SceneStore, predictions: Sequence[ReferralPrediction],
                      proposals: dict[str, np.ndarray] | None = None) -> tuple[list[dict], list[int]]:
    """`referral_record`s of the predictions (each scene read once), and each record's object count."""
    records, object_counts = [], []
    scene, scene_index = None, None
    for p in predictions:
        if p.scene_index != scene_index:
            scene, scene_index = store[p.scene_index], p.scene_index
        boxes = None if proposals is None else proposals[scene.scene_id]
        records.append({**referral_record(scene, p.text_index, p.predicted_id, boxes), "text_index": p.text_index})
        object_counts.append(len(scene.objects) if boxes is None else len(boxes))
    return records, object_counts


def diagnostic_records(store: SceneStore, predictions: Sequence[ReferralPrediction]) -> list[dict]:
    """Records for `grounding_diagnostics` (ground-truth objects only): each referral's scores over its
    scene's objects, the target's position, the objects' classes and boxes, the referral's relation,
    shape, source and words."""
    records, scene, scene_index = [], None, None
    for p in predictions:
        if p.scores is None:
            continue
        if p.scene_index != scene_index:
            scene, scene_index = store[p.scene_index], p.scene_index
            position = {o.instance_id: k for k, o in enumerate(scene.objects)}
            classes = [o.label for o in scene.objects]
            boxes = np.array([np.concatenate([o.center, o.size]) for o in scene.objects]).reshape(-1, 6)
        text = scene.texts[p.text_index]
        records.append({"scores": p.scores, "target": position[text.target_id], "classes": classes, "boxes": boxes,
                        "relation": text.relation, "shape": text.shape, "source": text.source,
                        "utterance": text.text})
    return records


def benchmark_report(records: Sequence[dict], benchmark: str, box_source: str = "ground_truth",
                     object_counts: Sequence[int] | None = None) -> dict:
    """The report of `benchmark` (nr3d, sr3d: ReferIt3D accuracy; scanrefer: Acc@0.25/0.5).

    With `object_counts`, `random_pick_accuracy` is the accuracy expected from choosing an object
    uniformly at random: the mean of 1 / (objects in the scene); None without them."""
    if benchmark in ("nr3d", "sr3d"):
        report = evaluate_referit3d(records)
    elif benchmark == "scanrefer":
        report = evaluate_scanrefer(records, box_source=box_source)
    else:
        raise ValueError(f"unknown benchmark {benchmark!r} (one of {', '.join(BENCHMARKS)})")
    report["dataset"] = benchmark
    report["referrals"] = len(records)
    report["scenes"] = len({r["scan_id"] for r in records})
    report["random_pick_accuracy"] = (float(np.mean([1.0 / max(n, 1) for n in object_counts]))
                                      if object_counts is not None and records else None)
    return report


def evaluate_grounding(model, paths, benchmark: str, voxel_size: float, device, *,
                       proposals_path: str | os.PathLike | None = None, batch_size: int = 4,
                       max_scenes: int | None = None, referral_chunk: int = 64, precision: str = "fp32",
                       num_workers: int = 0, progress: bool = True) -> tuple[dict, list[dict]]:
    """Predict every referral at `paths` and score them with `benchmark`'s metrics.

    Returns the report and the records (one per referral, in store order). With ground-truth boxes
    the report holds the grounding diagnostics (`report["grounding_diagnostics"]`: class and
    within-class accuracy against the class prior, by relation and same-class count)."""
    if benchmark not in BENCHMARKS:
        raise ValueError(f"unknown benchmark {benchmark!r} (one of {', '.join(BENCHMARKS)})")
    proposals = None
    if proposals_path is not None:
        if benchmark != "scanrefer":
            raise ValueError(f"detector proposals are scored with ScanRefer's Acc@k, not {benchmark}")
        try:
            proposals = load_proposal_boxes(proposals_path)
        except (OSError, ValueError) as e:
            raise ProposalError(f"cannot read the proposal file {proposals_path}: {e}") from None
        store = SceneStore(paths)
        count = len(store) if max_scenes is None else min(max_scenes, len(store))
        check_proposals(proposals, store.scene_ids()[:count], proposals_path)
    predictions = predict_referrals(model, paths, voxel_size, device, batch_size, max_scenes, proposals=proposals,
                                    referral_chunk=referral_chunk, precision=precision, num_workers=num_workers,
                                    progress=progress)
    store = SceneStore(paths)
    records, object_counts = grounding_records(store, predictions, proposals)
    box_source = "ground_truth" if proposals_path is None else f"proposals from {proposals_path}"
    report = benchmark_report(records, benchmark, box_source, object_counts if proposals is None else None)
    if proposals is None and records:
        diagnostics = grounding_diagnostics(diagnostic_records(store, predictions))
        report["class_prior"] = diagnostics["class_prior"]
        report["grounding_diagnostics"] = diagnostics
    report["voxel_size"] = voxel_size
    report["data"] = [str(p) for p in (paths if isinstance(paths, (list, tuple)) else [paths])]
    return report, records


def save_predictions(records: Sequence[dict], path: str | os.PathLike) -> None:
    """One JSON line per referral: scan, text index, target, prediction, distractors, utterance, the
    text's source and item id (atomic write)."""
    keys = ("scan_id", "text_index", "target_id", "predicted_id", "num_distractors", "utterance", "source",
            "item_id")
    lines = [json.dumps({k: r.get(k) for k in keys}, ensure_ascii=False) for r in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


__all__ = ["BENCHMARKS", "ProposalError", "ReferralPrediction", "assign_points_to_boxes", "benchmark_report",
           "check_proposals", "diagnostic_records", "evaluate_grounding", "grounding_logits", "grounding_records", "predict_referrals",
           "proposal_objects", "save_predictions"]
