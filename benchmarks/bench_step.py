"""Where one pre-training step's time goes, by component, forward and backward apart.

    sparsegps bench step [--config configs/pretrain/tiny_cpu.yaml] [--set KEY=VALUE ...]
                         [--variant LABEL KEY=VALUE [KEY=VALUE ...]] [--threads 2] [--out DIR]

Seeded rooms of the `sparsegps.synth` demo preset are written to a temporary store (or `--data`
names a store) and read through `ScenesDataset` with the config's transforms and class hold-out; a
step is one micro-batch through the single-process DeepSpeed engine that `sparsegps pretrain`
builds (`train.run.build_engine`, no ZeRO), as in training.

Each form of the model (the config as given, then every `--variant`, a list of overrides on top of
it) is timed in interleaved rounds (one step of each per round, the same scenes in the same order),
so load that changes during the run slows them alike; `ratio_vs_baseline` is the first form's
median step time over each form's. Then `--profile-steps` more steps of each run under
`torch.profiler`, and every operation is attributed to the component that ran it:

    forward     each component's module (or loss) is a profiler scope (`record_function`, opened by
                forward hooks); a scope's time is its wall time (its GPU kernels' time on CUDA) less
                that of the scopes inside it; `model (other)` is the forward outside every scope
    backward    an autograd node carries the sequence number of the forward operation that made it,
                so the node's time goes to that operation's component; `backward (other)` is what
                no forward operation made (gradient accumulation into leaves, hooks)
    data        ScenesDataset items + collate_scenes + move to the device, in the training process
    optimizer   `engine.step()`: clipping, AdamW, the scheduler

Profiled steps are interleaved as well (one of each form per round). Component times are their means: the profiler itself adds time per operation, so
their sum exceeds the unprofiled step (the ratio is reported as `profiler_overhead`); compare
shares within one table, and whole steps by the unprofiled `seconds`.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import shutil
import statistics
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from sparsegps.benchmarks.arguments import add_common_arguments, command_line, configs_folder, main_for, resolve_common
from sparsegps.benchmarks.machine import machine_info
from sparsegps.benchmarks.report import Result, finish, markdown_table, ratio, save_figure, target
from sparsegps.benchmarks.scenes import write_demo_store
from sparsegps.benchmarks.timing import timed_training_step

NAME = "step"
SCOPE = "sparsegps/"
# GPSModel's parts, each attributed to one component (a module missing from a config is skipped).
MODULE_COMPONENTS = {
    "backbone": "U-Net", "pooling": "pooling", "spatial": "spatial transformer", "text": "text encoder",
    "text_to_model": "grounding encoder", "grounding": "grounding encoder", "grounding_head": "grounding head",
    "mlm_head": "MLM head", "object_proj": "projections", "scene_proj": "projections", "text_proj": "projections",
    "fused_proj": "projections", "object_class_proj": "projections", "dense_proj": "projections",
}
# GPSCriterion's parts.
LOSS_COMPONENTS = {"_referral_losses": "loss: grounding, referral, MLM",
                   "_text_contrast": "loss: object-text, region-text", "_scene_text": "loss: scene-text",
                   "_object_class": "loss: object class", "_dense_text": "loss: dense text"}
MODEL_OTHER, LOSS_OTHER, BACKWARD_OTHER = "model (other)", "loss (other)", "backward (other)"
ORDER = ("data", "U-Net", "pooling", "spatial transformer", "text encoder", "grounding encoder", "grounding head",
         "MLM head", "projections", *LOSS_COMPONENTS.values(), LOSS_OTHER, MODEL_OTHER, BACKWARD_OTHER, "optimizer")
QUICK_OVERRIDES = ["model.text.num_layers=1", "model.spatial_layers=1", "model.grounding_layers=1",
                   "micro_batch=2", "global_batch=2"]
QUICK_MIN_VOXEL = 0.12


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--config", type=Path, default=None,
                        help="pre-training YAML (default configs/pretrain/tiny_cpu.yaml on CPU, base_gpu.yaml on CUDA)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a key of the pre-training config, for every form")
    parser.add_argument("--variant", action="append", nargs="+", default=[], metavar="LABEL KEY=VALUE",
                        help="another form to time against the config as given: a label, then overrides")
    parser.add_argument("--data", type=Path, default=None,
                        help="a store to read scenes from (default: demo rooms synthesized into a temporary store)")
    parser.add_argument("--scenes", type=int, default=None,
                        help="scenes read (cycled through; default 64, quick 4)")
    parser.add_argument("--profile-steps", type=int, default=None,
                        help="profiled steps of each form for the component table (default 3, quick 1)")


# ------------------------------------------------------------------------------------ scopes

class Scopes:
    """Profiler scopes around the model's components and the criterion's losses, while installed.

    A forward pre-hook opens `record_function(SCOPE + component)` and a forward hook closes it, so
    every operation a module runs (and the autograd nodes it makes) falls inside its scope."""

    def __init__(self, model: torch.nn.Module, criterion):
        self.handles, self.open, self.restore = [], [], []
        for attr, component in MODULE_COMPONENTS.items():
            module = getattr(model, attr, None)
            if isinstance(module, torch.nn.Module):
                self.handles.append(module.register_forward_pre_hook(self._opener(component), prepend=True))
                self.handles.append(module.register_forward_hook(self._close, always_call=True))
        self._wrap(model.text, "tokenize", "text encoder")
        for method, component in LOSS_COMPONENTS.items():
            self._wrap(criterion, method, component)

    def _opener(self, component: str):
        def open_scope(*_):
            scope = torch.profiler.record_function(SCOPE + component)
            scope.__enter__()
            self.open.append(scope)
        return open_scope

    def _close(self, *_):
        self.open.pop().__exit__(None, None, None)

    def _wrap(self, owner, name: str, component: str) -> None:
        original = getattr(owner, name)

        def scoped(*args, **kwargs):
            with torch.profiler.record_function(SCOPE + component):
                return original(*args, **kwargs)
        object.__setattr__(owner, name, scoped)
        self.restore.append((owner, name))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for owner, name in self.restore:
            object.__delattr__(owner, name)


def _duration_us(event, cuda: bool) -> float:
    return float(event.device_time_total) if cuda else float(event.time_range.elapsed_us())


def _scope_of(event) -> str | None:
    while event is not None:
        if event.name.startswith(SCOPE):
            return event.name[len(SCOPE):]
        event = event.cpu_parent
    return None


def attribute(events, cuda: bool) -> tuple[dict[str, float], dict[str, float]]:
    """Forward and backward microseconds per component from the profiler's events (see the module's
    docstring). Forward: each scope's time less that of its nearest scopes inside; `model (other)`:
    the `forward` scope's remainder, `loss (other)`: the `criterion` scope's. Backward: each autograd
    node's time to the component of the forward operation with its sequence number."""
    forward: dict[str, float] = defaultdict(float)
    backward: dict[str, float] = defaultdict(float)
    made_by: dict[tuple[int, int], str] = {}
    for event in events:
        if event.name.startswith(SCOPE):
            own = event.name[len(SCOPE):]
            forward[own] += _duration_us(event, cuda)
            parent = _scope_of(event.cpu_parent)
            if parent is not None:
                forward[parent] -= _duration_us(event, cuda)
        elif event.sequence_nr >= 0 and not event.name.startswith("autograd::engine::evaluate_function"):
            scope = _scope_of(event)
            if scope is not None:
                made_by.setdefault((event.thread, event.sequence_nr), scope)
    for event in events:
        if event.name.startswith("autograd::engine::evaluate_function"):
            scope = made_by.get((event.fwd_thread, event.sequence_nr))
            if scope in ("forward", "criterion"):
                scope = MODEL_OTHER if scope == "forward" else LOSS_OTHER
            backward[scope or BACKWARD_OTHER] += _duration_us(event, cuda)
    forward[MODEL_OTHER] += forward.pop("forward", 0.0)
    forward[LOSS_OTHER] += forward.pop("criterion", 0.0)
    return dict(forward), dict(backward)


# ------------------------------------------------------------------------------------- forms

@dataclasses.dataclass
class Form:
    """One form of the model: its engine and criterion, and the steps it ran."""

    label: str
    overrides: list[str]
    cfg: object
    engine: object
    criterion: object
    dataset: object
    device: torch.device
    step_times: list[dict] = dataclasses.field(default_factory=list)
    next_scene: int = 0

    def step(self, record: bool = True) -> dict:
        n, micro = len(self.dataset), self.cfg.micro_batch
        indices = [(self.next_scene + j) % n for j in range(micro)]
        self.next_scene = (self.next_scene + micro) % n
        batch, times = timed_training_step(self.engine, self.dataset, indices, self.device, self.cfg.precision,
                                           self._loss, self.label)
        times["voxels"] = int(batch["coords"].shape[0])
        if record:
            self.step_times.append(times)
        return times

    def _loss(self, batch: dict) -> torch.Tensor:
        with torch.profiler.record_function(SCOPE + "forward"):
            outputs = self.engine(batch)
        with torch.profiler.record_function(SCOPE + "criterion"):
            return self.criterion(outputs, batch)["loss"]


def build_form(label: str, overrides: list[str], config_path: Path, store: Path, device: torch.device,
               out: Path) -> Form:
    from sparsegps.config import ConfigError, load_config
    from sparsegps.criterion import GPSCriterion
    from sparsegps.models.gps import GPSModel
    from sparsegps.train.engine import gps_role, optimizer_groups
    from sparsegps.train.pretrain import PretrainConfig, PretrainTask, training_set
    from sparsegps.train.run import Run, build_engine, resolve_precision

    try:
        cfg = load_config(PretrainConfig, config_path, [*overrides, f"data.train=[{store}]", "data.val=[]",
                                                        f"device={device.type}", "deepspeed=null"])
    except ConfigError as e:
        raise SystemExit(f"error: {label}: {e}") from None
    task = PretrainTask(cfg)
    task.configure()  # class names from the store, held-out classes checked
    cfg = dataclasses.replace(task.cfg, global_batch=task.cfg.micro_batch,
                              precision=resolve_precision(task.cfg.precision, device))
    dataset = training_set(cfg)
    torch.manual_seed(cfg.seed)
    model = GPSModel(cfg.model)
    run = Run(cfg, device, cfg.precision, rank=0, world=1, grad_accum=1, out=out)
    engine, _ = build_engine(run, model, optimizer_groups(model, gps_role, cfg.optim.no_decay), cfg.optim)
    engine.train()
    return Form(label, overrides, cfg, engine, GPSCriterion.of(cfg.model), dataset, device)


def profile_step(form: Form) -> tuple[dict, dict, dict]:
    """One profiled step of `form`: its forward and backward microseconds per component, and its
    unprofiled regions' seconds."""
    from torch.profiler import ProfilerActivity, profile

    cuda = form.device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    scopes = Scopes(form.engine.module, form.criterion)
    try:
        with profile(activities=activities) as prof:
            measured = form.step(record=False)
    finally:
        scopes.remove()
    forward, backward = attribute(prof.events(), cuda)
    return forward, backward, measured


def component_table(profiled: list[tuple[dict, dict, dict]]) -> dict:
    """Mean milliseconds per step of each component over profiled steps (`profile_step`)."""
    steps = len(profiled)
    forward, backward = defaultdict(float), defaultdict(float)
    for fwd, bwd, _ in profiled:
        for k, v in fwd.items():
            forward[k] += v
        for k, v in bwd.items():
            backward[k] += v
    measured = [m for _, _, m in profiled]
    rows = {}
    for component in ORDER:
        if component == "data":
            fwd, bwd = statistics.fmean(m["data"] for m in measured) * 1e6, 0.0
        elif component == "optimizer":
            fwd, bwd = statistics.fmean(m["optimizer"] for m in measured) * 1e6, 0.0
        else:
            fwd, bwd = forward.get(component, 0.0) / steps, backward.get(component, 0.0) / steps
        if fwd or bwd:
            rows[component] = {"forward_ms": fwd / 1e3, "backward_ms": bwd / 1e3, "total_ms": (fwd + bwd) / 1e3}
    total = sum(r["total_ms"] for r in rows.values())
    for r in rows.values():
        r["share"] = r["total_ms"] / total if total else 0.0
    profiled_step = statistics.fmean(sum(m[k] for k in ("data", "forward", "backward", "optimizer"))
                                     for m in measured)
    return {"components": rows, "profiled_step_seconds": profiled_step}


# --------------------------------------------------------------------------------------- run

def run(args: argparse.Namespace) -> dict:
    from sparsegps.train.engine import init_distributed

    resolve_common(args, repeats=10, warmup=3)
    profile_steps = args.profile_steps or (1 if args.quick else 3)
    device = torch.device(args.device)
    config_path = args.config or configs_folder() / "pretrain" / (
        "base_gpu.yaml" if device.type == "cuda" else "tiny_cpu.yaml")
    base = (QUICK_OVERRIDES if args.quick else []) + list(args.set)
    forms_asked = [("as configured", base)] + [(v[0], base + v[1:]) for v in args.variant]
    if len({label for label, _ in forms_asked}) != len(forms_asked):
        raise SystemExit("error: --variant labels must differ from each other and from 'as configured'")
    scenes_n = args.scenes or (4 if args.quick else 64)
    init_distributed(device.type)
    root = Path(tempfile.mkdtemp(prefix="sparsegps-bench-step-"))
    try:
        if args.data is not None:
            store, source = args.data, str(args.data)
        else:
            store = root / "shards"
            source = write_demo_store(store, scenes_n, args.seed)
        forms = []
        for label, overrides in tqdm(forms_asked, desc="building forms", unit="form", leave=False):
            forms.append(build_form(label, overrides, config_path, store, device, root / "run"))
        if args.quick:
            for form in forms:
                _coarsen(form)
        for form in forms:
            for _ in range(max(args.warmup, 1)):
                form.step(record=False)
        gc.collect()
        gc.freeze()
        try:
            for _ in tqdm(range(args.repeats), desc="timing steps", unit="round", leave=False):
                for form in forms:
                    form.step()
            profiled: dict[str, list] = {form.label: [] for form in forms}
            for _ in tqdm(range(profile_steps), desc="profiling steps", unit="round", leave=False):
                for form in forms:  # interleaved too: each form's profile sees the same machine
                    profiled[form.label].append(profile_step(form))
            profiles = {label: component_table(steps) for label, steps in profiled.items()}
        finally:
            gc.unfreeze()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    machine = machine_info(args.device)
    result = Result(NAME, command_line(NAME, getattr(args, "argv", None)), dict(vars(args)),
                    baseline="the config as given ('as configured'), timed in the same rounds")
    result.config.update(pretrain_config=str(config_path), overrides=base, scenes=scenes_n,
                         profile_steps=profile_steps, micro_batch=forms[0].cfg.micro_batch,
                         voxel_size=forms[0].cfg.data.transforms.voxel_size)
    rows = [_row(form, profiles[form.label]) for form in forms]
    for row in rows:
        row["ratio_vs_baseline"] = ratio(rows[0]["seconds"], row["seconds"])
    for row in rows[1:]:
        result.targets.append(target(f"{row['method']} vs as configured, scenes/s", row["ratio_vs_baseline"], 1.0))
    result.rows = rows
    result.details = {"components": {form.label: profiles[form.label]["components"] for form in forms},
                      "overrides": {form.label: form.overrides for form in forms}}
    result.notes += [
        f"scenes: {scenes_n} rooms from {source} through ScenesDataset (the config's transforms, augmentation on, "
        f"its held-out classes); micro-batch {forms[0].cfg.micro_batch}; every form reads the same scenes in the "
        "same order",
        "seconds: median wall time of a whole unprofiled step (data, forward with losses, backward, optimizer); "
        "compute_seconds: its mean without data (what DataLoader workers leave when they hide data preparation)",
        f"components: means over {profile_steps} profiled step(s); forward = the component's profiler scope less "
        "the scopes inside it; backward = the autograd nodes made by its forward operations (by sequence "
        "number); profiler_overhead = profiled step time / unprofiled step time",
    ]
    data = finish(result, machine, ["method", "micro_batch", "seconds", "compute_seconds", "scenes_per_s",
                                    "profiler_overhead", "ratio_vs_baseline"], args.out, plot=_plot,
                  extra_markdown=_component_tables(result.details["components"]))
    return data


def _coarsen(form: Form) -> None:
    """Quick mode: voxels of at least QUICK_MIN_VOXEL."""
    from sparsegps.data.transforms import build_transforms

    cfg = form.cfg.data.transforms
    if cfg.voxel_size < QUICK_MIN_VOXEL:
        cfg.voxel_size = QUICK_MIN_VOXEL
        form.dataset.transforms = build_transforms(cfg)


def _row(form: Form, profile: dict) -> dict:
    steps = form.step_times
    totals = [t["data"] + t["forward"] + t["backward"] + t["optimizer"] for t in steps]
    median = statistics.median(totals)
    compute = statistics.fmean(t["forward"] + t["backward"] + t["optimizer"] for t in steps)
    return {"method": form.label, "micro_batch": form.cfg.micro_batch, "seconds": median,
            "seconds_min": min(totals), "seconds_max": max(totals), "repeats": len(steps),
            "compute_seconds": compute, "scenes_per_s": form.cfg.micro_batch / median,
            "compute_scenes_per_s": form.cfg.micro_batch / compute,
            "voxels_per_step": statistics.fmean(t["voxels"] for t in steps),
            "region_seconds": {k: statistics.fmean(t[k] for t in steps) for k in ("data", "forward", "backward",
                                                                                   "optimizer")},
            "profiler_overhead": profile["profiled_step_seconds"] / statistics.fmean(totals)}


def _component_tables(components: dict[str, dict]) -> str:
    parts = []
    for label, rows in components.items():
        table = [{"component": name, **{k: v for k, v in r.items()}} for name, r in rows.items()]
        table.append({"component": "sum", "forward_ms": sum(r["forward_ms"] for r in rows.values()),
                      "backward_ms": sum(r["backward_ms"] for r in rows.values()),
                      "total_ms": sum(r["total_ms"] for r in rows.values()), "share": 1.0})
        parts.append(f"**{label}**: milliseconds per step (profiled)\n\n"
                     + markdown_table(table, ["component", "forward_ms", "backward_ms", "total_ms", "share"]))
    return "\n\n".join(parts)


def _plot(data: dict, path: Path) -> None:
    """Stacked bars, one per form: each component's time per profiled step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    components = data["details"]["components"]
    labels = list(components)
    names = [c for c in ORDER if any(c in rows for rows in components.values())]
    fig, ax = plt.subplots(figsize=(9, 0.6 * len(labels) + 2.6))
    cmap = plt.get_cmap("tab20")
    left = [0.0] * len(labels)
    for k, name in enumerate(names):
        widths = [components[label].get(name, {}).get("total_ms", 0.0) for label in labels]
        ax.barh(labels, widths, left=left, label=name, color=cmap(k % 20))
        left = [a + b for a, b in zip(left, widths)]
    for y, row in enumerate(data["rows"]):
        ax.text(left[y], y, f" {row['scenes_per_s']:.3g} scenes/s", va="center", fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, max(left) * 1.3)
    ax.set_xlabel("milliseconds per profiled step")
    ax.set_title(f"Pre-training step by component ({data['machine']['summary']})", fontsize=9)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=4)
    save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    return main_for(sys.modules[__name__], NAME, argv)


if __name__ == "__main__":
    main()
