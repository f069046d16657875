"""Voxelization and collation against straightforward reference implementations (np.unique of the
voxel keys with bincount means; per-scene concatenation), voxel for voxel and bit for bit."""
from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from sparsegps.data import ScenesDataset, TransformConfig, collate_scenes, move_batch, write_scenes
from sparsegps.data.scene import NO_INSTANCE
from sparsegps.data.sharing import _array_from_tensor, _reduce_array, share_arrays_from_workers
from sparsegps.data.transforms import ColorJitter, GridSample, RandomJitter, scene_to_sample, standard_normal
from sparsegps.data.voxelize import voxelize

from helpers import VOCAB, make_scene


def reference_grid_sample(xyz, rgb, instance, semantic, voxel_size):
    """GridSample as first written: sort-based np.unique of 21-bit-per-axis keys, bincount means."""
    origin = xyz.min(axis=0)
    grid = np.floor((xyz - origin) / voxel_size).astype(np.int64)
    keys = (grid[:, 0] << 42) | (grid[:, 1] << 21) | grid[:, 2]
    _, first, inverse, counts = np.unique(keys, return_index=True, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    values = np.concatenate([xyz, rgb], axis=1)
    means = np.stack([np.bincount(inverse, weights=values[:, c], minlength=len(first)) for c in range(6)],
                     axis=1) / counts[:, None]
    return {"coord": grid[first].astype(np.int32), "voxel_xyz": means[:, :3].astype(np.float32),
            "voxel_rgb": means[:, 3:].astype(np.float32), "voxel_instance": instance[first],
            "voxel_semantic": semantic[first], "inverse": inverse.astype(np.int64)}


def _room(rng, n):
    """Points on a room's surfaces (many voxels with one point, some with many) plus a dense blob."""
    xyz = rng.uniform([0, 0, 0], [6, 5, 3], (n, 3))
    face = rng.integers(0, 3, n)
    xyz[np.arange(n), face] = np.round(xyz[np.arange(n), face])
    xyz[: n // 10] = rng.normal([1, 1, 1], 0.01, (n // 10, 3))
    return (xyz - 2).astype(np.float32)


@pytest.mark.parametrize("voxel_size", [0.02, 0.05, 0.3])
def test_grid_sample_matches_reference_voxel_for_voxel(voxel_size):
    rng = np.random.default_rng(3)
    n = 20_000
    xyz = _room(rng, n)
    rgb = rng.integers(0, 256, (n, 3), dtype=np.uint8)
    instance = rng.integers(-1, 30, n).astype(np.int32)
    semantic = rng.integers(-1, 5, n).astype(np.int16)
    sample = {"scene_id": "room", "xyz": xyz, "rgb": rgb, "instance": instance, "semantic": semantic}
    got = GridSample(voxel_size)(dict(sample))
    want = reference_grid_sample(xyz, rgb, instance, semantic, voxel_size)
    assert (np.bincount(got["inverse"]) > 1).any() and (np.bincount(got["inverse"]) == 1).any()
    for key, value in want.items():
        assert got[key].dtype == value.dtype and got[key].shape == value.shape, key
        assert np.array_equal(got[key], value), key  # bit for bit, means included


def test_voxelize_wide_grid_takes_the_argsort_path_with_the_same_answer():
    rng = np.random.default_rng(0)
    xyz = np.concatenate([rng.uniform(0, 1, (3000, 3)), [[20_000.0, 20_000.0, 20_000.0]]]).astype(np.float32)
    voxels = voxelize(xyz, 0.01)  # 2e6 cells per axis: the packed key would not fit in 63 bits
    want = reference_grid_sample(xyz, np.zeros((len(xyz), 3), np.uint8), np.zeros(len(xyz), np.int32),
                                 np.zeros(len(xyz), np.int16), 0.01)
    assert np.array_equal(voxels.coord, want["coord"]) and np.array_equal(voxels.inverse, want["inverse"])
    with pytest.raises(ValueError, match="extent too large"):
        voxelize(np.array([[0, 0, 0], [1e5, 0, 0]], np.float32), 0.01, scene_id="far")


def test_standard_normal_is_normal_and_deterministic():
    a = standard_normal(np.random.default_rng([1, 2, 3]), (100_001,))
    b = standard_normal(np.random.default_rng([1, 2, 3]), (100_001,))
    assert a.dtype == np.float32 and np.array_equal(a, b)
    assert abs(a.mean()) < 0.02 and abs(a.std() - 1) < 0.02
    # the share within one and two sigma, as for a Gaussian
    assert abs((np.abs(a) < 1).mean() - 0.6827) < 0.01 and abs((np.abs(a) < 2).mean() - 0.9545) < 0.01


def test_jitters_keep_dtypes_bounds_and_do_not_touch_their_input():
    rng = np.random.default_rng(0)
    scene = make_scene(rng, "s", n_points=5000)
    sample = scene_to_sample(scene)
    xyz, rgb = scene.xyz.copy(), scene.rgb.copy()
    out = ColorJitter()(RandomJitter(0.005, 0.02)(sample, rng), rng)
    assert out["xyz"].dtype == np.float32 and out["rgb"].dtype == np.uint8
    assert np.abs(out["xyz"] - xyz).max() <= 0.02 + 1e-6 and 0 < np.abs(out["xyz"] - xyz).mean() < 0.01
    assert np.array_equal(scene.xyz, xyz) and np.array_equal(scene.rgb, rgb)


def reference_collate(samples):
    """collate_scenes as first written: per-scene arrays concatenated."""
    coords, feats, voxel_object = [], [], []
    object_offsets = [0]
    for b, s in enumerate(samples):
        xyz = s["voxel_xyz"]
        centre = (xyz.min(axis=0) + xyz.max(axis=0)) / 2
        coords.append(np.concatenate([np.full((len(xyz), 1), b, np.int32), s["coord"]], axis=1))
        feats.append(np.concatenate([s["voxel_rgb"] / 127.5 - 1.0, xyz - centre], axis=1).astype(np.float32))
        index = {o.instance_id: object_offsets[-1] + k for k, o in enumerate(s["objects"])}
        voxel_object.append(np.array([index.get(int(i), -1) if i != NO_INSTANCE else -1
                                      for i in s["voxel_instance"]], np.int64))
        object_offsets.append(object_offsets[-1] + len(s["objects"]))
    return np.concatenate(coords), np.concatenate(feats), np.concatenate(voxel_object)


def test_collate_matches_reference(tmp_path):
    rng = np.random.default_rng(1)
    scenes = [make_scene(rng, f"s{i}", n_points=3000, n_objects=4) for i in range(3)]
    write_scenes(scenes, tmp_path, vocabulary=VOCAB, progress=False)
    ds = ScenesDataset(tmp_path, TransformConfig(voxel_size=0.05), seed=0)
    samples = [ds[i] for i in range(3)]
    samples[1]["objects"] = samples[1]["objects"][1:]  # a voxel instance that is not an object -> -1
    samples[1]["object_label_id"] = samples[1]["object_label_id"][1:]
    batch = collate_scenes(samples)
    coords, feats, voxel_object = reference_collate(samples)
    assert torch.equal(batch["coords"], torch.from_numpy(coords))
    assert torch.equal(batch["feats"], torch.from_numpy(feats))
    assert torch.equal(batch["voxel_object"], torch.from_numpy(voxel_object))
    assert (batch["voxel_object"] == -1).any()


def test_samples_from_workers_arrive_as_numpy_arrays_in_shared_memory(tmp_path):
    rng = np.random.default_rng(2)
    scenes = [make_scene(rng, f"s{i}", n_points=20_000) for i in range(4)]
    write_scenes(scenes, tmp_path, vocabulary=VOCAB, progress=False)
    ds = ScenesDataset(tmp_path, TransformConfig(voxel_size=0.05, augment=False))
    loader = torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2, collate_fn=_as_is)
    seen = []
    for sample in loader:
        scene = scenes[sample["index"]]
        assert isinstance(sample["xyz"], np.ndarray) and np.array_equal(sample["xyz"], scene.xyz)
        here = ds[sample["index"]]
        for key in ("inverse", "voxel_xyz", "voxel_semantic", "coord"):
            assert np.array_equal(sample[key], here[key]) and sample[key].dtype == here[key].dtype
        sample["xyz"] += 1  # writable
        seen.append(sample["index"])
    assert sorted(seen) == [0, 1, 2, 3]
    big, small = np.arange(100_000), np.arange(10)
    assert _reduce_array(big)[0] is _array_from_tensor and isinstance(_reduce_array(big)[1][0], torch.Tensor)
    assert _reduce_array(small)[0] is not _array_from_tensor
    assert _reduce_array(np.array(["a", "b"] * 10_000))[0] is not _array_from_tensor
    assert not share_arrays_from_workers()  # not in a worker: ordinary pickling is untouched
    assert not isinstance(pickle.loads(pickle.dumps(big)).base, torch.Tensor)


def _as_is(item):
    return item


def _batches_equal(a: dict, b: dict) -> None:
    assert list(a) == list(b)
    for key in a:
        if isinstance(a[key], torch.Tensor):
            assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key].to(a[key].device)), key
        elif key in ("inverse", "point_semantic"):
            assert all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(a[key], b[key])), key
        else:
            assert a[key] == b[key], key


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_voxelizing_on_the_device_gives_the_worker_batch_bit_for_bit(tmp_path, device):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    rng = np.random.default_rng(5)
    scenes = [make_scene(rng, f"s{i}", n_points=int(rng.integers(2000, 6000)), n_objects=4) for i in range(3)]
    write_scenes(scenes, tmp_path, vocabulary=VOCAB, progress=False)
    for voxel_size in (0.02, 0.1):
        worker = ScenesDataset(tmp_path, TransformConfig(voxel_size=voxel_size, max_referrals=1), seed=3)
        on_device = ScenesDataset(tmp_path, TransformConfig(voxel_size=voxel_size, max_referrals=1,
                                                            voxelize_on="device"), seed=3)
        want = move_batch(collate_scenes([worker[i] for i in range(3)]), device)
        points = collate_scenes([on_device[i] for i in range(3)])
        assert "coords" not in points and points["point_xyz"].shape[0] == sum(s.num_points for s in scenes)
        got = move_batch(points, device)
        assert (got["voxel_object"] >= 0).any() and (got["voxel_object"] == -1).any()
        _batches_equal(want, got)
    with pytest.raises(ValueError, match="max_voxels"):
        ScenesDataset(tmp_path, TransformConfig(voxelize_on="device", max_voxels=100))
