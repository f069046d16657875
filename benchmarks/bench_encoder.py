"""Object encoding throughput: sparsegps's spconv U-Net + instance pooling vs GPS's PointNet++.

For the same seeded scenes at 20, 40 and 80 objects each (fixed points per scene), measure

- forward under `torch.no_grad()` in eval mode (GPS runs its object encoder frozen), and
- forward + backward in train mode (end-to-end training, what sparsegps does),

as scenes/s, voxels/s (sparsegps) or points/s (PointNet++), forward GFLOPs and peak memory.

sparsegps: the scene is grid-sampled (`GridSample`, no augmentation) and collated
(`collate_scenes`) once, outside the timed region; the timed work is `SpUNet` (each preset and
voxel size asked for) and `ObjectPooling` to 768-d object tokens. GPS: objects are cropped,
resampled to 1024 points and normalised once, outside the timed region; the timed work is
`PointNet2ObjectEncoder` on [objects, 1024, 6] -> [objects, 768]. Input preparation is measured
by `sparsegps bench batch-prep`. Ratios are PointNet++'s time over sparsegps's at the same object
count and mode (above 1: sparsegps is faster).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sparsegps.benchmarks.arguments import add_common_arguments, command_line, main_for, resolve_common
from sparsegps.benchmarks.flops import count_flops
from sparsegps.benchmarks.machine import machine_info
from sparsegps.benchmarks.memory import memory_method, peak_memory
from sparsegps.benchmarks.report import Result, finish, ratio, save_figure, target
from sparsegps.benchmarks.scenes import random_room
from sparsegps.benchmarks.timing import time_interleaved
from sparsegps.benchmarks.pointnet2_gps import PointNet2ObjectEncoder, gps_crop_objects, gps_object_points

NAME = "encoder"
BASELINE = "PointNet++ (GPS)"
TOKEN_DIM = 768
# tiny at 0.05 m, forward + backward, should take at most 1.5x PointNet++'s time.
TARGET_PRESET, TARGET_VOXEL, TARGET_SLOWDOWN = "tiny", 0.05, 1.5


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--objects", type=int, nargs="+", default=None,
                        help="objects per scene (default 20 40 80; quick 8)")
    parser.add_argument("--points", type=int, default=None, help="points per scene (default 150000; quick 12000)")
    parser.add_argument("--batch-size", type=int, default=1, help="scenes per forward")
    parser.add_argument("--presets", nargs="+", default=None, help="SpUNet presets (default tiny base; quick tiny)")
    parser.add_argument("--voxel-sizes", type=float, nargs="+", default=None,
                        help="voxel sizes in metres (default 0.05 0.02; quick 0.05)")
    parser.add_argument("--modes", nargs="+", choices=("forward", "train"), default=["forward", "train"],
                        help="forward: no_grad, eval mode; train: forward + backward, train mode")
    parser.add_argument("--no-flops", action="store_true", help="skip FLOP counting")
    parser.add_argument("--no-memory", action="store_true", help="skip peak-memory measurement")


# ---------------------------------------------------------------------------------------- inputs

def scene_batch(num_objects: int, num_points: int, batch_size: int, seed: int):
    rng = np.random.default_rng([seed, num_objects])
    return [random_room(f"room_{num_objects}_{b}", rng, num_objects=num_objects, num_points=num_points)
            for b in range(batch_size)]


def gps_inputs(scenes, seed: int) -> torch.Tensor:
    """GPS's encoder input for the scenes: [objects of all scenes, 1024, 6]."""
    rng = np.random.default_rng(seed)
    arrays = []
    for scene in scenes:
        labels = {o.instance_id: o.label for o in scene.objects}
        crops = gps_crop_objects(scene.xyz, scene.rgb.astype(np.float32), scene.instance, labels)
        arrays.append(gps_object_points(crops, 1024, rng)[0])
    return torch.from_numpy(np.concatenate(arrays))


def sparse_inputs(scenes, voxel_size: float) -> dict:
    """sparsegps's encoder input for the scenes: the collated batch of `collate_scenes`."""
    from sparsegps.data.collate import collate_scenes
    from sparsegps.data.transforms import GridSample, scene_to_sample

    grid = GridSample(voxel_size)
    samples = []
    for scene in scenes:
        sample = grid(scene_to_sample(scene))
        sample["object_label_id"] = np.full(len(sample["objects"]), -1, np.int64)
        samples.append(sample)
    return collate_scenes(samples)


# ---------------------------------------------------------------------------------------- models

class SparseObjectEncoder(torch.nn.Module):
    """SpUNet over the voxelized scenes, then object tokens pooled by instance."""

    def __init__(self, preset: str):
        super().__init__()
        from sparsegps.models.backbone import SpUNet, SpUNetConfig
        from sparsegps.models.pooling import ObjectPooling

        self.backbone = SpUNet(SpUNetConfig.preset(preset))
        self.pooling = ObjectPooling(self.backbone.out_channels, TOKEN_DIM)

    def forward(self, batch: dict) -> torch.Tensor:
        feats = self.backbone(batch["coords"], batch["feats"], batch["batch_size"], batch["spatial_shape"])
        tokens = self.pooling(feats, batch["voxel_object"], batch["object_offsets"], batch["object_center"],
                              batch["object_size"])
        return tokens.tokens


# ------------------------------------------------------------------------------------------- run

def make_step(model: torch.nn.Module, forward, mode: str):
    """One timed unit of work: a no_grad forward in eval mode, or forward + backward in train mode."""
    if mode == "forward":
        def step():
            model.eval()
            with torch.no_grad():
                forward()
    else:
        def step():
            model.train()
            model.zero_grad(set_to_none=True)
            forward().float().square().mean().backward()
    return step


def run(args: argparse.Namespace) -> dict:
    resolve_common(args)
    objects = args.objects or ([8] if args.quick else [20, 40, 80])
    points = args.points or (12_000 if args.quick else 150_000)
    presets = args.presets or (["tiny"] if args.quick else ["tiny", "base"])
    voxel_sizes = args.voxel_sizes or ([0.05] if args.quick else [0.05, 0.02])
    device = args.device
    machine = machine_info(device)
    result = Result(NAME, command_line(NAME, getattr(args, "argv", None)), dict(vars(args)),
                    baseline="GPS's PointNet++ object encoder at the same object count and mode")
    result.config.update(objects=objects, points=points, presets=presets, voxel_sizes=voxel_sizes)

    torch.manual_seed(args.seed)
    pointnet = PointNet2ObjectEncoder().to(device)
    sparse_models = {p: SparseObjectEncoder(p).to(device) for p in presets}
    progress = tqdm(total=len(objects) * len(args.modes), desc="encoder", unit="measurement", leave=False)
    rows = []
    for n_obj in objects:
        scenes = scene_batch(n_obj, points, args.batch_size, args.seed)
        gps_points = gps_inputs(scenes, args.seed).to(device)
        # label -> (method, voxel size, model, forward, elements, element name)
        encoders = {BASELINE: (BASELINE, None, pointnet, lambda: pointnet(gps_points), gps_points.shape[0] * 1024,
                               "points")}
        for voxel_size in voxel_sizes:
            batch = sparse_inputs(scenes, voxel_size)
            batch = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
            for preset, model in sparse_models.items():
                encoders[f"sparsegps {preset} @{voxel_size} m"] = (
                    f"sparsegps {preset}", voxel_size, model, lambda m=model, b=batch: m(b),
                    int(batch["coords"].shape[0]), "voxels")
        flops = {}
        for label, (_, _, model, forward, _, _) in encoders.items():
            flops[label] = None
            if not args.no_flops and (device == "cpu" or label == BASELINE):
                model.eval()
                with torch.no_grad():
                    flops[label] = count_flops(forward)
        for mode in args.modes:
            steps = {label: make_step(model, forward, mode) for label, (_, _, model, forward, _, _) in encoders.items()}
            timings = time_interleaved(steps, repeats=args.repeats, warmup=args.warmup, device=device)
            for label, (method, voxel_size, _, _, elements, element) in encoders.items():
                row = {"label": label, "method": method, "objects": n_obj, "mode": mode, "voxel_size": voxel_size,
                       **timings[label].to_dict(), "scenes_per_s": args.batch_size / timings[label].median,
                       "elements": elements, "element": element,
                       "gflops_forward": None if flops[label] is None else flops[label] / 1e9,
                       "peak_memory_mb": None if args.no_memory else peak_memory(steps[label], device) / 2**20}
                rows.append(row)
            progress.update()
    progress.close()
    for row in rows:
        base = next(r for r in rows if r["method"] == BASELINE and r["objects"] == row["objects"]
                    and r["mode"] == row["mode"])
        row["ratio_vs_baseline"] = ratio(base["seconds"], row["seconds"])
        row["elements_per_s"] = row["elements"] / row["seconds"]
    result.rows = rows
    for row in rows:
        if (row["method"] == f"sparsegps {TARGET_PRESET}" and row["voxel_size"] == TARGET_VOXEL
                and row["mode"] == "train"):
            result.targets.append(target(f"{row['label']} train step vs PointNet++, {row['objects']} objects",
                                         row["ratio_vs_baseline"], round(1 / TARGET_SLOWDOWN, 3)))
    result.notes += [
        f"scenes: random rooms of {points} points, batches of {args.batch_size} scene(s); elements = voxels "
        "(sparsegps) or objects x 1024 points (PointNet++)",
        "input preparation (voxelization, collation, object cropping and resampling) is outside the timed region",
        "gflops_forward: counted by torch.utils.flop_counter (matmuls and convolutions); on CPU spconv's native "
        "algorithm runs its gather-GEMM-scatter through torch.mm, so its convolutions are counted; on CUDA "
        "spconv's implicit-GEMM kernels are invisible to the counter and sparsegps's FLOPs are left out",
        f"peak memory: {memory_method(device)}",
        "train mode: loss = mean of squared output tokens, gradients for every parameter",
        "all encoders of one object count and mode are timed in interleaved rounds (one run of each per round), "
        "so load from other processes changing during the run slows them alike",
    ]
    return finish(result, machine, ["label", "objects", "mode", "seconds", "scenes_per_s", "elements",
                                    "elements_per_s", "gflops_forward", "peak_memory_mb", "ratio_vs_baseline"],
                  args.out, plot=_plot)


def _plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    modes = sorted({r["mode"] for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for label in dict.fromkeys(r["label"] for r in rows):
            pts = [(r["objects"], r["seconds"]) for r in rows if r["label"] == label and r["mode"] == mode]
            ax.plot(*zip(*pts), marker="o", label=label, linestyle="--" if label.startswith("PointNet") else "-")
        ax.set_xlabel("objects per scene")
        ax.set_ylabel("seconds per batch (lower is better)")
        ax.set_yscale("log")
        ax.set_title({"forward": "forward (no_grad)", "train": "forward + backward"}[mode])
        ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    return main_for(sys.modules[__name__], NAME, argv)


if __name__ == "__main__":
    main()
