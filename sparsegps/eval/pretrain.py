"""Held-out evaluation of pre-training: referral grounding accuracy against its chance level, and
scene-text and object-text retrieval recall@1.

- grounding_acc: argmax of the grounding head over a scene's objects equals the referral's target;
  grounding_chance: mean over referrals of 1 / (objects in the scene); grounding_class_prior: mean
  of 1 / (objects of the target's class), the score of naming the class and guessing within it;
  grounding_class_accuracy and grounding_within_class_accuracy split accuracy into recognising
  the class and choosing within it (`grounding_diagnostics`, which also breaks them down by
  relation and same-class count: `result["grounding_diagnostics"]`).
- scene_text_r1: each scene caption retrieves its scene among all evaluated scenes (cosine in the
  contrastive space); scene_text_chance = 1 / scenes.
- object_text_r1: each object caption retrieves its object among the objects of its scene.

On several ranks the held-out scenes are dealt out evenly (`even_shard`): every rank runs the same
number of batches (the model's forward issues collectives, and under ZeRO-3 every rank must take
part in each module call), repeated fill-in scenes are run but not counted, and the counts and
embeddings are reduced over ranks, so each scene counts once and N ranks give the one-process
result.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from sparsegps.data import ScenesDataset, TransformConfig, collate_scenes, move_batch
from sparsegps.distributed import all_reduce_sum, even_shard, gather_objects, gather_rows, rank, world_size

from .grounding_diagnostics import grounding_diagnostics


def _eval_transforms(cfg: TransformConfig) -> TransformConfig:
    return TransformConfig(voxel_size=cfg.voxel_size, augment=False, max_voxels=cfg.max_voxels)


class _Counted(torch.utils.data.Dataset):
    """The shard's items, each with its `counted` flag (False on fill-in repeats)."""

    def __init__(self, dataset, indices: list[int], counted: list[bool]):
        self.dataset, self.indices, self.counted = dataset, indices, counted

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[self.indices[i]], "counted": self.counted[i]}


def _collate(samples: list[dict]) -> dict:
    batch = collate_scenes(samples)
    batch["counted"] = torch.tensor([s["counted"] for s in samples], dtype=torch.bool)
    return batch


@torch.no_grad()
def evaluate_pretraining(model, paths, transforms: TransformConfig, device, precision: str = "fp32",
                         batch_size: int = 8, max_scenes: int | None = None, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    # labels index the classes the model was trained on (held-out classes are ignored by its losses)
    dataset = ScenesDataset(paths, _eval_transforms(transforms), classes=list(model.cfg.class_names) or None)
    n = len(dataset) if max_scenes is None else min(max_scenes, len(dataset))
    indices, counted = even_shard(n, rank(), world_size())
    loader = torch.utils.data.DataLoader(_Counted(dataset, indices, counted), batch_size=batch_size,
                                         collate_fn=_collate, num_workers=0)
    # object captions retrieved, object captions
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    scene_emb, caption_emb, records = [], [], []
    for batch in tqdm(loader, desc="evaluate", unit="batch", disable=not progress):
        batch = move_batch(batch, device)
        keep = batch["counted"]
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(batch)
            records += grounding_records(batch, out)
            if "caption_scene" in out:
                rows = keep[out["caption_scene"]]
                scene_emb.append(F.normalize(out["scene_embedding"][rows].float(), dim=-1))
                caption_emb.append(F.normalize(out["caption_embedding"][rows].float(), dim=-1))
            hits, total = _object_caption_hits(model, batch, out["objects"], device)
            counts[0] += hits
            counts[1] += total
    counts = all_reduce_sum(counts)
    report = grounding_diagnostics(gather_objects(records))
    nan = float("nan")
    result = {"grounding_acc": report["accuracy"] if report["referrals"] else nan,
              "grounding_chance": report["chance"] if report["referrals"] else nan,
              "grounding_class_prior": report["class_prior"] if report["referrals"] else nan,
              "grounding_class_accuracy": report["class_accuracy"] if report["referrals"] else nan,
              "grounding_within_class_accuracy": report["within_class_accuracy"] if report["referrals"] else nan,
              "grounding_referrals": report["referrals"],
              "object_text_r1": float(counts[0] / counts[1]) if counts[1] else nan}
    empty = torch.zeros(0, model.cfg.embed_dim, device=device)
    scenes, _ = gather_rows(torch.cat(scene_emb) if scene_emb else empty)
    captions, _ = gather_rows(torch.cat(caption_emb) if caption_emb else empty)
    if len(scenes):
        hits = (captions @ scenes.T).argmax(dim=1) == torch.arange(len(scenes), device=device)
        result.update(scene_text_r1=float(hits.float().mean()), scene_text_chance=1.0 / len(scenes))
    result["eval_scenes"] = n
    result["grounding_diagnostics"] = report
    model.train(was_training)
    return result


def grounding_records(batch: dict, out: dict) -> list[dict]:
    """One diagnostics record per counted referral of a batch (see `grounding_diagnostics`): the
    model's scores over its scene's objects, the target, the objects' classes and boxes, the
    referral's relation, shape, source and words."""
    referrals = [t for t in batch["texts"] if t["kind"] == "referral" and t["target"] >= 0]
    logits = out["grounding_logits"].float().cpu().numpy()
    offsets = batch["object_offsets"].tolist()
    boxes = torch.cat([batch["object_center"], batch["object_size"]], dim=1).cpu().numpy()
    keep = batch["counted"].tolist() if "counted" in batch else [True] * batch["batch_size"]
    records = []
    for row, t in zip(logits, referrals):
        if not keep[t["scene"]]:
            continue
        lo, hi = offsets[t["scene"]], offsets[t["scene"] + 1]
        records.append({"scores": row[:hi - lo], "target": t["target"] - lo, "classes": batch["object_names"][lo:hi],
                        "boxes": boxes[lo:hi], "relation": t.get("relation", ""), "shape": t.get("shape", ""),
                        "source": t.get("source", ""), "utterance": t["text"]})
    return records


def _object_caption_hits(model, batch: dict, objects: dict, device) -> tuple[int, int]:
    """How many of the counted scenes' object captions pick their own object among their scene's
    objects. The text encoder and projections run even without captions (one placeholder), so
    every rank makes the same module calls."""
    keep = batch["counted"].tolist()
    captions = [t for t in batch["texts"] if t["kind"] == "object_caption" and t["target"] >= 0 and keep[t["scene"]]]
    obj = F.normalize(model.object_proj(objects["tokens"][~objects["pad"]]).float(), dim=-1)
    feats = model.encode_text([t["text"] for t in captions] or [""], device)["sentence"]
    cap = F.normalize(model.text_proj(feats).float(), dim=-1)
    offsets = batch["object_offsets"].tolist()
    hits = 0
    for row, t in enumerate(captions):
        lo, hi = offsets[t["scene"]], offsets[t["scene"] + 1]
        hits += int(lo + int((obj[lo:hi] @ cap[row]).argmax()) == t["target"])
    return hits, len(captions)
