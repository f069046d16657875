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
                                     distractors (global object indices), source, shape, relation
    scene_ids       list[str], indices list[int]
    skipped         list[tuple]      damaged scenes the dataset passed over (file, scene, reason)
    inverse         list[int64 array] per scene: voxel (scene-local) of every original point
    point_semantic  list[int16 array] per scene: original per-point labels
"""
from __future__ import annotations

import numpy as np
import torch

from .scene import NO_INSTANCE


# Instance ids below this are mapped through a lookup table, larger ones by binary search.
_MAX_TABLE_ID = 1 << 20


def _object_index(voxel_instance: np.ndarray, objects: list, first_object: int) -> np.ndarray:
    """Batch-global object index of every voxel (-1 where its instance is not an object)."""
    if not objects:
        return np.full(len(voxel_instance), -1, np.int64)
    ids = np.array([o.instance_id for o in objects], np.int64)
    if ids.max() < _MAX_TABLE_ID:
        # table[id] = object index; the last entry (-1) serves NO_INSTANCE (-1) and unknown ids
        table = np.full(int(ids.max()) + 2, -1, np.int64)
        table[ids] = first_object + np.arange(len(ids))
        index = np.asarray(voxel_instance, np.int64)
        index = np.where((index >= 0) & (index <= ids.max()), index, -1)
        return np.take(table, index)
    out = np.full(len(voxel_instance), -1, np.int64)
    order = np.argsort(ids)
    pos = np.clip(np.searchsorted(ids[order], voxel_instance), 0, len(ids) - 1)
    hit = (ids[order][pos] == voxel_instance) & (voxel_instance != NO_INSTANCE)
    out[hit] = first_object + order[pos[hit]]
    return out


def _centre(xyz: np.ndarray) -> np.ndarray:
    """Centre of the bounding box of [V, 3] points (reduced column by column: several times faster
    than numpy's reduction along the first axis of an [N, 3] array)."""
    cols = np.ascontiguousarray(xyz.T)
    return (cols.min(axis=1) + cols.max(axis=1)) / 2


def _objects_and_texts(samples: list[dict], object_offsets: np.ndarray) -> dict:
    """The per-object and per-text fields of a batch; object centres still in each scene's frame."""
    total = int(object_offsets[-1])
    centers, sizes = np.empty((total, 3), np.float32), np.empty((total, 3), np.float32)
    names, instances, labels, texts = [], [], [], []
    for b, s in enumerate(samples):
        first_object = int(object_offsets[b])
        local = {}
        for k, o in enumerate(s["objects"]):
            local[o.instance_id] = first_object + k
            centers[first_object + k] = o.center
            sizes[first_object + k] = o.size
            names.append(o.label)
            instances.append(o.instance_id)
        labels.append(s["object_label_id"])
        for t in s["texts"]:
            texts.append({"kind": t.kind, "text": t.text, "scene": b,
                          "target": local.get(t.target_id, -1),
                          "distractors": [local[d] for d in t.distractor_ids if d in local],
                          "source": t.source, "shape": t.shape, "relation": t.relation})
    return {
        "object_offsets": torch.from_numpy(object_offsets),
        "object_center": torch.from_numpy(centers),
        "object_size": torch.from_numpy(sizes),
        "object_label": torch.from_numpy(np.concatenate(labels).astype(np.int64)) if labels
        else torch.zeros(0, dtype=torch.int64),
        "object_names": names,
        "object_instance": torch.tensor(instances, dtype=torch.int64),
        "texts": texts,
    }


def _batch_array(shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, np.ndarray]:
    """An uninitialised batch tensor and a numpy view of it. Inside a DataLoader worker the tensor
    lives in shared memory from the start (as torch's default collate does), so sending the batch
    to the main process copies nothing."""
    if torch.utils.data.get_worker_info() is None:
        tensor = torch.empty(shape, dtype=dtype)
    else:
        itemsize = torch.empty(0, dtype=dtype).element_size()
        storage = torch.UntypedStorage._new_shared(int(np.prod(shape)) * itemsize)
        tensor = torch.empty(0, dtype=dtype).set_(storage, 0, shape)
    return tensor, tensor.numpy()


def _offsets(counts: list[int]) -> np.ndarray:
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


def collate_scenes(samples: list[dict]) -> dict:
    """One batch from voxelized samples: the per-voxel arrays of every scene are written into
    preallocated batch arrays (no per-scene intermediate copies).

    Samples left unvoxelized (`TransformConfig.voxelize_on: device`) give a batch of points that
    `move_batch` voxelizes on its device into the same batch."""
    if samples and samples[0].get("voxelize_on_device"):
        return _collate_points(samples)
    voxel_offsets = _offsets([len(s["voxel_xyz"]) for s in samples])
    object_offsets = _offsets([len(s["objects"]) for s in samples])
    total = int(voxel_offsets[-1])
    coords_t, coords = _batch_array((total, 4), torch.int32)
    feats_t, feats = _batch_array((total, 6), torch.float32)
    voxel_object_t, voxel_object = _batch_array((total,), torch.int64)
    voxel_semantic_t, voxel_semantic = _batch_array((total,), torch.int64)
    objects = _objects_and_texts(samples, object_offsets)
    centers = objects["object_center"].numpy()
    for b, s in enumerate(samples):
        v0, v1 = int(voxel_offsets[b]), int(voxel_offsets[b + 1])
        o0, o1 = int(object_offsets[b]), int(object_offsets[b + 1])
        xyz = s["voxel_xyz"]
        centre = (_centre(xyz) if len(xyz) else np.zeros(3)).astype(np.float32)
        coords[v0:v1, 0] = b
        coords[v0:v1, 1:] = s["coord"]
        # computed contiguous, then copied into the interleaved columns: numpy's arithmetic into
        # strided outputs is several times slower
        rgb = s["voxel_rgb"] / np.float32(127.5)
        rgb -= 1.0
        feats[v0:v1, :3] = rgb
        feats[v0:v1, 3:] = xyz - centre
        voxel_object[v0:v1] = _object_index(s["voxel_instance"], s["objects"], o0)
        voxel_semantic[v0:v1] = s["voxel_semantic"]
        centers[o0:o1] -= centre

    return {
        "coords": coords_t,
        "feats": feats_t,
        "spatial_shape": (coords_t[:, 1:].amax(dim=0) + 1).tolist() if total else [1, 1, 1],
        "batch_size": len(samples),
        "voxel_offsets": torch.from_numpy(voxel_offsets),
        "voxel_object": voxel_object_t,
        "voxel_semantic": voxel_semantic_t,
        **objects,
        "scene_ids": [s["scene_id"] for s in samples],
        "indices": [s.get("index", -1) for s in samples],
        "skipped": [skip for s in samples for skip in s.get("skipped", ())],
        "inverse": [s["inverse"] for s in samples],
        "point_semantic": [s["semantic"] for s in samples],
    }


# Keys of a batch of points (voxelized on the device by `move_batch`), beyond the object and text keys.
_POINT_KEYS = ("point_xyz", "point_rgb", "point_instance", "point_semantic_all", "point_offsets")


def _collate_points(samples: list[dict]) -> dict:
    """A batch of augmented points, for `voxelize_batch` on the training device."""
    cat = (lambda key: torch.from_numpy(np.ascontiguousarray(np.concatenate([s[key] for s in samples]))))
    return {
        "voxelize_on_device": True,
        "voxel_size": samples[0]["voxel_size"],
        "batch_size": len(samples),
        "point_xyz": cat("xyz"), "point_rgb": cat("rgb"), "point_instance": cat("instance"),
        "point_semantic_all": cat("semantic"),
        "point_offsets": torch.from_numpy(_offsets([len(s["xyz"]) for s in samples])),
        **_objects_and_texts(samples, _offsets([len(s["objects"]) for s in samples])),
        "scene_ids": [s["scene_id"] for s in samples],
        "indices": [s.get("index", -1) for s in samples],
        "skipped": [skip for s in samples for skip in s.get("skipped", ())],
        "point_semantic": [s["semantic"] for s in samples],
    }


def _object_index_torch(voxel_instance: torch.Tensor, ids: torch.Tensor, first_object: int) -> torch.Tensor:
    """`_object_index` in torch, on the voxels' device."""
    out = torch.full_like(voxel_instance, -1, dtype=torch.int64)
    if len(ids) == 0:
        return out
    sorted_ids, order = torch.sort(ids)
    pos = torch.searchsorted(sorted_ids, voxel_instance.to(torch.int64)).clamp_(max=len(ids) - 1)
    hit = (sorted_ids[pos] == voxel_instance) & (voxel_instance != NO_INSTANCE)
    return torch.where(hit, first_object + order[pos], out)


def voxelize_batch(batch: dict) -> dict:
    """Grid-sample a batch of points (from `voxelize_on: device`) where its tensors are, into the
    batch `collate_scenes` makes from samples voxelized in the workers: same keys, same values."""
    from .voxelize import voxel_means_torch, voxelize_torch

    device = batch["point_xyz"].device
    offsets = batch["point_offsets"].tolist()
    object_offsets = batch["object_offsets"].tolist()
    coords, feats, voxel_object, voxel_semantic, inverses, centres = [], [], [], [], [], []
    for b in range(batch["batch_size"]):
        p0, p1 = offsets[b], offsets[b + 1]
        xyz = batch["point_xyz"][p0:p1]
        coord, first, inverse, counts = voxelize_torch(xyz, batch["voxel_size"], scene_id=batch["scene_ids"][b])
        voxel_xyz = voxel_means_torch(xyz, inverse, counts)
        voxel_rgb = voxel_means_torch(batch["point_rgb"][p0:p1], inverse, counts)
        centre = (voxel_xyz.amin(dim=0) + voxel_xyz.amax(dim=0)) / 2
        coords.append(torch.cat([torch.full((len(coord), 1), b, dtype=torch.int32, device=device), coord], 1))
        rgb = voxel_rgb / torch.full_like(voxel_rgb[:1], 127.5) - 1.0
        feats.append(torch.cat([rgb, voxel_xyz - centre], 1))
        ids = batch["object_instance"][object_offsets[b]:object_offsets[b + 1]].to(device)
        voxel_object.append(_object_index_torch(batch["point_instance"][p0:p1][first], ids, object_offsets[b]))
        voxel_semantic.append(batch["point_semantic_all"][p0:p1][first].to(torch.int64))
        inverses.append(inverse)
        centres.append(centre.expand(object_offsets[b + 1] - object_offsets[b], 3))
    coords_t = torch.cat(coords)
    out = {k: v for k, v in batch.items() if k not in _POINT_KEYS + ("voxelize_on_device", "voxel_size")}
    out.update({
        "coords": coords_t,
        "feats": torch.cat(feats),
        "spatial_shape": (coords_t[:, 1:].amax(dim=0) + 1).tolist(),
        "voxel_offsets": torch.tensor(np.cumsum([0] + [len(c) for c in coords]), dtype=torch.int64, device=device),
        "voxel_object": torch.cat(voxel_object),
        "voxel_semantic": torch.cat(voxel_semantic),
        "object_center": batch["object_center"] - torch.cat(centres).to(batch["object_center"].device),
        "inverse": [inverse.cpu().numpy() for inverse in inverses],
    })
    order = ["coords", "feats", "spatial_shape", "batch_size", "voxel_offsets", "voxel_object", "voxel_semantic",
             "object_offsets", "object_center", "object_size", "object_label", "object_names", "object_instance",
             "texts", "scene_ids", "indices", "skipped", "inverse", "point_semantic"]
    return {k: out[k] for k in order}


def move_batch(batch: dict, device: torch.device | str) -> dict:
    """The batch with every tensor on `device` (non-blocking where pinned); a batch of points
    (`voxelize_on: device`) is voxelized there."""
    moved = {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    return voxelize_batch(moved) if moved.get("voxelize_on_device") else moved
