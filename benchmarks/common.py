"""Shared helpers of the benchmark suite: timing, peak memory, FLOPs, machine description,
synthetic scenes, and the JSON + markdown (+ PNG) writers.

Every benchmark reports speed as a ratio against a baseline measured in the same run on the
same machine, so numbers from different machines are never compared directly.

Result files share one schema (checked by the tests):

    benchmark   name, as in `sparsegps bench NAME`
    command     the command line that produced the file
    created     ISO time stamp
    machine     `machine_info()`: CPU model and cores or GPU name, torch version, load average
    config      every flag value
    baseline    what the ratios are measured against
    rows        one dict per measured configuration; each has `method`, `seconds` (median of the
                timed repeats), `repeats`, a throughput, and `ratio_vs_baseline`
    targets     [{name, ratio, target, met}]: the speed claims the benchmark checks
    notes       caveats (cache state, memory method, what is and is not counted)
    details     optional benchmark-specific measurements (e.g. a per-stage time breakdown)
"""
from __future__ import annotations

import argparse
import ctypes
import gc
import json
import math
import os
import platform
import shlex
import statistics
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from sparsegps.data.scene import Scene, SceneText, boxes_from_points
from sparsegps.files import atomic_write_text



def _scannet20() -> tuple[str, ...]:
    text = resources.files("sparsegps").joinpath("resources/scannet/benchmark_classes.json").read_text()
    return tuple(json.loads(text)["scannet20"]["names"])


# The label vocabulary of benchmark scenes: the 20 ScanNet benchmark classes, walls and floors first.
SCANNET20 = _scannet20()


# ------------------------------------------------------------------------------------- arguments

def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags every benchmark takes: device, quick mode, output folder, repeats, seed."""
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where models run")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes and one repeat: a smoke test that finishes in under a minute")
    parser.add_argument("--out", type=Path, default=None,
                        help="folder for <name>.json, <name>.md (and <name>.png); default: print only")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats (median is reported)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs before timing")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic scenes")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's choice)")


def resolve_common(args: argparse.Namespace, *, repeats: int = 3, warmup: int = 1) -> argparse.Namespace:
    """Fill in repeat counts (quick mode: one warm-up run, one timed run), set threads, check the device."""
    if args.repeats is None:
        args.repeats = 1 if args.quick else repeats
    if args.warmup is None:
        args.warmup = 1 if args.quick else warmup
    if args.repeats < 1 or args.warmup < 0:
        raise SystemExit("error: --repeats must be >= 1 and --warmup >= 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda was asked for but torch sees no CUDA device")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    return args


def command_line(name: str, argv: Sequence[str] | None) -> str:
    """The command that reproduces this run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return shlex.join(["sparsegps", "bench", name, *argv])


# ---------------------------------------------------------------------------------------- timing

def synchronize(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    """Wall times (seconds) of the timed repeats of one measurement."""

    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def spread(self) -> float:
        """(max - min) / median: how noisy the repeats were."""
        return (max(self.times) - min(self.times)) / self.median if self.median > 0 else 0.0

    def to_dict(self) -> dict:
        return {"seconds": self.median, "seconds_min": min(self.times), "seconds_max": max(self.times),
                "repeats": len(self.times)}


def time_call(fn: Callable[[], object], *, repeats: int, warmup: int, device: str = "cpu",
              before_each: Callable[[], object] | None = None) -> Timing:
    """Run `fn` `warmup` times untimed, then `repeats` times timed (device synchronised).

    `before_each` runs untimed before every timed repeat (e.g. dropping the page cache).
    """
    for _ in range(warmup):
        fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        if before_each is not None:
            before_each()
        gc.collect()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return Timing(times)


def time_interleaved(calls: dict[str, Callable[[], object]], *, repeats: int, warmup: int, device: str = "cpu",
                     before_each: Callable[[], object] | None = None) -> dict[str, Timing]:
    """Time several calls in rounds: each round runs every call once, in order, timed.

    On a machine shared with other work, load that changes during a run then slows every call
    alike, so ratios between them stay meaningful. `warmup` untimed runs of each call come first;
    `before_each` runs untimed before every timed call.
    """
    for fn in calls.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, fn in calls.items():
            if before_each is not None:
                before_each()
            gc.collect()
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            times[name].append(time.perf_counter() - start)
    return {name: Timing(t) for name, t in times.items()}


# ---------------------------------------------------------------------------------------- memory

CPU_MEMORY_METHOD = ("process RSS sampled every 1 ms by a background thread (psutil), peak minus the RSS "
                     "before the call, after malloc_trim(0) handed freed heap pages back to the OS (else "
                     "memory freed by earlier runs and reused would not show)")
CUDA_MEMORY_METHOD = "torch.cuda.max_memory_allocated during the call minus memory allocated before it"


class _RssSampler:
    """Peak resident set size of this process while the context is open, sampled in a thread."""

    def __init__(self, interval_s: float = 0.001):
        import psutil

        self.process = psutil.Process()
        self.interval_s = interval_s
        self.peak = 0
        self._stop = threading.Event()

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self):
        self.start = self.process.memory_info().rss
        self.peak = self.start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def _release_free_heap() -> None:
    """Return memory that glibc's allocator keeps after frees to the OS (no-op elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def peak_memory(fn: Callable[[], object], device: str = "cpu") -> int:
    """Peak extra memory (bytes) that one call of `fn` needs on `device` (see *_MEMORY_METHOD)."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return max(int(torch.cuda.max_memory_allocated() - base), 0)
    _release_free_heap()
    with _RssSampler() as sampler:
        fn()
    return max(int(sampler.peak - sampler.start), 0)


def memory_method(device: str) -> str:
    return CUDA_MEMORY_METHOD if torch.device(device).type == "cuda" else CPU_MEMORY_METHOD


# ----------------------------------------------------------------------------------------- FLOPs

def count_flops(fn: Callable[[], object]) -> int | None:
    """FLOPs of the aten matmul / convolution / attention ops `fn` runs (forward and, if `fn`
    calls backward, backward), via torch.utils.flop_counter.FlopCounterMode.

    Only ops dispatched through aten are seen: spconv's native algorithm (CPU) runs its
    gather-GEMM-scatter through torch.mm and is counted, its implicit-GEMM CUDA kernels are not.
    Returns None where the counter cannot run.
    """
    try:
        from torch.utils.flop_counter import FlopCounterMode
    except ImportError:
        return None
    try:
        with FlopCounterMode(display=False) as counter:
            fn()
    except RuntimeError:
        return None
    return int(counter.get_total_flops())


# --------------------------------------------------------------------------------------- machine

def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info(device: str = "cpu") -> dict:
    """What the numbers were measured on."""
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count()
    info = {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": usable,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "load_average_1m": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "device": device,
    }
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    info["summary"] = (info["gpu"] if "gpu" in info else
                       f"{info['cpu']}, {usable} usable cores, {info['torch_threads']} torch threads")
    return info


def load_note(machine: dict) -> str | None:
    """A caveat when other processes were competing for the CPU at the start or end of the run."""
    start, end = machine.get("load_average_1m"), machine.get("load_average_1m_end")
    cores = machine.get("cpu_cores_usable") or 1
    loads = [x for x in (start, end) if x is not None]
    if loads and max(loads) > 0.5 * cores:
        seen = " and ".join(f"{x:.2f} at the {when}" for x, when in ((start, "start"), (end, "end")) if x is not None)
        return (f"1-minute load average was {seen} of the run on {cores} cores: other processes may have slowed "
                "some measurements; ratios (same run, interleaved) are more reliable than absolute numbers")
    return None


# ------------------------------------------------------------------------------------ page cache

def drop_page_cache() -> bool:
    """Ask the kernel to drop clean page-cache pages (needs root); True if it did."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def directory_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


# ------------------------------------------------------------------------------ synthetic scenes

def random_room(scene_id: str, rng: np.random.Generator, *, num_objects: int, num_points: int,
                background_fraction: float = 0.35) -> Scene:
    """A box-shaped room: floor and four walls, `num_objects` boxes standing on the floor.

    Points are sampled on surfaces; object sizes (0.3-1.6 m) and colours are random. About
    `background_fraction` of the points are floor and walls, the rest is split between the objects
    in proportion to their surface area, so a scene has exactly `num_points` points. Each object
    gets an object caption and a referral; the scene gets a caption.
    """
    extent = np.array([rng.uniform(5.0, 8.0), rng.uniform(4.0, 7.0), rng.uniform(2.5, 3.0)], np.float32)
    sizes = rng.uniform([0.3, 0.3, 0.3], [1.6, 1.6, 1.6], size=(num_objects, 3)).astype(np.float32)
    sizes = np.minimum(sizes, extent[None] * 0.45)
    lows = rng.uniform(0.0, 1.0, size=(num_objects, 2)) * (extent[None, :2] - sizes[:, :2])
    mins = np.concatenate([lows, np.zeros((num_objects, 1))], axis=1).astype(np.float32)
    areas = 2 * (sizes[:, 0] * sizes[:, 1] + sizes[:, 1] * sizes[:, 2] + sizes[:, 0] * sizes[:, 2])
    n_background = int(round(num_points * background_fraction)) if num_objects else num_points
    counts = np.floor(areas / areas.sum() * (num_points - n_background)).astype(int) if num_objects else []
    n_background = num_points - int(np.sum(counts))

    xyz_parts, rgb_parts, inst_parts, sem_parts = [], [], [], []
    # Background: the floor (semantic 1) and the walls (semantic 0), as points on the room's box.
    n_floor = n_background // 3
    floor = rng.uniform([0, 0, 0], [extent[0], extent[1], 0], size=(n_floor, 3))
    wall = _box_surface(rng, np.zeros(3), extent, n_background - n_floor, faces=(0, 1, 2, 3))
    xyz_parts += [floor, wall]
    rgb_parts += [rng.normal(150, 12, size=(n_floor, 3)), rng.normal(210, 8, size=(len(wall), 3))]
    inst_parts += [np.full(n_floor, -1), np.full(len(wall), -1)]
    sem_parts += [np.full(n_floor, 1), np.full(len(wall), 0)]
    labels = {}
    for k in range(num_objects):
        label_index = int(rng.integers(2, len(SCANNET20)))
        pts = _box_surface(rng, mins[k], mins[k] + sizes[k], int(counts[k]), faces=(0, 1, 2, 3, 5))
        colour = rng.uniform(30, 225, size=3)
        xyz_parts.append(pts)
        rgb_parts.append(colour + rng.normal(0, 10, size=(len(pts), 3)))
        inst_parts.append(np.full(len(pts), k))
        sem_parts.append(np.full(len(pts), label_index))
        labels[k] = SCANNET20[label_index]
    xyz = np.concatenate(xyz_parts).astype(np.float32)
    order = rng.permutation(len(xyz))
    instance = np.concatenate(inst_parts).astype(np.int32)[order]
    xyz = xyz[order]
    objects = boxes_from_points(xyz, instance, labels)
    texts = [SceneText("scene_caption", f"a room with {num_objects} objects.")]
    for o in objects:
        texts.append(SceneText("object_caption", f"this is a {o.label}.", o.instance_id))
        texts.append(SceneText("referral", f"the {o.label} that is {o.size[2]:.1f} metres tall.", o.instance_id))
    return Scene(scene_id=scene_id, xyz=xyz,
                 rgb=np.clip(np.concatenate(rgb_parts), 0, 255).astype(np.uint8)[order],
                 instance=instance, semantic=np.concatenate(sem_parts).astype(np.int16)[order],
                 objects=objects, texts=texts)


def _box_surface(rng: np.random.Generator, lo: np.ndarray, hi: np.ndarray, n: int,
                 faces: Sequence[int]) -> np.ndarray:
    """`n` points uniformly on the chosen faces of an axis-aligned box (0-3 sides, 4 bottom, 5 top)."""
    lo, hi = np.asarray(lo, np.float64), np.asarray(hi, np.float64)
    size = hi - lo
    face_area = np.array([size[1] * size[2], size[1] * size[2], size[0] * size[2], size[0] * size[2],
                          size[0] * size[1], size[0] * size[1]])[list(faces)]
    face = np.asarray(faces)[rng.choice(len(faces), size=n, p=face_area / face_area.sum())]
    pts = lo + rng.uniform(size=(n, 3)) * size
    axis = np.array([0, 0, 1, 1, 2, 2])[face]
    at_high = np.isin(face, (1, 3, 5))
    pts[np.arange(n), axis] = np.where(at_high, hi[axis], lo[axis])
    return pts


def synthetic_scenes(num_scenes: int, *, num_objects: int, num_points: int, seed: int,
                     prefer_generator: bool = False) -> tuple[Iterator[Scene], str]:
    """A stream of `num_scenes` seeded scenes (with a progress bar) and where they come from.

    With `prefer_generator`, the procedural rooms of `sparsegps.synth` (default `SynthConfig`,
    ScanNet-like sizes) are used when that package is installed, and `num_objects` and
    `num_points` are ignored; otherwise `random_room` makes scenes of exactly these sizes.
    """
    if prefer_generator:
        try:
            from sparsegps.synth import SynthConfig, generate_scene
        except ImportError:
            pass
        else:
            cfg = SynthConfig(seed=seed)
            stream = (generate_scene(cfg, i) for i in range(num_scenes))
            return (tqdm(stream, total=num_scenes, desc="generating scenes", unit="scene", leave=False),
                    f"sparsegps.synth.generate_scene (default SynthConfig, seed {seed})")
    rng = np.random.default_rng(seed)
    stream = (random_room(f"room_{i:05d}", rng, num_objects=num_objects, num_points=num_points)
              for i in range(num_scenes))
    return (tqdm(stream, total=num_scenes, desc="generating scenes", unit="scene", leave=False),
            f"random_room ({num_objects} objects, {num_points} points per scene, seed {seed})")


# ----------------------------------------------------------------------------------------- output

def ratio(baseline_seconds: float, seconds: float) -> float:
    """How many times faster than the baseline (same work): baseline time / time."""
    return baseline_seconds / seconds if seconds > 0 else math.inf


def target(name: str, measured_ratio: float, wanted: float, higher_is_better: bool = True) -> dict:
    met = measured_ratio >= wanted if higher_is_better else measured_ratio <= wanted
    return {"name": name, "ratio": measured_ratio, "target": wanted, "met": bool(met)}


def _format(value) -> str:
    if isinstance(value, float):
        if value == 0 or math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if value is None:
        return "-"
    return str(value)


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join(" --- " for _ in columns) + "|"]
    for row in rows:
        lines.append("| " + " | ".join(_format(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def markdown_report(result: dict, columns: Sequence[str]) -> str:
    lines = [f"### {result['benchmark']}", "", f"`{result['command']}`", "",
             f"Machine: {result['machine']['summary']}. Baseline: {result['baseline']}.", "",
             markdown_table(result["rows"], columns), ""]
    for t in result["targets"]:
        lines.append(f"- target {t['name']}: {t['ratio']:.2f}x measured, {t['target']}x wanted: "
                     f"{'met' if t['met'] else 'NOT met'}")
    for note in result["notes"]:
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


@dataclass
class Result:
    """What one benchmark run produced; `finish` fills in the machine and writes the files."""

    benchmark: str
    command: str
    config: dict
    baseline: str
    rows: list[dict] = field(default_factory=list)
    targets: list[dict] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    details: dict = field(default_factory=dict)

    def to_dict(self, machine: dict) -> dict:
        d = asdict(self)
        d["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in self.config.items()}
        d["machine"] = machine
        d["created"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        return d


def finish(result: Result, machine: dict, columns: Sequence[str], out: Path | None,
           plot: Callable[[dict, Path], None] | None = None) -> dict:
    """Print the markdown table; with `out`, write <name>.json, <name>.md and (if `plot`) <name>.png."""
    if hasattr(os, "getloadavg"):
        machine = {**machine, "load_average_1m_end": os.getloadavg()[0]}
    note = load_note(machine)
    if note:
        result.notes.append(note)
    data = result.to_dict(machine)
    report = markdown_report(data, columns)
    print(report)
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        stem = result.benchmark.replace("-", "_")
        atomic_write_text(out / f"{stem}.json", json.dumps(data, indent=1, default=_json_default))
        atomic_write_text(out / f"{stem}.md", report)
        if plot is not None:
            png = out / f"{stem}.png"
            tmp = png.with_name(png.stem + ".tmp.png")
            plot(data, tmp)
            os.replace(tmp, png)
    return data


def _json_default(value):
    if isinstance(value, (np.integer,)):
        return int(value)
    if isinstance(value, (np.floating,)):
        return float(value)
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def bar_chart(path: Path, labels: Sequence[str], values: Sequence[float], *, ylabel: str, title: str,
              highlight: Sequence[bool] | None = None) -> None:
    """A horizontal bar chart (matplotlib, Agg backend) of one value per configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.45 * len(labels) + 1.5))
    colours = ["tab:orange" if h else "tab:blue" for h in (highlight or [False] * len(labels))]
    y = np.arange(len(labels))
    ax.barh(y, values, color=colours)
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    ax.set_xlabel(ylabel)
    ax.set_title(title)
    for yi, v in zip(y, values):
        ax.text(v, yi, f" {v:.3g}", va="center", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=110)
    plt.close(fig)


def main_for(module, name: str, argv: Sequence[str] | None = None) -> dict:
    """Parse `argv` with the module's `add_arguments` and run it (what `python -m` does)."""
    parser = argparse.ArgumentParser(prog=f"sparsegps bench {name}", description=module.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    return module.run(args)
