"""`collate_scenes`: voxelized samples -> one batch for the model.

The batch is a dict:

    coords          int32   [V, 4]   (batch, x, y, z), ready for spconv.SparseConvTensor
    feats           float32 [V, 6]   rgb in [-1, 1], voxel centre in metres relative to its scene's centre
    spatial_shape   list[int] (3)    grid extent covering every scene of the batch
    batch_size      int
    voxel_offsets   int64   [B+1]    scene b owns voxels voxel_offsets[b]:voxel_offsets[b+1]
    voxel_object    int64   [V]      batch-global object index of each voxel, -1 for none
    voxel_semantic  int64   [V]      semantic label, -1 ignore
    object_offsets  int64   [B+1]    scene b owns objects object_offsets[b]:object_offsets[b+1]
    object_center   float32 [O, 3]   box centres, same frame as feats
    object_size     float32 [O, 3]
    object_label    int64   [O]      index into the store's vocabulary (-1 unknown)
    object_names    list[str] (O)    class names
    object_instance int64   [O]      instance id within its scene
    texts           list[dict]       kind, text, scene (b), target (global object index or -1),
                                     distractors (global object indices)
    scene_ids       list[str], indices list[int]
    inverse         list[int64 array] per scene: voxel (scene-local) of every original point
    point_semantic  list[int16 array] per scene: original per-point labels
"""
from __future__ import annotations

import numpy as np
import torch

from .scene import NO_INSTANCE


def _object_index(voxel_instance: np.ndarray, objects: list, first_object: int) -> np.ndarray:
    """Batch-global object index of every voxel (-1 where its instance is not an object)."""
    out = np.full(len(voxel_instance), -1, np.int64)
    if not objects:
        return out
    ids = np.array([o.instance_id for o in objects], np.int64)
    order = np.argsort(ids)
    pos = np.clip(np.searchsorted(ids[order], voxel_instance), 0, len(ids) - 1)
    hit = (ids[order][pos] == voxel_instance) & (voxel_instance != NO_INSTANCE)
    out[hit] = first_object + order[pos[hit]]
    return out


def collate_scenes(samples: list[dict]) -> dict:
    coords, feats, voxel_object, voxel_semantic = [], [], [], []
    centers, sizes, labels, names, instances, texts = [], [], [], [], [], []
    voxel_offsets, object_offsets = [0], [0]
    for b, s in enumerate(samples):
        xyz = s["voxel_xyz"]
        centre = (xyz.min(axis=0) + xyz.max(axis=0)) / 2
        coords.append(np.concatenate([np.full((len(xyz), 1), b, np.int32), s["coord"]], axis=1))
        feats.append(np.concatenate([s["voxel_rgb"] / 127.5 - 1.0, xyz - centre], axis=1).astype(np.float32))
        first_object = object_offsets[-1]
        local = {o.instance_id: first_object + k for k, o in enumerate(s["objects"])}
        voxel_object.append(_object_index(s["voxel_instance"], s["objects"], first_object))
        voxel_semantic.append(s["voxel_semantic"].astype(np.int64))
        for o in s["objects"]:
            centers.append(o.center - centre)
            sizes.append(o.size)
            names.append(o.label)
            instances.append(o.instance_id)
        labels.append(s["object_label_id"])
        for t in s["texts"]:
            texts.append({"kind": t.kind, "text": t.text, "scene": b,
                          "target": local.get(t.target_id, -1),
                          "distractors": [local[d] for d in t.distractor_ids if d in local]})
        voxel_offsets.append(voxel_offsets[-1] + len(xyz))
        object_offsets.append(first_object + len(s["objects"]))

    coords_t = torch.from_numpy(np.concatenate(coords))
    return {
        "coords": coords_t,
        "feats": torch.from_numpy(np.concatenate(feats)),
        "spatial_shape": (coords_t[:, 1:].max(dim=0).values + 1).tolist(),
        "batch_size": len(samples),
        "voxel_offsets": torch.tensor(voxel_offsets, dtype=torch.int64),
        "voxel_object": torch.from_numpy(np.concatenate(voxel_object)),
        "voxel_semantic": torch.from_numpy(np.concatenate(voxel_semantic)),
        "object_offsets": torch.tensor(object_offsets, dtype=torch.int64),
        "object_center": torch.tensor(np.array(centers, np.float32).reshape(-1, 3)),
        "object_size": torch.tensor(np.array(sizes, np.float32).reshape(-1, 3)),
        "object_label": torch.from_numpy(np.concatenate(labels)) if labels else torch.zeros(0, dtype=torch.int64),
        "object_names": names,
        "object_instance": torch.tensor(instances, dtype=torch.int64),
        "texts": texts,
        "scene_ids": [s["scene_id"] for s in samples],
        "indices": [s.get("index", -1) for s in samples],
        "inverse": [s["inverse"] for s in samples],
        "point_semantic": [s["semantic"] for s in samples],
    }


def move_batch(batch: dict, device: torch.device | str) -> dict:
    """The batch with every tensor on `device` (non-blocking where pinned)."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
