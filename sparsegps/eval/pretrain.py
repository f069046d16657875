"""Held-out evaluation of pre-training: referral grounding accuracy against its chance level, and
scene-text and object-text retrieval recall@1.

- grounding_acc: argmax of the grounding head over a scene's objects equals the referral's target;
  grounding_chance: mean over referrals of 1 / (objects in the scene).
- scene_text_r1: each scene caption retrieves its scene among all evaluated scenes (cosine in the
  contrastive space); scene_text_chance = 1 / scenes.
- object_text_r1: each object caption retrieves its object among the objects of its scene.
All ranks take part (ZeRO-3 needs every rank in each forward); counts are summed over ranks.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sparsegps.data import ScenesDataset, TransformConfig, collate_scenes, move_batch
from sparsegps.losses import gather_with_grad


def _eval_transforms(cfg: TransformConfig) -> TransformConfig:
    return TransformConfig(voxel_size=cfg.voxel_size, augment=False, max_voxels=cfg.max_voxels)


@torch.no_grad()
def evaluate_pretraining(model, paths, transforms: TransformConfig, device, precision: str = "fp32",
                         batch_size: int = 8, max_scenes: int | None = None, progress: bool = True) -> dict:
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    dataset = ScenesDataset(paths, _eval_transforms(transforms))
    n = len(dataset) if max_scenes is None else min(max_scenes, len(dataset))
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    indices = list(range(n))[rank::world]
    loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, indices), batch_size=batch_size,
                                         collate_fn=collate_scenes, num_workers=0)
    counts = torch.zeros(5, dtype=torch.float64, device=device)  # correct, referrals, chance, obj correct, obj total
    scene_emb, caption_emb = [], []
    for batch in tqdm(loader, desc="evaluate", unit="batch", disable=not progress):
        batch = move_batch(batch, device)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(batch)
            objects = out["objects"]
            texts = batch["texts"]
            if "grounding_logits" in out:
                logits = out["grounding_logits"].float()
                valid = torch.isfinite(logits).sum(dim=1)
                counts[0] += (logits.argmax(dim=1) == out["grounding_target"]).sum()
                counts[1] += logits.shape[0]
                counts[2] += (1.0 / valid.double()).sum()
            captions = {}
            for t in texts:
                if t["kind"] == "scene_caption":
                    captions.setdefault(t["scene"], t["text"])
            if captions:
                scenes = sorted(captions)
                valid = (~objects["pad"]).unsqueeze(-1).float()
                pooled = (objects["tokens"] * valid).sum(1) / valid.sum(1).clamp(min=1)
                scene_emb.append(F.normalize(model.scene_proj(pooled[scenes]).float(), dim=-1))
                feats = model.encode_text([captions[s] for s in scenes], device)["sentence"]
                caption_emb.append(F.normalize(model.text_proj(feats).float(), dim=-1))
            obj_caps = [t for t in texts if t["kind"] == "object_caption" and t["target"] >= 0]
            if obj_caps:
                flat = objects["tokens"][~objects["pad"]]
                obj = F.normalize(model.object_proj(flat).float(), dim=-1)
                feats = model.encode_text([t["text"] for t in obj_caps], device)["sentence"]
                cap = F.normalize(model.text_proj(feats).float(), dim=-1)
                offsets = batch["object_offsets"]
                for row, t in enumerate(obj_caps):
                    lo, hi = int(offsets[t["scene"]]), int(offsets[t["scene"] + 1])
                    counts[3] += int(lo + (obj[lo:hi] @ cap[row]).argmax() == t["target"])
                    counts[4] += 1
    if dist.is_initialized():
        dist.all_reduce(counts)
    result = {"grounding_acc": float(counts[0] / counts[1]) if counts[1] else float("nan"),
              "grounding_chance": float(counts[2] / counts[1]) if counts[1] else float("nan"),
              "grounding_referrals": int(counts[1]),
              "object_text_r1": float(counts[3] / counts[4]) if counts[4] else float("nan")}
    dim = model.cfg.embed_dim
    scenes = gather_with_grad(torch.cat(scene_emb) if scene_emb else torch.zeros(0, dim, device=device))
    captions = gather_with_grad(torch.cat(caption_emb) if caption_emb else torch.zeros(0, dim, device=device))
    if len(scenes):
        hits = (captions @ scenes.T).argmax(dim=1) == torch.arange(len(scenes), device=device)
        result.update(scene_text_r1=float(hits.float().mean()), scene_text_chance=1.0 / len(scenes))
    result["eval_scenes"] = n
    model.train(was_training)
    return result
