"""Scene reading throughput: sparsegps HDF5 shards vs GPS's per-scene .pth vs Pointcept's .npy folders.

The same seeded scenes are written in three layouts:

- shards: `write_scenes` (one row per compression setting asked for); a read is `SceneStore[i]`,
  the full scene: points, colours, labels, objects and texts;
- pth (GPS / SceneVerse): per scene a `torch.save`d tuple (xyz float32, rgb float32 0-255,
  semantic int64, instance int64) and a `{instance id: label}` dict, read with
  `torch.load(weights_only=True)` and the numpy types allow-listed (the safe way to read them);
- npy (Pointcept): per scene a folder of coord.npy (float32), color.npy (uint8), segment.npy
  (int16) and instance.npy (int16), read with `np.load`.

Each layout is read in one shuffled order through a DataLoader with 0 and 2 workers (one scene
per item, prefetch 2 as in training), with the OS page cache warm (after a full untimed pass) and,
where the page cache can be dropped (root), cold. With workers, each pass either builds a new
DataLoader (`fresh`: worker start-up is part of the pass) or reuses one whose workers persist
(`persistent`: what training does, one loader for the whole run). Ratios are scenes/s over the .pth
layout's scenes/s in the same setting.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from sparsegps.benchmarks.arguments import add_common_arguments, command_line, main_for, resolve_common
from sparsegps.benchmarks.machine import directory_bytes, drop_page_cache, machine_info
from sparsegps.benchmarks.report import Result, bar_chart, finish, ratio, target
from sparsegps.benchmarks.scenes import SCANNET20, synthetic_scenes
from sparsegps.benchmarks.timing import time_interleaved
from sparsegps.data.scene import Scene
from sparsegps.data.store import PLUGIN_CODECS, SceneStore, write_scenes

NAME = "data"
UNVERIFIED = "shards (none, unverified)"
TARGET_VS_PTH = 3.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--scenes", type=int, default=None, help="scenes to write and read (default 200; quick 12)")
    parser.add_argument("--points", type=int, default=None,
                        help="points per scene of the built-in rooms (default 150000; quick 20000)")
    parser.add_argument("--objects", type=int, default=40, help="objects per scene of the built-in rooms")
    parser.add_argument("--generator", choices=("auto", "synth", "room"), default="auto",
                        help="scene source: sparsegps.synth's procedural rooms ('auto': when installed) or "
                             "the benchmark's own random rooms with exactly --points and --objects")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts")
    parser.add_argument("--cache", choices=("warm", "cold", "both"), default=None,
                        help="page-cache state (default both; quick warm); cold needs root")
    parser.add_argument("--compression", nargs="+", default=None,
                        help="shard compressions to measure: none (the default of `pack`), lzf, gzip, lz4, blosc "
                             "(the last two need hdf5plugin; default: none lzf, and lz4 when hdf5plugin is installed)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where to write the three layouts (default: a temporary folder, removed after)")


# --------------------------------------------------------------------------------------- layouts

def _has_hdf5plugin() -> bool:
    import importlib.util

    return importlib.util.find_spec("hdf5plugin") is not None


def _safe_numpy_globals() -> list:
    """What `torch.load(weights_only=True)` must allow to rebuild pickled numpy arrays."""
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _reconstruct
    dtypes = [np.float32, np.float64, np.int16, np.int32, np.int64, np.uint8, np.bool_]
    return [_reconstruct, np.ndarray, np.dtype, *{type(np.dtype(t)) for t in dtypes}]


def write_pth(scene: Scene, folder: Path) -> None:
    """GPS's layout: pcd tuple and instance-to-label dict, one pair of files per scene."""
    rgb = scene.rgb.astype(np.float32)
    torch.save((scene.xyz, rgb, scene.semantic.astype(np.int64), scene.instance.astype(np.int64)),
               folder / "pcd" / f"{scene.scene_id}.pth")
    torch.save({o.instance_id: o.label for o in scene.objects},
               folder / "inst_to_label" / f"{scene.scene_id}_inst_to_label.pth")


def write_npy(scene: Scene, folder: Path) -> None:
    """Pointcept's layout: one folder of arrays per scene."""
    d = folder / scene.scene_id
    d.mkdir(parents=True, exist_ok=True)
    np.save(d / "coord.npy", scene.xyz)
    np.save(d / "color.npy", scene.rgb)
    np.save(d / "segment.npy", scene.semantic.astype(np.int16))
    np.save(d / "instance.npy", scene.instance.astype(np.int16))


def read_pth(folder: Path, scene_id: str) -> tuple:
    """A GPS scene as its loader sees it: (xyz, rgb, semantic, instance) and the label dict."""
    with torch.serialization.safe_globals(_safe_numpy_globals()):
        pcd = torch.load(folder / "pcd" / f"{scene_id}.pth", weights_only=True)
    labels = torch.load(folder / "inst_to_label" / f"{scene_id}_inst_to_label.pth", weights_only=True)
    return pcd, labels


def read_npy(folder: Path, scene_id: str) -> dict:
    d = folder / scene_id
    return {k: np.load(d / f"{k}.npy") for k in ("coord", "color", "segment", "instance")}


class ShardScenes(torch.utils.data.Dataset):
    def __init__(self, path: Path, verify: bool = True):
        self.store = SceneStore(path, verify=verify)

    def __len__(self):
        return len(self.store)

    def __getitem__(self, i):
        return self.store[i]


class FileScenes(torch.utils.data.Dataset):
    """Per-scene files read by `reader(folder, scene_id)`."""

    def __init__(self, folder: Path, scene_ids: list[str], reader):
        self.folder, self.scene_ids, self.reader = folder, scene_ids, reader

    def __len__(self):
        return len(self.scene_ids)

    def __getitem__(self, i):
        return self.reader(self.folder, self.scene_ids[i])


def _keep(item):
    return item


def make_loader(dataset: torch.utils.data.Dataset, order: list[int], workers: int,
                persistent: bool = False) -> torch.utils.data.DataLoader:
    return torch.utils.data.DataLoader(dataset, batch_size=None, sampler=order, num_workers=workers,
                                       collate_fn=_keep, prefetch_factor=2 if workers else None,
                                       persistent_workers=persistent)


def read_all(loader: torch.utils.data.DataLoader) -> None:
    """Read every scene of the loader's order."""
    n = sum(1 for _ in loader)
    if n != len(loader.sampler):
        raise RuntimeError(f"read {n} scenes, expected {len(loader.sampler)}")


def fresh_pass(dataset: torch.utils.data.Dataset, order: list[int], workers: int) -> None:
    """A pass through a new DataLoader: its workers start (and end) within the pass."""
    read_all(make_loader(dataset, order, workers))


def write_layouts(scenes: Iterable[Scene], root: Path, compressions: list[str]
                  ) -> tuple[dict[str, Path], list[str], dict]:
    """Stream the scenes into every layout under `root`.

    Returns {layout name: folder}, the scene ids, and totals (scenes, points, objects). Shards of
    the first compression are written from the stream; other compressions re-pack those shards.
    """
    (root / "pth" / "pcd").mkdir(parents=True)
    (root / "pth" / "inst_to_label").mkdir(parents=True)
    (root / "npy").mkdir(parents=True)
    scene_ids: list[str] = []
    totals = {"scenes": 0, "points": 0, "objects": 0}

    def with_side_writes():
        for scene in scenes:
            scene.validate()
            write_pth(scene, root / "pth")
            write_npy(scene, root / "npy")
            scene_ids.append(scene.scene_id)
            totals["scenes"] += 1
            totals["points"] += scene.num_points
            totals["objects"] += len(scene.objects)
            yield scene

    layouts: dict[str, Path] = {}
    first: SceneStore | None = None
    for compression in compressions:
        folder = root / f"shards_{compression}"
        stream = with_side_writes() if first is None else (first[i] for i in range(len(first)))
        write_scenes(stream, folder, vocabulary=SCANNET20, source="benchmark",
                     compression=None if compression == "none" else compression, progress=False)
        layouts[f"shards ({compression})"] = folder
        first = first or SceneStore(folder)
    first.close()
    layouts["pth (GPS)"] = root / "pth"
    layouts["npy (Pointcept)"] = root / "npy"
    return layouts, scene_ids, totals


# ------------------------------------------------------------------------------------------- run

def run(args: argparse.Namespace) -> dict:
    resolve_common(args)
    scenes_n = args.scenes or (12 if args.quick else 200)
    points = args.points or (20_000 if args.quick else 150_000)
    cache = args.cache or ("warm" if args.quick else "both")
    if args.compression is None:
        args.compression = ["none", "lzf"] + (["lz4"] if _has_hdf5plugin() else [])
    bad = [c for c in args.compression if c not in ("none", "lzf", "gzip", *PLUGIN_CODECS)]
    if bad:
        raise SystemExit(f"error: unknown --compression {bad}; use none, lzf, gzip, lz4 or blosc")
    if any(c in PLUGIN_CODECS for c in args.compression) and not _has_hdf5plugin():
        raise SystemExit("error: --compression lz4/blosc needs the hdf5plugin package (pip install hdf5plugin)")
    machine = machine_info("cpu")
    prefer = args.generator == "synth" or (args.generator == "auto" and not args.quick)
    scenes, source = synthetic_scenes(scenes_n, num_objects=args.objects, num_points=points, seed=args.seed,
                                      prefer_generator=prefer)
    if args.generator == "synth" and source.startswith("random_room"):
        raise SystemExit("error: --generator synth asked for, but sparsegps.synth is not installed")

    root = Path(args.workdir) if args.workdir else Path(tempfile.mkdtemp(prefix="sparsegps-bench-data-"))
    if args.workdir and root.exists() and any(root.iterdir()):
        raise SystemExit(f"error: --workdir {root} is not empty")
    result = Result(NAME, command_line(NAME, getattr(args, "argv", None)), dict(vars(args)),
                    baseline="pth (GPS) layout, same workers and cache state")
    result.config.update(scenes=scenes_n, points=points if source.startswith("random_room") else None, cache=cache)
    try:
        layouts, scene_ids, totals = write_layouts(scenes, root, list(args.compression))
        order = np.random.default_rng(args.seed + 1).permutation(len(scene_ids)).tolist()
        datasets = {}
        for name, folder in layouts.items():
            if name.startswith("shards"):
                datasets[name] = ShardScenes(folder)
                if name == "shards (none)":  # what checking each scene's checksum costs
                    datasets[UNVERIFIED] = ShardScenes(folder, verify=False)
            elif name.startswith("pth"):
                datasets[name] = FileScenes(folder, scene_ids, read_pth)
            else:
                datasets[name] = FileScenes(folder, scene_ids, read_npy)
        sizes = {name: directory_bytes(folder) for name, folder in layouts.items()}
        if UNVERIFIED in datasets:
            sizes[UNVERIFIED] = sizes["shards (none)"]

        states = ["warm", "cold"] if cache == "both" else [cache]
        if "cold" in states and not drop_page_cache():
            states.remove("cold")
            result.notes.append("the page cache could not be dropped (needs root): cold reads not measured")
            if not states:
                states = ["warm"]
        settings = [(w, mode) for w in args.workers for mode in (("fresh", "persistent") if w else ("-",))]
        progress = tqdm(total=len(states) * len(settings), desc="reading", unit="measurement", leave=False)
        rows = []
        for state in states:
            for workers, mode in settings:
                if mode == "persistent":  # one loader per layout, its workers started by an untimed pass
                    loaders = {name: make_loader(dataset, order, workers, persistent=True)
                               for name, dataset in datasets.items()}
                    for loader in loaders.values():
                        read_all(loader)
                    passes = {name: (lambda loader=loader: read_all(loader)) for name, loader in loaders.items()}
                else:
                    passes = {name: (lambda d=dataset, w=workers: fresh_pass(d, order, w))
                              for name, dataset in datasets.items()}
                if state == "warm":
                    timings = time_interleaved(passes, repeats=args.repeats, warmup=max(args.warmup, 1), track_cpu=True)
                else:
                    timings = time_interleaved(passes, repeats=args.repeats, warmup=0, before_each=drop_page_cache,
                                               track_cpu=True)
                passes = loaders = None  # persistent workers end with their loaders
                for name, timing in timings.items():
                    rows.append({"method": name, "cache": state, "workers": workers, "worker_start": mode,
                                 **timing.to_dict(), "scenes_per_s": len(order) / timing.median,
                                 "mpoints_per_s": totals["points"] * 1e-6 / timing.median,
                                 "bytes_on_disk": sizes[name], "bytes_per_scene": sizes[name] / len(order)})
                progress.update()
        progress.close()
        for row in rows:
            base = next(r for r in rows if r["method"].startswith("pth") and r["cache"] == row["cache"]
                        and r["workers"] == row["workers"] and r["worker_start"] == row["worker_start"])
            row["ratio_vs_baseline"] = ratio(base["seconds"], row["seconds"])
            row["cpu_ratio_vs_baseline"] = ratio(base["cpu_seconds"], row["cpu_seconds"])
            row["size_vs_baseline"] = row["bytes_on_disk"] / base["bytes_on_disk"]
        result.rows = rows
        for row in rows:
            if row["method"].startswith("shards"):
                workers = f"{row['workers']} workers" + (f" ({row['worker_start']})" if row["workers"] else "")
                result.targets.append(target(f"{row['method']} vs pth, {workers}, {row['cache']} cache",
                                             row["ratio_vs_baseline"], TARGET_VS_PTH))
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)
    result.notes += [
        f"{len(order)} scenes from {source}: {totals['points'] / len(order):,.0f} points and "
        f"{totals['objects'] / len(order):.1f} objects per scene on average; one shuffled order for every layout",
        "shards return whole Scene objects (points, labels, object boxes and labels, texts); pth returns the "
        "pcd tuple and the instance-to-label dict (GPS keeps language in separate JSON files read once); npy "
        "returns the four arrays",
        "warm: after one untimed full pass, the files sit in the OS page cache; cold: page cache dropped "
        "(echo 3 > /proc/sys/vm/drop_caches) before every timed pass",
        "worker_start fresh: a pass builds a new DataLoader, so worker start-up is included (the same for every "
        "layout); persistent: the loader's workers live across passes (started before timing), as in training, "
        "where one DataLoader serves the whole run",
        "cpu_seconds of persistent passes count this process only: the workers are still running when it is read",
        "layouts are timed in interleaved rounds (one pass of each per round), so load from other processes "
        "changing during the run slows them alike",
        "cpu_seconds: CPU time of the pass (this process and its finished workers), which other processes "
        "competing for the cores do not inflate; cpu_ratio_vs_baseline compares those",
        "shards (none) is the default of `sparsegps pack` and `write_scenes`: contiguous tables read with one "
        "preadv per table and scene",
        "every shard row checks each scene against the checksum its shard recorded (what training does); "
        f"'{UNVERIFIED}' reads the same files without (`SceneStore(verify=False)`): their ratio is that check's cost",
    ]
    return finish(result, machine, ["method", "cache", "workers", "worker_start", "seconds", "scenes_per_s",
                                    "mpoints_per_s",
                                    "bytes_per_scene", "ratio_vs_baseline", "cpu_ratio_vs_baseline",
                                    "size_vs_baseline"],
                  args.out, plot=_plot)


def _plot(data: dict, path: Path) -> None:
    rows = data["rows"]
    bar_chart(path, [f"{r['method']}, {r['workers']}w {r.get('worker_start', '')}, {r['cache']}" for r in rows],
              [r["scenes_per_s"] for r in rows], ylabel="scenes/s (higher is better)",
              title="Reading scenes", highlight=[r["method"].startswith("shards") for r in rows])


def main(argv: list[str] | None = None) -> dict:
    return main_for(sys.modules[__name__], NAME, argv)


if __name__ == "__main__":
    main()
