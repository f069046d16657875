"""How step cost grows with scene size: voxels per scene and objects per scene.

Two sweeps, each with batches of `--micro-batch` scenes:

- points: the `sparsegps.synth` demo preset's rooms with the surface sampling density multiplied
  by 1, 2 and 4 (`--point-scales`). In `density` mode the voxel size shrinks by the square root of
  the factor, so each voxel keeps about as many points and the voxel count grows with the points
  (the same rooms, the same objects); in `tile` mode the voxel size stays and each room is laid out
  k times side by side (voxels and objects both grow k-fold);
- objects: the benchmark suite's random box rooms with a fixed number of points and 8, 16, 32
  and 64 objects (`--objects`).

For every size two workloads are timed, each on the same `GPSModel` (pre-training config: tiny
on CPU, base on CUDA):

- backbone+pooling: SpUNet + ObjectPooling forward and backward (loss: mean squared token);
- full step: the whole GPS forward (spatial transformer, text encoder, grounding, losses),
  backward and an AdamW step with GPS's parameter groups.

Inputs are voxelized and collated once, outside the timed region. A straight line is fitted to
log(seconds) against log(voxels) (points sweep) and against log(objects) (objects sweep); the
target is cost linear in voxels: a log-log slope of at most 1.1. Ratios are the smallest size's
time over each size's time in the same sweep and workload (below 1: the larger size takes longer).
"""
from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from sparsegps.benchmarks.arguments import add_common_arguments, command_line, main_for, resolve_common
from sparsegps.benchmarks.machine import machine_info
from sparsegps.benchmarks.memory import memory_method, peak_memory
from sparsegps.benchmarks.report import Result, finish, ratio, save_figure, target
from sparsegps.benchmarks.scenes import random_room
from sparsegps.benchmarks.timing import time_interleaved

NAME = "scaling"
WORKLOADS = ("backbone+pooling", "full step")
TARGET_SLOPE = 1.1


@dataclass
class ScalingResult(Result):
    """`Result` plus the fitted log-log lines:
    [{sweep, workload, x, slope, intercept, r2, local_slopes, memory_slope}]."""

    fits: list[dict] = field(default_factory=list)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--micro-batch", type=int, default=None, help="scenes per step (default 4; quick 1)")
    parser.add_argument("--point-scales", type=float, nargs="+", default=None,
                        help="multipliers of the points per scene (default 1 2 4; quick 1 2)")
    parser.add_argument("--point-mode", choices=("density", "tile"), default="density",
                        help="density: denser sampling and voxel size / sqrt(k); tile: k copies of each room")
    parser.add_argument("--objects", type=int, nargs="+", default=None,
                        help="objects per scene of the objects sweep (default 8 16 32 64; quick 8 16)")
    parser.add_argument("--room-points", type=int, default=None,
                        help="points per scene of the objects sweep (default 20000; quick 8000)")
    parser.add_argument("--config", type=Path, default=None,
                        help="pre-training YAML: model and voxel size (default configs/pretrain/tiny_cpu.yaml on "
                             "CPU, base_gpu.yaml on CUDA)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the pre-training config (e.g. data.transforms.voxel_size=0.05)")


def default_config(device: torch.device) -> Path:
    """The pre-training YAML of `configs/` here, else of the source checkout beside this package."""
    name = Path("pretrain") / ("base_gpu.yaml" if device.type == "cuda" else "tiny_cpu.yaml")
    for folder in (Path("configs"), Path(__file__).resolve().parents[1] / "configs"):
        if (folder / name).is_file():
            return folder / name
    raise SystemExit(f"error: configs/{name} not found here or in the source checkout; pass --config")


# ---------------------------------------------------------------------------------------- inputs

def tile_scene(scene, copies: int, gap: float = 0.5):
    """`copies` of `scene` side by side along x, `gap` metres apart; each copy's instance ids are
    shifted past the previous copy's, and its texts follow them."""
    from sparsegps.data import Scene, SceneText, boxes_from_points

    if copies == 1:
        return scene
    width = float(scene.xyz[:, 0].max() - scene.xyz[:, 0].min()) + gap
    stride = int(scene.instance.max()) + 1

    def shifted(instance_id: int, k: int) -> int:
        return instance_id + k * stride if instance_id >= 0 else instance_id

    xyz = np.concatenate([scene.xyz + np.array([k * width, 0, 0], np.float32) for k in range(copies)])
    instance = np.concatenate([np.where(scene.instance >= 0, scene.instance + k * stride, scene.instance)
                               for k in range(copies)]).astype(scene.instance.dtype)
    texts = [SceneText(t.kind, t.text, shifted(t.target_id, k), tuple(shifted(d, k) for d in t.distractor_ids))
             for k in range(copies) for t in scene.texts]
    labels = {shifted(o.instance_id, k): o.label for k in range(copies) for o in scene.objects}
    return Scene(f"{scene.scene_id}_x{copies}", xyz, np.tile(scene.rgb, (copies, 1)), instance,
                 np.tile(scene.semantic, copies), boxes_from_points(xyz, instance, labels), texts)


def collate(scenes, transforms_cfg, seed: int) -> dict:
    """Transform (the config's augmentation off) and collate scenes into one batch, as ScenesDataset does."""
    from sparsegps.data import build_transforms, collate_scenes
    from sparsegps.synth import SYNTH_VOCABULARY

    transforms = build_transforms(dataclasses.replace(transforms_cfg, augment=False))
    label_index = {name: i for i, name in enumerate(SYNTH_VOCABULARY)}
    samples = []
    for index, scene in enumerate(scenes):
        sample = transforms(scene, np.random.default_rng([seed, index]))
        sample["index"] = index
        sample["object_label_id"] = np.array([label_index.get(o.label, -1) for o in sample["objects"]], np.int64)
        samples.append(sample)
    return collate_scenes(samples)


def point_sweep(scales: list[float], mode: str, micro_batch: int, transforms_cfg, seed: int) -> list[dict]:
    """One batch per scale: demo rooms with scale x the points (see the module docstring)."""
    from sparsegps.synth import generate_scene, preset

    base = dataclasses.replace(preset("demo"), seed=seed)
    batches = []
    for scale in tqdm(scales, desc="points sweep inputs", unit="size", leave=False):
        if mode == "density":
            synth = dataclasses.replace(base, points_per_m2=base.points_per_m2 * scale)
            scenes = [generate_scene(synth, i) for i in range(micro_batch)]
            voxel = transforms_cfg.voxel_size / math.sqrt(scale)
        else:
            if scale != int(scale) or scale < 1:
                raise SystemExit(f"error: --point-mode tile needs whole multipliers >= 1, got {scale}")
            scenes = [tile_scene(generate_scene(base, i), int(scale)) for i in range(micro_batch)]
            voxel = transforms_cfg.voxel_size
        batch = collate(scenes, dataclasses.replace(transforms_cfg, voxel_size=voxel), seed)
        batches.append({"sweep": "points", "size": scale, "voxel_size": voxel, "batch": batch,
                        "points": sum(s.num_points for s in scenes)})
    return batches


def object_sweep(counts: list[int], room_points: int, micro_batch: int, transforms_cfg, seed: int) -> list[dict]:
    """One batch per object count: random box rooms with `room_points` points each."""
    batches = []
    for count in tqdm(counts, desc="objects sweep inputs", unit="size", leave=False):
        rng = np.random.default_rng([seed, count])
        scenes = [random_room(f"room_{count}_{b}", rng, num_objects=count, num_points=room_points)
                  for b in range(micro_batch)]
        batch = collate(scenes, transforms_cfg, seed)
        batches.append({"sweep": "objects", "size": count, "voxel_size": transforms_cfg.voxel_size, "batch": batch,
                        "points": sum(s.num_points for s in scenes)})
    return batches


# ------------------------------------------------------------------------------------- workloads

def make_workloads(model, optimizer, batch: dict, device: torch.device, precision: str) -> dict:
    from sparsegps.criterion import GPSCriterion

    criterion = GPSCriterion.of(model.cfg)
    """The two timed calls on one batch (already on the device)."""
    autocast = dict(device_type=device.type, dtype=torch.bfloat16, enabled=precision == "bf16")

    def backbone_pooling():
        model.zero_grad(set_to_none=True)
        with torch.autocast(**autocast):
            feats = model.backbone(batch["coords"], batch["feats"], batch["batch_size"], batch["spatial_shape"])
            tokens = model.pooling(feats, batch["voxel_object"], batch["object_offsets"], batch["object_center"],
                                   batch["object_size"]).tokens
        tokens.float().square().mean().backward()

    def full_step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(**autocast):
            loss = criterion(model(batch), batch)["loss"]
        loss.backward()
        optimizer.step()

    return {"backbone+pooling": backbone_pooling, "full step": full_step}


def neighbours_per_voxel(coords: torch.Tensor) -> float:
    """Mean number of occupied voxels in each voxel's 3x3x3 neighbourhood (itself included): the
    rulebook entries per voxel of a full-resolution submanifold convolution, so its work per voxel."""
    c = coords.cpu().numpy().astype(np.int64)
    c[:, 1:] += 1  # neighbours of voxel 0 sit at -1; keep every key non-negative

    def keys(a: np.ndarray) -> np.ndarray:
        return (a[:, 0] << 60) | (a[:, 1] << 40) | (a[:, 2] << 20) | a[:, 3]

    occupied = np.sort(keys(c))
    found = 0
    for offset in np.stack(np.meshgrid(*[[-1, 0, 1]] * 3, indexing="ij"), -1).reshape(-1, 3):
        query = keys(c + np.concatenate([[0], offset]))
        pos = np.minimum(np.searchsorted(occupied, query), len(occupied) - 1)
        found += int((occupied[pos] == query).sum())
    return found / len(c)


def fit_loglog(x: list[float], y: list[float]) -> dict:
    """Least-squares line through (log x, log y): slope, intercept and R^2."""
    lx, ly = np.log(np.asarray(x, np.float64)), np.log(np.asarray(y, np.float64))
    slope, intercept = np.polyfit(lx, ly, 1)
    residual = ly - (slope * lx + intercept)
    total = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - float((residual ** 2).sum()) / total if total > 0 else 1.0
    return {"slope": float(slope), "intercept": float(intercept), "r2": r2}


# ------------------------------------------------------------------------------------------- run

def run(args: argparse.Namespace) -> dict:
    from sparsegps.benchmarks.scenes import demo_texts
    from sparsegps.config import ConfigError, load_config
    from sparsegps.data import move_batch
    from sparsegps.models.gps import GPSModel
    from sparsegps.train.engine import build_optimizer, gps_role, optimizer_groups
    from sparsegps.train.run import resolve_precision
    from sparsegps.synth import SYNTH_VOCABULARY
    from sparsegps.train.pretrain import PretrainConfig, with_class_names, with_corpus_tokens

    resolve_common(args, repeats=5, warmup=1)
    device = torch.device(args.device)
    micro_batch = args.micro_batch or (1 if args.quick else 4)
    scales = args.point_scales or ([1.0, 2.0] if args.quick else [1.0, 2.0, 4.0])
    counts = args.objects or ([8, 16] if args.quick else [8, 16, 32, 64])
    room_points = args.room_points or (8_000 if args.quick else 20_000)
    if len(scales) < 2 or len(counts) < 2:
        raise SystemExit("error: a slope needs at least two --point-scales and two --objects")
    if min(scales) <= 0 or min(counts) < 1 or micro_batch < 1:
        raise SystemExit("error: --point-scales must be positive, --objects and --micro-batch at least 1")
    config_path = args.config or default_config(device)
    try:
        cfg = load_config(PretrainConfig, config_path, list(args.set) + [f"device={device.type}", "precision=auto"])
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    # the label ids of the benchmark's scenes; the tokens of demo rooms' texts for MLM
    cfg = with_corpus_tokens(with_class_names(cfg, SYNTH_VOCABULARY), demo_texts())
    precision = resolve_precision(cfg.precision, device)
    machine = machine_info(args.device)
    result = ScalingResult(NAME, command_line(NAME, getattr(args, "argv", None)), dict(vars(args)),
                    baseline="the smallest size of the same sweep and workload, same run")
    result.config.update(micro_batch=micro_batch, point_scales=scales, objects=counts, room_points=room_points,
                         pretrain_config=str(config_path), voxel_size=cfg.data.transforms.voxel_size,
                         precision=precision)

    sizes = (point_sweep(scales, args.point_mode, micro_batch, cfg.data.transforms, args.seed)
             + object_sweep(counts, room_points, micro_batch, cfg.data.transforms, args.seed))
    torch.manual_seed(args.seed)
    model = GPSModel(cfg.model).to(device).train()
    optimizer = build_optimizer(optimizer_groups(model, gps_role, cfg.optim.no_decay), cfg.optim, micro_batch,
                                device.type)
    calls, measured = {}, []
    for entry in sizes:
        batch = move_batch(entry["batch"], device)
        for workload, fn in make_workloads(model, optimizer, batch, device, precision).items():
            key = f"{entry['sweep']} {entry['size']:g} {workload}"
            calls[key] = fn
            measured.append((key, entry, workload, batch))
    timings = time_interleaved(calls, repeats=args.repeats, warmup=args.warmup, device=args.device)
    rows = []
    for key, entry, workload, batch in tqdm(measured, desc="peak memory", unit="call", leave=False):
        timing = timings[key]
        voxels = int(batch["coords"].shape[0])
        objects = int(batch["object_center"].shape[0])
        rows.append({"method": workload, "sweep": entry["sweep"], "size": entry["size"], **timing.to_dict(),
                     "scenes_per_s": micro_batch / timing.median, "voxels": voxels, "objects": objects,
                     "objects_per_scene": objects / micro_batch, "points": entry["points"],
                     "voxel_size": entry["voxel_size"], "voxels_per_s": voxels / timing.median,
                     "neighbours_per_voxel": neighbours_per_voxel(batch["coords"]),
                     "peak_memory_mb": peak_memory(calls[key], args.device) / 2**20})
    for sweep, x_key in (("points", "voxels"), ("objects", "objects_per_scene")):
        for workload in WORKLOADS:
            group = sorted((r for r in rows if r["sweep"] == sweep and r["method"] == workload),
                           key=lambda r: r["size"])
            base = group[0]
            for r in group:
                r["ratio_vs_baseline"] = ratio(base["seconds"], r["seconds"])
                r["memory_vs_baseline"] = r["peak_memory_mb"] / max(base["peak_memory_mb"], 1e-3)
                r["cost_per_voxel_vs_baseline"] = (r["seconds"] / r["voxels"]) / (base["seconds"] / base["voxels"])
            x = [r[x_key] for r in group]
            fit = fit_loglog(x, [r["seconds"] for r in group])
            memory_fit = fit_loglog(x, [max(r["peak_memory_mb"], 1e-3) for r in group])
            local = [fit_loglog(x[i:i + 2], [r["seconds"] for r in group[i:i + 2]])["slope"]
                     for i in range(len(group) - 1)]
            result.fits.append({"sweep": sweep, "workload": workload, "x": x_key, **fit,
                                "local_slopes": local, "memory_slope": memory_fit["slope"]})
            if sweep == "points":
                result.targets.append(target(f"log-log slope of seconds vs voxels, {workload} (at most "
                                             f"{TARGET_SLOPE})", fit["slope"], TARGET_SLOPE, higher_is_better=False))
    result.rows = rows
    voxel_range = [r["voxels"] for r in rows if r["sweep"] == "points" and r["method"] == WORKLOADS[0]]
    object_voxels = [r["voxels"] for r in rows if r["sweep"] == "objects" and r["method"] == WORKLOADS[0]]
    result.notes += [
        f"points sweep: {micro_batch} demo-preset room(s) per batch, {args.point_mode} mode "
        + ("(sampling density x k, voxel size / sqrt(k): same rooms and objects)" if args.point_mode == "density"
           else "(k copies of each room side by side: objects grow with the voxels)")
        + f"; {min(voxel_range):,} to {max(voxel_range):,} voxels per batch",
        f"objects sweep: {micro_batch} random box room(s) per batch of {room_points} points each, "
        f"voxel size {cfg.data.transforms.voxel_size} m; at most {cfg.data.transforms.max_referrals} referrals per "
        "scene are kept (the config's transforms), so the text work stays about constant; the same points spread "
        f"over more, smaller surfaces, so the voxels per batch also change ({object_voxels[0]:,} at "
        f"{counts[0]} objects, {object_voxels[-1]:,} at {counts[-1]}): cost_per_voxel_vs_baseline separates the two",
        "fits: least-squares line through (log x, log seconds) of each sweep and workload; a slope of 1 is linear "
        "cost, below 1 means a fixed per-step cost (kernel launches, the text encoder, Python) is not yet "
        "amortised at the smallest size; local_slopes: the slope between each pair of neighbouring sizes",
        "neighbours_per_voxel: occupied voxels in each voxel's 3x3x3 neighbourhood, the per-voxel work of a "
        "full-resolution submanifold convolution; if it grows with the resolution, cost per voxel grows with it",
        "the target (slope <= 1.1) is checked on the points sweep; the objects sweep is reported without a target "
        "(spatial attention is quadratic in the objects of a scene, the rest linear)",
        f"peak memory: {memory_method(args.device)}; memory_slope: the same fit for peak memory",
        "every size and workload is timed in interleaved rounds (one run of each per round), so load changing "
        "during the run slows them alike",
        f"model: {config_path} (precision {precision}); the full step includes AdamW with GPS's parameter groups",
    ]
    data = finish(result, machine,
                  ["method", "sweep", "size", "voxels", "neighbours_per_voxel", "objects_per_scene", "seconds",
                   "scenes_per_s", "voxels_per_s", "peak_memory_mb", "ratio_vs_baseline",
                   "cost_per_voxel_vs_baseline"],
                  args.out, plot=_plot)
    for fit in result.fits:
        print(f"{fit['sweep']:>7} sweep, {fit['workload']:<16}: log-log slope {fit['slope']:.3f} vs {fit['x']} "
              f"(R^2 {fit['r2']:.3f}; between neighbouring sizes {', '.join(f'{v:.2f}' for v in fit['local_slopes'])})")
    return data


def _plot(data: dict, path: Path) -> None:
    """Two log-log panels: seconds vs voxels (points sweep) and vs objects per scene, with fitted lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    panels = (("points", "voxels", "voxels per batch"), ("objects", "objects_per_scene", "objects per scene"))
    for ax, (sweep, x_key, xlabel) in zip(axes, panels):
        for workload, colour in zip(WORKLOADS, ("tab:blue", "tab:orange")):
            group = sorted((r for r in data["rows"] if r["sweep"] == sweep and r["method"] == workload),
                           key=lambda r: r[x_key])
            fit = next(f for f in data["fits"] if f["sweep"] == sweep and f["workload"] == workload)
            x = np.array([r[x_key] for r in group], np.float64)
            ax.loglog(x, [r["seconds"] for r in group], "o", color=colour)
            ax.loglog(x, np.exp(fit["intercept"]) * x ** fit["slope"], "-", color=colour,
                      label=f"{workload}: slope {fit['slope']:.2f}")
        if sweep == "points":
            x = np.array([r[x_key] for r in data["rows"] if r["sweep"] == sweep], np.float64)
            lo = min(r["seconds"] for r in data["rows"] if r["sweep"] == sweep)
            ax.loglog([x.min(), x.max()], [lo, lo * x.max() / x.min()], ":", color="grey", label="slope 1 (linear)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("seconds per step")
        ax.set_title(f"{sweep} sweep")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"Step time vs scene size ({data['machine']['summary']})", fontsize=9)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    return main_for(sys.modules[__name__], NAME, argv)


if __name__ == "__main__":
    main()
