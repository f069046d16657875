"""Batch preparation: the CPU work that turns stored scenes into model input, GPS's way vs sparsegps's.

- GPS (per item, the baseline): load the scene's .pth pair (`torch.load(weights_only=True)`), crop
  every labelled object by its instance mask, keep at most 80 objects, turn the scene by a random
  quarter turn (GPS's `rot_aug`), resample each object to 1024 points (with replacement when it
  has fewer), centre and scale each to the unit sphere; collate pads the [O, 1024, 6] object
  arrays of the batch to one tensor. Per-object Python loops, as GPS.
- GPS (crops cached): GPS's actual training set-up, which crops every scene once at start-up and
  keeps the crops in RAM; per item only rotation, resampling and normalisation remain. Its start-up time is
  reported, not timed per item, and it needs every scan in memory.
- sparsegps: read the scene from HDF5 shards, augment (rotate, scale, jitter, colour jitter),
  grid-sample to voxels, collate to sparse-conv input (`ScenesDataset` + `collate_scenes`).

Voxelization itself is also compared on the same scenes (`details["voxelization_ms_per_scene"]`):
the packed-key sort `GridSample` uses, the `np.unique` sort it replaced, and spconv's hash-based
`PointToVoxel` (where spconv is installed; it yields voxels and a point->voxel map only, no means).

Scenes/s with 0 and 2 DataLoader workers over one shuffled pass; ratios against the per-item GPS
path with the same worker count.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sparsegps.benchmarks.bench_data import read_pth, write_pth
from sparsegps.benchmarks.arguments import add_common_arguments, command_line, main_for, resolve_common
from sparsegps.benchmarks.machine import machine_info
from sparsegps.benchmarks.report import Result, bar_chart, finish, ratio, target
from sparsegps.benchmarks.scenes import SCANNET20, synthetic_scenes
from sparsegps.benchmarks.timing import time_interleaved
from sparsegps.benchmarks.pointnet2_gps import gps_crop_objects, gps_object_points
from sparsegps.data.collate import collate_scenes
from sparsegps.data.dataset import ScenesDataset
from sparsegps.data.store import write_scenes
from sparsegps.data.transforms import TransformConfig, scene_to_sample
from sparsegps.data.voxelize import voxelize

NAME = "batch-prep"
TARGET_VS_GPS = 3.0
GPS_MAX_OBJECTS = 80
GPS_POINTS_PER_OBJECT = 1024


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--scenes", type=int, default=None, help="scenes per pass (default 64; quick 12)")
    parser.add_argument("--points", type=int, default=None, help="points per scene (default 150000; quick 20000)")
    parser.add_argument("--objects", type=int, default=None, help="objects per scene (default 40; quick 10)")
    parser.add_argument("--generator", choices=("auto", "synth", "room"), default="auto",
                        help="scene source: sparsegps.synth's procedural rooms ('auto': when installed, not in "
                             "quick mode) or the benchmark's own random rooms with exactly --points and --objects")
    parser.add_argument("--batch-size", type=int, default=None, help="scenes per batch (default 8; quick 4)")
    parser.add_argument("--voxel-size", type=float, default=0.02, help="sparsegps grid-sample voxel size (m)")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to write the scenes (default: a temporary folder, removed after)")


# ------------------------------------------------------------------------------------ GPS's path

class GPSScenes(torch.utils.data.Dataset):
    """GPS's object inputs per scene. With `cache_crops`, objects are cropped once up front (GPS's
    start-up) and items only resample; otherwise every item loads and crops its scene from disk."""

    def __init__(self, folder: Path, scene_ids: list[str], seed: int, cache_crops: bool):
        self.folder, self.scene_ids, self.seed = folder, scene_ids, seed
        self.crops = [self.crop(self.load(i)) for i in range(len(scene_ids))] if cache_crops else None

    def load(self, index: int) -> tuple:
        return read_pth(self.folder, self.scene_ids[index])

    @staticmethod
    def crop(loaded: tuple) -> list[np.ndarray]:
        (xyz, rgb, _semantic, instance), inst_to_label = loaded
        return gps_crop_objects(xyz, rgb, instance, inst_to_label)

    def sample(self, objects: list[np.ndarray], index: int) -> dict:
        """At most 80 objects, rotated, resampled and normalised, as tensors."""
        rng = np.random.default_rng([self.seed, index])
        if len(objects) > GPS_MAX_OBJECTS:
            keep = rng.permutation(len(objects))[:GPS_MAX_OBJECTS]
            objects = [objects[k] for k in keep]
        points, locations = gps_object_points(objects, GPS_POINTS_PER_OBJECT, rng, rotate=True)
        return {"obj_fts": torch.from_numpy(points), "obj_locs": torch.from_numpy(locations)}

    def __len__(self):
        return len(self.scene_ids)

    def __getitem__(self, index: int) -> dict:
        objects = self.crops[index] if self.crops is not None else self.crop(self.load(index))
        return self.sample(objects, index)


def gps_collate(items: list[dict]) -> dict:
    """Pad the per-scene object arrays of a batch to the batch's largest object count."""
    fts = torch.nn.utils.rnn.pad_sequence([it["obj_fts"] for it in items], batch_first=True)
    locs = torch.nn.utils.rnn.pad_sequence([it["obj_locs"] for it in items], batch_first=True)
    counts = torch.tensor([len(it["obj_fts"]) for it in items])
    masks = torch.arange(fts.shape[1]).unsqueeze(0) < counts.unsqueeze(1)
    return {"obj_fts": fts, "obj_locs": locs, "obj_masks": masks}


def _prepare_all(dataset, order: list[int], batch_size: int, workers: int, collate) -> None:
    """Turn every scene of `dataset`, in `order`, into collated batches through a DataLoader."""
    sampler = torch.utils.data.BatchSampler(order, batch_size, drop_last=False)
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate,
                                         prefetch_factor=2 if workers else None)
    scenes = sum(batch["obj_fts"].shape[0] if "obj_fts" in batch else batch["batch_size"] for batch in loader)
    if scenes != len(order):
        raise RuntimeError(f"prepared {scenes} scenes, expected {len(order)}")


def _batched(order: list[int], batch_size: int):
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def gps_stage_seconds(dataset: GPSScenes, order: list[int], batch_size: int) -> dict[str, float]:
    """Mean seconds per scene of each step of GPS's per-item path (one pass, in this process)."""
    spent = dict.fromkeys(("load .pth", "crop objects", "rotate, resample, normalise", "collate"), 0.0)
    for indices in _batched(order, batch_size):
        items = []
        for index in indices:
            t0 = time.perf_counter()
            loaded = dataset.load(index)
            t1 = time.perf_counter()
            objects = dataset.crop(loaded)
            t2 = time.perf_counter()
            items.append(dataset.sample(objects, index))
            t3 = time.perf_counter()
            spent["load .pth"] += t1 - t0
            spent["crop objects"] += t2 - t1
            spent["rotate, resample, normalise"] += t3 - t2
        t0 = time.perf_counter()
        gps_collate(items)
        spent["collate"] += time.perf_counter() - t0
    return {stage: seconds / len(order) for stage, seconds in spent.items()}


def sparsegps_stage_seconds(dataset: ScenesDataset, order: list[int], batch_size: int) -> dict[str, float]:
    """Mean seconds per scene of each step of sparsegps's path: shard read, each transform, collate."""
    spent = {"read shard": 0.0}
    for step in dataset.transforms.transforms:
        spent[type(step).__name__] = 0.0
    spent["collate"] = 0.0
    for indices in _batched(order, batch_size):
        samples = []
        for index in indices:
            t0 = time.perf_counter()
            scene = dataset.store[index]
            spent["read shard"] += time.perf_counter() - t0
            rng = np.random.default_rng([dataset.seed, dataset.epoch, index])
            sample = scene_to_sample(scene)
            for step in dataset.transforms.transforms:
                t0 = time.perf_counter()
                sample = step(sample, rng)
                spent[type(step).__name__] += time.perf_counter() - t0
            sample["object_label_id"] = np.array([dataset.label_index.get(o.label, -1) for o in sample["objects"]],
                                                 dtype=np.int64)
            samples.append(sample)
        t0 = time.perf_counter()
        collate_scenes(samples)
        spent["collate"] += time.perf_counter() - t0
    return {stage: seconds / len(order) for stage, seconds in spent.items()}


def _stage_note(name: str, stages: dict[str, float]) -> str:
    total = sum(stages.values())
    parts = ", ".join(f"{stage} {1000 * s:.1f} ms ({100 * s / total:.0f}%)" for stage, s in stages.items())
    return f"{name}, per scene (one pass, no workers): {1000 * total:.1f} ms = {parts}"


def _unique_voxelize(xyz: np.ndarray, voxel_size: float):
    """Voxelization as `GridSample` first did it: `np.unique` (a stable sort) of 21-bit-per-axis keys."""
    grid = np.floor((xyz - xyz.min(axis=0)) / voxel_size).astype(np.int64)
    keys = (grid[:, 0] << 42) | (grid[:, 1] << 21) | grid[:, 2]
    return np.unique(keys, return_index=True, return_inverse=True, return_counts=True)


def _spconv_voxelizer(voxel_size: float):
    """spconv's hash-based point-to-voxel op on the CPU (voxels, their coordinates and each point's
    voxel), or None where spconv is not installed."""
    try:
        from spconv.pytorch.utils import PointToVoxel
    except ImportError:
        return None

    def run(xyz: np.ndarray):
        lo, hi = xyz.min(axis=0), xyz.max(axis=0) + voxel_size
        generator = PointToVoxel(vsize_xyz=[voxel_size] * 3, coors_range_xyz=[*lo.tolist(), *hi.tolist()],
                                 num_point_features=3, max_num_voxels=len(xyz), max_num_points_per_voxel=1,
                                 device=torch.device("cpu"))
        return generator.generate_voxel_with_id(torch.from_numpy(xyz))

    return run


def voxelization_ms(scenes: list, voxel_size: float, repeats: int) -> dict[str, float]:
    """Mean milliseconds per scene of each voxelization method, timed in interleaved rounds."""
    methods = {"packed-key sort (GridSample)": lambda xyz: voxelize(xyz, voxel_size),
               "np.unique sort (before)": lambda xyz: _unique_voxelize(xyz, voxel_size)}
    spconv_run = _spconv_voxelizer(voxel_size)
    if spconv_run is not None:
        methods["spconv PointToVoxel (hash)"] = spconv_run
    calls = {name: (lambda m=method: [m(s.xyz) for s in scenes]) for name, method in methods.items()}
    timings = time_interleaved(calls, repeats=repeats, warmup=1)
    return {name: 1000 * t.median / len(scenes) for name, t in timings.items()}


# ------------------------------------------------------------------------------------------- run

def run(args: argparse.Namespace) -> dict:
    resolve_common(args)
    n_scenes = args.scenes or (12 if args.quick else 64)
    points = args.points or (20_000 if args.quick else 150_000)
    objects = args.objects or (10 if args.quick else 40)
    batch_size = args.batch_size or (4 if args.quick else 8)
    machine = machine_info("cpu")
    prefer = args.generator == "synth" or (args.generator == "auto" and not args.quick)
    stream, source = synthetic_scenes(n_scenes, num_objects=objects, num_points=points, seed=args.seed,
                                      prefer_generator=prefer)
    scenes = list(stream)
    result = Result(NAME, command_line(NAME, getattr(args, "argv", None)), dict(vars(args)),
                    baseline="GPS per item (load .pth, crop, resample, normalise), same workers")
    own_rooms = source.startswith("random_room")
    result.config.update(scenes=n_scenes, points=points if own_rooms else None, objects=objects if own_rooms else None,
                         batch_size=batch_size)

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sparsegps-bench-prep-"))
    try:
        (root / "pth" / "pcd").mkdir(parents=True)
        (root / "pth" / "inst_to_label").mkdir(parents=True)
        for scene in scenes:
            write_pth(scene, root / "pth")
        write_scenes(scenes, root / "shards", vocabulary=SCANNET20, source="benchmark", progress=False)
        scene_ids = [s.scene_id for s in scenes]
        result.details["voxelization_ms_per_scene"] = voxelization_ms(scenes[:16], args.voxel_size, args.repeats)
        del scenes
        order = np.random.default_rng(args.seed + 1).permutation(n_scenes).tolist()

        start = time.perf_counter()
        cached = GPSScenes(root / "pth", scene_ids, args.seed, cache_crops=True)
        startup_s = time.perf_counter() - start
        methods = {
            "GPS (per item)": (GPSScenes(root / "pth", scene_ids, args.seed, cache_crops=False), gps_collate),
            "GPS (crops cached)": (cached, gps_collate),
            "sparsegps": (ScenesDataset(root / "shards", TransformConfig(voxel_size=args.voxel_size), seed=args.seed),
                          collate_scenes),
        }
        progress = tqdm(total=len(args.workers), desc="batch-prep", unit="measurement", leave=False)
        rows = []
        for workers in args.workers:
            passes = {name: (lambda d=dataset, c=collate, w=workers: _prepare_all(d, order, batch_size, w, c))
                      for name, (dataset, collate) in methods.items()}
            timings = time_interleaved(passes, repeats=args.repeats, warmup=args.warmup, track_cpu=True)
            for name, timing in timings.items():
                row = {"method": name, "workers": workers, **timing.to_dict(), "scenes_per_s": n_scenes / timing.median}
                if name == "GPS (crops cached)":
                    row["startup_s"] = startup_s
                rows.append(row)
            progress.update()
        progress.close()
        for row in rows:
            base = next(r for r in rows if r["method"] == "GPS (per item)" and r["workers"] == row["workers"])
            row["ratio_vs_baseline"] = ratio(base["seconds"], row["seconds"])
            row["cpu_ratio_vs_baseline"] = ratio(base["cpu_seconds"], row["cpu_seconds"])
            cached_row = next(r for r in rows if r["method"] == "GPS (crops cached)" and r["workers"] == row["workers"])
            row["ratio_vs_cached"] = ratio(cached_row["seconds"], row["seconds"])
        result.rows = rows
        result.details["stage_seconds_per_scene"] = {
            "GPS (per item)": gps_stage_seconds(methods["GPS (per item)"][0], order, batch_size),
            "sparsegps": sparsegps_stage_seconds(methods["sparsegps"][0], order, batch_size),
        }
        for row in rows:
            if row["method"] == "sparsegps":
                result.targets.append(target(f"sparsegps vs GPS per item, {row['workers']} workers",
                                             row["ratio_vs_baseline"], TARGET_VS_GPS))
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    result.notes += [
        f"{n_scenes} scenes from {source}; batches of {batch_size}; sparsegps voxel size {args.voxel_size} m",
        f"GPS (crops cached) needed {startup_s:.2f} s of start-up to crop all {n_scenes} scenes (not in its "
        "per-pass time) and holds every crop in RAM",
        "a pass builds a new DataLoader, so worker start-up is included; files are in the page cache (warm)",
        "methods are timed in interleaved rounds (one pass of each per round), so load from other processes "
        "changing during the run slows them alike",
        *(_stage_note(name, stages) for name, stages in result.details["stage_seconds_per_scene"].items()),
        "voxelization alone, per scene: " + ", ".join(
            f"{name} {ms:.1f} ms" for name, ms in result.details["voxelization_ms_per_scene"].items()),
        "cpu_seconds: CPU time of the pass (this process and its finished workers), which other processes "
        "competing for the cores do not inflate; cpu_ratio_vs_baseline compares those",
    ]
    return finish(result, machine, ["method", "workers", "seconds", "scenes_per_s", "ratio_vs_baseline",
                                    "ratio_vs_cached", "cpu_seconds", "cpu_ratio_vs_baseline"], args.out, plot=_plot)


def _plot(data: dict, path: Path) -> None:
    rows = data["rows"]
    bar_chart(path, [f"{r['method']}, {r['workers']} workers" for r in rows], [r["scenes_per_s"] for r in rows],
              ylabel="scenes/s (higher is better)", title="Batch preparation",
              highlight=[r["method"] == "sparsegps" for r in rows])


def main(argv: list[str] | None = None) -> dict:
    return main_for(sys.modules[__name__], NAME, argv)


if __name__ == "__main__":
    main()
