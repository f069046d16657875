"""End-to-end pre-training step: steps/s, scenes/s and memory under DeepSpeed ZeRO 0/1/2/3.

Seeded scenes of the `sparsegps.synth` demo preset are written to a temporary shard store and
read back through `ScenesDataset` (the pre-training config's transforms). For every ZeRO stage and
micro-batch size asked for, one single-process DeepSpeed engine is built by
`sparsegps.train.loop.build_engine` from the same initial weights and the pre-training config
(`configs/pretrain/tiny_cpu.yaml` on CPU, `base_gpu.yaml` on CUDA; `--set` overrides keys); an
optimizer step is one micro-batch (no accumulation).

A step is split into timed regions (device synchronised at every boundary on CUDA):

    data          ScenesDataset items (shard read, transforms, voxelization) + collate_scenes +
                  move to the device, in the training process (no DataLoader workers)
    backbone      SpUNet + ObjectPooling forward: from a pre-hook on `model.backbone` to a hook
                  after `model.pooling` (ZeRO-3 parameter gathering of these modules included)
    transformers  the rest of the engine's forward: spatial transformer, text encoder (tokenization
                  included: the model tokenizes in its forward), grounding encoder, heads and losses
    backward      `engine.backward(loss)` (gradient reduction and partitioning included)
    optimizer     `engine.step()` (clipping, AdamW, ZeRO parameter copies, scheduler)

The ratios are against ZeRO-0 (a DeepSpeed engine without ZeRO) at the same micro-batch. Every
engine is timed in interleaved rounds (one step of each per round), so load that changes during
the run slows them alike.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sparsegps.benchmarks.arguments import add_common_arguments, command_line, configs_folder, main_for, resolve_common
from sparsegps.benchmarks.machine import machine_info
from sparsegps.benchmarks.memory import memory_method, peak_memory
from sparsegps.benchmarks.report import Result, finish, ratio, save_figure, target
from sparsegps.benchmarks.scenes import write_demo_store
from sparsegps.benchmarks.timing import synchronize, timed_training_step

NAME = "train-step"
REGIONS = ("data", "backbone", "transformers", "backward", "optimizer")
# On one process ZeRO partitions nothing; its bookkeeping may cost at most 10% of ZeRO-0's throughput.
TARGET_VS_ZERO0 = 0.9
# Quick mode: one layer per transformer and voxels of at least 0.12 m, so every stage runs in seconds.
QUICK_OVERRIDES = ["model.text.num_layers=1", "model.spatial_layers=1", "model.grounding_layers=1"]
QUICK_MIN_VOXEL = 0.12


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--zero-stages", type=int, nargs="+", choices=(0, 1, 2, 3), default=[0, 1, 2, 3],
                        help="ZeRO stages to measure (0: DeepSpeed engine without ZeRO, the baseline)")
    parser.add_argument("--micro-batches", type=int, nargs="+", default=None,
                        help="scenes per step (default: half the config's micro_batch and the config's "
                             "micro_batch; quick 1)")
    parser.add_argument("--scenes", type=int, default=None,
                        help="scenes in the temporary store, cycled through by the steps (default: two "
                             "micro-batches of the largest size; quick 4)")
    parser.add_argument("--config", type=Path, default=None,
                        help="pre-training YAML (default configs/pretrain/tiny_cpu.yaml on CPU, base_gpu.yaml on CUDA)")
    parser.add_argument("--deepspeed-dir", type=Path, default=None,
                        help="folder of zero1.json, zero2.json and zero3.json (default configs/deepspeed)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the pre-training config (e.g. model.d_model=256)")


# --------------------------------------------------------------------------------------- regions

class ForwardSplit:
    """Wall-clock marks around the backbone + pooling inside the engine's forward.

    The pre-hook on the backbone runs before any hook DeepSpeed registered (ZeRO-3 gathers the
    backbone's parameters in its own pre-hook), the hook on the pooling after them.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device):
        self.device = device
        self.reset()
        model.backbone.register_forward_pre_hook(self._mark_start, prepend=True)
        model.pooling.register_forward_hook(self._mark_end)

    def reset(self) -> None:
        self.start = self.end = None

    def _mark_start(self, *_):
        synchronize(self.device)
        self.start = time.perf_counter()

    def _mark_end(self, *_):
        synchronize(self.device)
        self.end = time.perf_counter()

    def seconds(self) -> float:
        if self.start is None or self.end is None:
            raise RuntimeError("the forward did not run the backbone and the pooling")
        return self.end - self.start


class EngineUnderTest:
    """One DeepSpeed engine and the step it runs on scenes of the dataset, timed by region."""

    def __init__(self, stage: int, micro_batch: int, engine, dataset, device: torch.device, precision: str):
        self.stage, self.micro_batch = stage, micro_batch
        from sparsegps.criterion import GPSCriterion

        self.engine, self.dataset, self.device, self.precision = engine, dataset, device, precision
        self.criterion = GPSCriterion.of(engine.module.cfg)
        self.split = ForwardSplit(engine.module, device)
        self.next_scene = 0
        self.region_times: list[dict[str, float]] = []
        self.voxels: list[int] = []

    def step(self, record: bool = True) -> dict[str, float]:
        n = len(self.dataset)
        indices = [(self.next_scene + j) % n for j in range(self.micro_batch)]
        self.next_scene = (self.next_scene + self.micro_batch) % n
        batch, phases = timed_training_step(self.engine, self.dataset, indices, self.device, self.precision,
                                            self._loss, f"ZeRO-{self.stage}, micro-batch {self.micro_batch}")
        backbone = self.split.seconds()
        times = {"data": phases["data"], "backbone": backbone, "transformers": phases["forward"] - backbone,
                 "backward": phases["backward"], "optimizer": phases["optimizer"]}
        if record:
            self.region_times.append(times)
            self.voxels.append(int(batch["coords"].shape[0]))
        return times

    def _loss(self, batch: dict) -> torch.Tensor:
        self.split.reset()
        return self.criterion(self.engine(batch), batch)["loss"]


# ---------------------------------------------------------------------------------------- memory

def tensor_bytes(root, device: torch.device) -> int:
    """Bytes of the distinct tensor storages on `device` reachable from `root`: through attributes,
    containers, bound methods and closures (not through modules, classes or a function's globals),
    counting each leaf tensor's `.grad`. For an engine: parameters, buffers, gradients, optimizer
    state and DeepSpeed's flat buffers, each storage once however many views share it."""
    seen_objects, seen_storages, total = set(), set(), 0
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen_objects or isinstance(obj, (type, types.ModuleType)):
            continue
        seen_objects.add(id(obj))
        if isinstance(obj, torch.Tensor):
            if obj.is_leaf and obj.grad is not None:
                stack.append(obj.grad)
            storage = obj.untyped_storage()
            key = (storage.device, storage.data_ptr())
            if storage.device.type == device.type and storage.nbytes() and key not in seen_storages:
                seen_storages.add(key)
                total += storage.nbytes()
        if isinstance(obj, types.FunctionType):
            stack.extend(obj.__defaults__ or ())
            for cell in obj.__closure__ or ():
                try:
                    stack.append(cell.cell_contents)
                except ValueError:  # an empty cell
                    pass
            continue
        stack.extend(gc.get_referents(obj))
    return total


# ------------------------------------------------------------------------------------------- run

def build_engines(cfg, stages: list[int], micro_batches: list[int], dataset, deepspeed_dir: Path,
                  warmup: int, device: torch.device, precision: str) -> tuple[list[EngineUnderTest], dict]:
    """One warmed-up engine per (stage, micro-batch), all from the same initial weights.

    Returns the engines and, per engine, the bytes of tensor storage it holds after warm-up
    (`tensor_bytes`)."""
    from sparsegps.models.gps import GPSModel
    from sparsegps.train.engine import gps_role, optimizer_groups
    from sparsegps.train.run import Run, build_engine

    torch.manual_seed(cfg.seed)
    initial = GPSModel(cfg.model).to(device)
    gc.collect()
    gc.freeze()  # objects that exist now are never collected again: the collections between steps stay short
    engines, held = [], {}
    progress = tqdm(total=len(stages) * len(micro_batches), desc="building engines", unit="engine", leave=False)
    for micro_batch in micro_batches:
        for stage in stages:
            ds_json = None if stage == 0 else str(deepspeed_dir / f"zero{stage}.json")
            run_cfg = dataclasses.replace(cfg, micro_batch=micro_batch, global_batch=micro_batch, deepspeed=ds_json)
            run = Run(run_cfg, device, precision, rank=0, world=1, grad_accum=1, out=Path("."))
            model = copy.deepcopy(initial)
            engine, _ = build_engine(run, model, optimizer_groups(model, gps_role, cfg.optim.no_decay), cfg.optim)
            engine.train()
            under_test = EngineUnderTest(stage, micro_batch, engine, dataset, device, precision)
            for _ in range(max(warmup, 1)):
                under_test.step(record=False)
            held[(stage, micro_batch)] = tensor_bytes(engine, device)
            engines.append(under_test)
            progress.update()
    progress.close()
    return engines, held


def run(args: argparse.Namespace) -> dict:
    from sparsegps.benchmarks.scenes import demo_texts
    from sparsegps.config import ConfigError, load_config
    from sparsegps.data import ScenesDataset
    from sparsegps.train.engine import init_distributed
    from sparsegps.train.run import resolve_precision
    from sparsegps.synth import SYNTH_VOCABULARY
    from sparsegps.train.pretrain import PretrainConfig, with_class_names, with_corpus_tokens

    resolve_common(args, repeats=5, warmup=1)
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    stages = sorted(set(args.zero_stages) | {0})
    configs = None if (args.config and args.deepspeed_dir) else configs_folder()
    config_path = args.config or configs / "pretrain" / ("base_gpu.yaml" if cuda else "tiny_cpu.yaml")
    deepspeed_dir = args.deepspeed_dir or configs / "deepspeed"
    overrides = (QUICK_OVERRIDES if args.quick else []) + list(args.set) + [f"device={device.type}", "precision=auto"]
    try:
        cfg = load_config(PretrainConfig, config_path, overrides)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None
    # the label ids of the benchmark's shards; the tokens of demo rooms' texts for MLM
    cfg = with_corpus_tokens(with_class_names(cfg, SYNTH_VOCABULARY), demo_texts())
    if args.quick:
        cfg.data.transforms.voxel_size = max(cfg.data.transforms.voxel_size, QUICK_MIN_VOXEL)
    micro_batches = args.micro_batches or ([1] if args.quick else sorted({max(cfg.micro_batch // 2, 1),
                                                                          cfg.micro_batch}))
    scenes_n = args.scenes or (4 if args.quick else 2 * max(micro_batches))
    if min(micro_batches) < 1 or scenes_n < 1:
        raise SystemExit("error: --micro-batches and --scenes must be at least 1")
    precision = resolve_precision(cfg.precision, device)
    machine = machine_info(args.device)
    result = Result(NAME, command_line(NAME, getattr(args, "argv", None)), dict(vars(args)),
                    baseline="ZeRO-0 (DeepSpeed engine without ZeRO) at the same micro-batch, same run")
    result.config.update(micro_batches=micro_batches, zero_stages=stages, scenes=scenes_n,
                         pretrain_config=str(config_path), deepspeed_dir=str(deepspeed_dir), overrides=overrides,
                         voxel_size=cfg.data.transforms.voxel_size, precision=precision)

    init_distributed(device.type)
    root = Path(tempfile.mkdtemp(prefix="sparsegps-bench-train-step-"))
    try:
        source = write_demo_store(root / "shards", scenes_n, args.seed)
        dataset = ScenesDataset([str(root / "shards")], cfg.data.transforms, seed=args.seed)
        try:
            engines, held = build_engines(cfg, stages, micro_batches, dataset, deepspeed_dir, args.warmup, device,
                                          precision)
            gc.collect()
            gc.freeze()
            progress = tqdm(total=args.repeats * len(engines), desc="timing steps", unit="step", leave=False)
            for _ in range(args.repeats):
                for under_test in engines:
                    gc.collect()
                    under_test.step()
                    progress.update()
            progress.close()
            rows = []
            for under_test in tqdm(engines, desc="peak memory", unit="engine", leave=False):
                step_peak = peak_memory(lambda u=under_test: u.step(record=False), args.device)
                rows.append(_row(under_test, held[(under_test.stage, under_test.micro_batch)], step_peak))
        finally:
            gc.unfreeze()
        dataset.store.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    for row in rows:
        base = next(r for r in rows if r["zero_stage"] == 0 and r["micro_batch"] == row["micro_batch"])
        row["ratio_vs_baseline"] = ratio(base["seconds"], row["seconds"])
        row["compute_ratio_vs_baseline"] = ratio(base["compute_seconds"], row["compute_seconds"])
        row["memory_vs_baseline"] = row["peak_memory_mb"] / base["peak_memory_mb"]
        if row["zero_stage"] > 0:
            result.targets.append(target(f"ZeRO-{row['zero_stage']} vs ZeRO-0 scenes/s, micro-batch "
                                         f"{row['micro_batch']}, one process", row["ratio_vs_baseline"],
                                         TARGET_VS_ZERO0))
    result.rows = rows
    result.config["timing_method"] = ("wall-clock regions (time.perf_counter; torch.cuda.synchronize at every "
                                      "boundary on CUDA), the forward split by module hooks on model.backbone "
                                      "(pre-hook) and model.pooling (hook)")
    result.notes += [
        f"scenes: {scenes_n} rooms from {source}, read through ScenesDataset with the config's transforms "
        f"(voxel size {cfg.data.transforms.voxel_size} m, augmentation on); every engine sees the same scenes in "
        "the same order",
        "regions: data = ScenesDataset items + collate_scenes + move to device in the training process (a "
        "DataLoader with workers would overlap it with compute); backbone = SpUNet + ObjectPooling forward; "
        "transformers = the rest of the forward (spatial transformer, tokenization and text encoder, grounding "
        "encoder, heads, losses); backward = engine.backward; optimizer = engine.step",
        "seconds: median wall time of a whole step (all regions); region_seconds: mean per step of each region "
        "over the timed steps, and fractions of their sum (= seconds_mean); compute_seconds: mean of the step "
        "without the data region, the step time when DataLoader workers hide data preparation entirely",
        f"memory: held_memory_mb = tensor storage on the {device.type} that the engine holds between steps "
        "(parameters, buffers, gradients, optimizer state, DeepSpeed's flat buffers; distinct storages reachable "
        f"from the engine object, counted after warm-up); peak_step_memory_mb = {memory_method(args.device)}, over "
        "one extra untimed step; peak_memory_mb = their sum",
        "one process: ZeRO has one rank to partition over, so stages 1-3 save no memory and only add "
        "bookkeeping (flat buffers, gradient copies, ZeRO-3 parameter gathering hooks); their value shows on "
        "several GPUs, which this benchmark does not measure",
        f"precision {precision}; gradient clipping {cfg.optim.gradient_clipping}; the text encoder is "
        f"{'frozen' if cfg.model.freeze_text else 'trained'}",
    ]
    return finish(result, machine, ["method", "micro_batch", "seconds", "steps_per_s", "scenes_per_s",
                                    *(f"{r}_fraction" for r in REGIONS), "peak_memory_mb", "ratio_vs_baseline",
                                    "memory_vs_baseline"], args.out, plot=_plot)


def _row(under_test: EngineUnderTest, held_bytes: int, step_peak_bytes: int) -> dict:
    """Throughput, time split and memory of one engine's timed steps."""
    import statistics

    steps = under_test.region_times
    totals = [sum(t.values()) for t in steps]
    region_seconds = {r: statistics.fmean(t[r] for t in steps) for r in REGIONS}
    mean = sum(region_seconds.values())
    median = statistics.median(totals)
    compute = mean - region_seconds["data"]
    held_mb, step_mb = max(held_bytes, 0) / 2**20, step_peak_bytes / 2**20
    return {
        "method": f"ZeRO-{under_test.stage}", "zero_stage": under_test.stage, "micro_batch": under_test.micro_batch,
        "seconds": median, "seconds_min": min(totals), "seconds_max": max(totals), "seconds_mean": mean,
        "repeats": len(steps), "steps_per_s": 1.0 / median, "scenes_per_s": under_test.micro_batch / median,
        "voxels_per_step": statistics.fmean(under_test.voxels),
        "compute_seconds": compute, "compute_scenes_per_s": under_test.micro_batch / compute,
        "region_seconds": region_seconds,
        **{f"{r}_fraction": region_seconds[r] / mean for r in REGIONS},
        "held_memory_mb": held_mb, "peak_step_memory_mb": step_mb, "peak_memory_mb": held_mb + step_mb,
    }


def _plot(data: dict, path: Path) -> None:
    """Stacked bars: mean seconds per step of each region, one bar per engine."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    labels = [f"{r['method']}, mb {r['micro_batch']}" for r in rows]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.8))
    left = [0.0] * len(rows)
    for region in REGIONS:
        widths = [r["region_seconds"][region] for r in rows]
        ax.barh(labels, widths, left=left, label=region)
        left = [a + b for a, b in zip(left, widths)]
    for y, (r, x) in enumerate(zip(rows, left)):
        ax.text(x, y, f" {r['scenes_per_s']:.3g} scenes/s (median step)", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(left) * 1.45)
    ax.set_xlabel("seconds per step (mean of each region)")
    ax.set_title(f"Pre-training step by region ({data['machine']['summary']})", fontsize=9)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=len(REGIONS))
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    return main_for(sys.modules[__name__], NAME, argv)


if __name__ == "__main__":
    main()
