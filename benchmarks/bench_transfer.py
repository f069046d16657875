"""What pre-training buys a segmentation backbone, measured as the field measures it: `sparsegps bench transfer`.

The protocol of ScanNet's data-efficient benchmark (labels scarce: a few labelled points per room,
or a few rooms; the linear probe) and of open-vocabulary segmentation (PLA: the novel classes'
labels withheld in pre-training, the language that names them kept), on the disjoint stores of
`sparsegps.synth.splits` (pre-training, fine-tuning, validation, test):

1. **pre-training**: each preset (`language`: texts only; `objects`: + object classes; `dense`: +
   per-voxel classes) once per pre-training seed, long (its room-visits at least
   `MIN_PRETRAIN_RATIO` times those of a fine-tuning arm), with `data.holdout=labels` (the
   `HOLDOUT_CLASSES`' labels withheld, every text kept); the zero-shot presets also with
   `data.holdout=strict` (their texts removed too), reported beside;
2. **learning rates**: each (arm, model) chooses its own on the validation rooms (pre-training
   seed 0, fine-tuning seed 0) from `--lrs`, extended by one step at a time while the best is at
   an edge (at most `MAX_EXTENSIONS` times);
3. **fine-tuning arms** (`ARMS`), each from every export and from scratch (a randomly initialised
   backbone with the same head), for `--seeds` fine-tuning seeds x `--pretrain-seeds`, scored on
   the test rooms;
4. **zero-shot**: each zero-shot preset's export segments the test rooms by class name: mIoU of
   the base classes, of the novel (held-out) ones, hIoU, against guessing by the classes' point
   shares.

Results: mean ± sd over fine-tuning x pre-training seeds of test mIoU per (arm, model), and of the
difference to scratch paired by fine-tuning seed; JSON, markdown and a PNG (test mIoU against
labelled points per room, one line per model). Every job is a `sparsegps` command in its own
process (`sparsegps.recipes.steps`): pre-trainings run alone on every core as local ranks, and
continue from their checkpoints (`--resume auto`) when the benchmark is started again; a job whose
result exists is never run again. `--budget-minutes` ends a sitting: no job starts after it, the
running ones finish, and the same command later continues. `--quick` is a smoke test.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sparsegps.files import atomic_write_text
from sparsegps.recipes.steps import Job, Jobs, OutOfTime, command, local_ranks
from sparsegps.synth.splits import HOLDOUT_CLASSES, check_disjoint, synth_command

from .arguments import command_line
from .machine import machine_info

PRESET_CONFIGS = {"language": "pretrain/tiny_cpu_language.yaml", "objects": "pretrain/tiny_cpu_objects.yaml",
                  "dense": "pretrain/tiny_cpu.yaml"}
ZERO_SHOT_PRESETS = ("dense",)  # presets with a zero-shot segmenter (the dense_text loss)
PRETRAIN_BATCH = 8  # rooms per pre-training step (tiny_cpu's global batch)
FINETUNE_BATCH = 8  # rooms per fine-tuning step, by default (seg/synthetic_cpu.yaml's)
MIN_PRETRAIN_RATIO = 5.0  # pre-training room-visits over a fine-tuning arm's, at least (the field: 10-30)
MAX_EXTENSIONS = 2  # learning-rate grid extensions per (arm, model)


@dataclass(frozen=True)
class Arm:
    """One fine-tuning setting: which labels it sees and what it trains."""

    name: str
    points: int | None = None  # labelled points per room (None: every point)
    rooms: int | None = None  # the first rooms of the fine-tuning store (None: all)
    linear_probe: bool = False  # frozen backbone, linear head

    def settings(self) -> dict[str, object]:
        out: dict[str, object] = {}
        if self.points is not None:
            out["data.labelled_points"] = self.points
        if self.rooms is not None:
            out["data.rooms"] = self.rooms
        if self.linear_probe:
            out.update({"freeze": "backbone", "model.head": "linear"})
        return out

    def labels(self, finetune_rooms: int) -> str:
        """The labels this arm consumes, in words."""
        rooms = self.rooms or finetune_rooms
        per_room = f"{self.points} labelled points" if self.points else "every point labelled"
        return f"{rooms} rooms, {per_room}" + (" (frozen backbone, linear head)" if self.linear_probe else "")


def arms(args) -> list[Arm]:
    return ([Arm(f"points{n}", points=n) for n in args.points] + [Arm(f"rooms{args.few_rooms}", rooms=args.few_rooms)]
            + [Arm("linear", linear_probe=True)])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/bench/transfer"), help="working and report folder")
    parser.add_argument("--configs", type=Path, default=Path("configs"), help="folder of the YAML configs")
    parser.add_argument("--presets", nargs="+", default=list(PRESET_CONFIGS), choices=list(PRESET_CONFIGS))
    parser.add_argument("--pretrain-seeds", type=int, default=2, help="pre-trainings per preset")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per (arm, model, pre-training)")
    parser.add_argument("--pretrain-steps", type=int, default=750, help=f"{PRETRAIN_BATCH} rooms per step")
    parser.add_argument("--steps", type=int, default=120, help="fine-tuning steps of every arm, --finetune-batch "
                                                               "rooms per step")
    parser.add_argument("--points", type=int, nargs="+", default=[20, 200], help="labelled points per room, one arm "
                                                                                 "each")
    parser.add_argument("--few-rooms", type=int, default=16, help="rooms of the limited-rooms arm, fully labelled")
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-3, 6e-3, 2e-2],
                        help="learning-rate grid (geometric), extended while the best is at an edge")
    parser.add_argument("--strict", action=argparse.BooleanOptionalAction, default=True,
                        help="also pre-train the zero-shot presets under data.holdout=strict")
    parser.add_argument("--finetune-batch", type=int, default=FINETUNE_BATCH, help="rooms per fine-tuning step")
    parser.add_argument("--pretrain-rooms", type=int, default=2000)
    parser.add_argument("--finetune-rooms", type=int, default=160)
    parser.add_argument("--val-rooms", type=int, default=40)
    parser.add_argument("--test-rooms", type=int, default=40)
    parser.add_argument("--jobs", type=int, default=2, help="fine-tuning commands at once (the cores shared)")
    parser.add_argument("--budget-minutes", type=float, default=None,
                        help="start no job after this many minutes; the same command later continues")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny stores, a few steps, 1 seed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stores")


def _quick(args) -> None:
    args.pretrain_seeds, args.seeds, args.steps, args.lrs = 1, 1, 2, [3e-3]
    args.pretrain_steps, args.pretrain_rooms, args.finetune_rooms = 2, 8, 6
    args.points, args.few_rooms, args.finetune_batch = [20], 3, 2
    args.val_rooms = args.test_rooms = 3


class Plan:
    """The benchmark's jobs and where their results lie."""

    def __init__(self, args):
        self.args, self.out, self.configs = args, args.out, args.configs
        counts = {"pretrain": args.pretrain_rooms, "finetune": args.finetune_rooms, "val": args.val_rooms,
                  "test": args.test_rooms}
        self.stores = {name: args.out / "data" / name for name in counts}
        self.synths = [Job(f"synth_{name}", synth_command(name, n, self.stores[name], args.seed),
                           result=self.stores[name] / "index.json") for name, n in counts.items()]
        self.arms = arms(args)
        self.models = ["scratch", *args.presets]

    def holdouts(self, preset: str) -> list[str]:
        return ["labels", "strict"] if preset in ZERO_SHOT_PRESETS and self.args.strict else ["labels"]

    def pretrain_dir(self, preset: str, holdout: str, seed: int) -> Path:
        return self.out / "pretrain" / preset / holdout / f"seed{seed}"

    def pretraining(self, cores: int) -> list[Job]:
        """Pre-training (each alone on every core, as local ranks; continued from its checkpoints when
        started again) and the zero-shot evaluation of each export."""
        args, jobs = self.args, []
        ranks = 1 if args.quick else local_ranks(PRETRAIN_BATCH, cores)
        for seed in range(args.pretrain_seeds):
            for preset in args.presets:
                for mode in self.holdouts(preset):
                    run, name = self.pretrain_dir(preset, mode, seed), f"pretrain/{preset}/{mode}/seed{seed}"
                    jobs.append(Job(name, command("pretrain", {
                        "steps": args.pretrain_steps, "seed": seed, "data.train": [self.stores["pretrain"]],
                        "data.val": [], "data.holdout_classes": HOLDOUT_CLASSES, "data.holdout": mode,
                        "micro_batch": PRETRAIN_BATCH // ranks, "num_workers": 0,
                        "checkpoint_every": max(1, args.pretrain_steps // 5), "keep_checkpoints": 1},
                        config=self.configs / PRESET_CONFIGS[preset], output_dir=run, resume="auto"),
                        ["synth_pretrain"], run / "summary.json", exclusive=True, ranks=ranks))
                    if preset in ZERO_SHOT_PRESETS:
                        zero = self.out / "zero_shot" / preset / mode / f"seed{seed}"
                        jobs.append(Job(f"zero_shot/{preset}/{mode}/seed{seed}", command(
                            "eval-seg", checkpoint=run / "export.safetensors", data=self.stores["test"],
                            zero_shot=True, out=zero), [name, "synth_test"], zero / "seg_report.json"))
        return jobs

    def finetune(self, arm: Arm, model: str, pretrain_seed: int | None, seed: int, lr: float, split: str) -> Job:
        """`finetune-seg` of `arm` from `model` (scratch: a fresh backbone; else the export of that
        preset's `labels` pre-training of `pretrain_seed`), scored on `split`."""
        origin = "scratch" if model == "scratch" else f"{model}/p{pretrain_seed}"
        name = f"finetune/{split}/{arm.name}/{origin}/s{seed}/lr{lr:g}"
        run = self.out / name
        config = "seg/synthetic_cpu_scratch.yaml" if model == "scratch" else "seg/synthetic_cpu.yaml"
        # a fine-tuning stopped half-way is run again from its start (--overwrite); it has no result yet
        settings = {"data.train": [self.stores["finetune"]], "data.val": [self.stores[split]],
                    "steps": self.args.steps, "seed": seed, "num_workers": 0, "micro_batch": self.args.finetune_batch,
                    "global_batch": self.args.finetune_batch, "checkpoint_every": self.args.steps,
                    "optim.lr_backbone": float(lr), "optim.lr_heads": float(lr), **arm.settings()}
        after, pretrained = ["synth_finetune", f"synth_{split}"], None
        if model != "scratch":
            after.append(f"pretrain/{model}/labels/seed{pretrain_seed}")
            pretrained = self.pretrain_dir(model, "labels", pretrain_seed) / "export.safetensors"
            if not arm.linear_probe:  # the head scratch has: class names through the text encoder
                init = "zero_shot" if model in ZERO_SHOT_PRESETS else "text"
                settings.update({"model.head": "language", "model.head_init": init})
        return Job(name, command("finetune-seg", settings, config=self.configs / config, output_dir=run, overwrite=True,
                                 pretrained=pretrained), after, run / "summary.json")


def score(job: Job) -> float:
    return json.loads(job.result.read_text())["seg_miou"]


def extend(grid: list[float], best: float) -> float | None:
    """The next learning rate beyond the edge of `grid` where `best` lies (None: best is inside)."""
    grid = sorted(grid)
    if len(grid) < 2 or grid[0] < best < grid[-1]:
        return None
    ratio = grid[1] / grid[0]
    return best * ratio if best == grid[-1] else best / ratio


def run(args) -> dict:
    if args.quick:
        _quick(args)
    ratio = args.pretrain_steps * PRETRAIN_BATCH / (args.steps * args.finetune_batch)
    if not args.quick and ratio < MIN_PRETRAIN_RATIO:
        raise SystemExit(f"error: pre-training visits {ratio:.1f}x the rooms of a fine-tuning arm; the protocol "
                         f"asks for at least {MIN_PRETRAIN_RATIO:g}x (raise --pretrain-steps or lower --steps)")
    args.out.mkdir(parents=True, exist_ok=True)
    check_settings(args)
    start = time.perf_counter()
    plan = Plan(args)
    runner = Jobs(args.out / "logs", parallel=args.jobs,
                  deadline=None if args.budget_minutes is None else start + 60 * args.budget_minutes)

    def submit(jobs: list[Job]) -> None:
        for job in jobs:
            runner.add(job)
        runner.wait()

    try:
        submit(plan.synths + plan.pretraining(runner.cores))
        check_disjoint(plan.stores)
        chosen = choose_learning_rates(plan, submit)
        tests = [plan.finetune(arm, model, pretrain_seed, seed, chosen[arm.name, model], "test")
                 for arm in plan.arms for model in plan.models
                 for pretrain_seed in ([None] if model == "scratch" else range(args.pretrain_seeds))
                 for seed in range(args.seeds)]
        submit(tests)
    except OutOfTime:
        print(f"bench transfer: {args.budget_minutes:g} minutes are over and the running jobs have ended; the "
              f"same command continues ({len(runner.seconds)} jobs done)", flush=True)
        return {"finished": False}
    result = aggregate(collect(plan, tests), plan)
    result.update(benchmark="transfer", command=command_line("transfer", getattr(args, "argv", None)),
                  created=time.strftime("%Y-%m-%dT%H:%M:%S"), machine=machine_info(), finished=True,
                  config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "argv"},
                  learning_rates={f"{a}/{m}": lr for (a, m), lr in chosen.items()},
                  pretrain_ratio=ratio, stores={k: str(v) for k, v in plan.stores.items()},
                  holdout_classes=list(HOLDOUT_CLASSES), seconds=round(time.perf_counter() - start, 1),
                  job_seconds=runner.seconds)
    write_report(result, args.out)
    print(markdown(result))
    return result


# The settings every part depends on; presets, seeds and learning rates may be added to a folder.
SETTINGS = ("quick", "seed", "pretrain_rooms", "finetune_rooms", "val_rooms", "test_rooms", "pretrain_steps", "steps",
            "finetune_batch", "configs")


def check_settings(args) -> None:
    """Record the settings of OUT's parts in OUT/settings.json, or refuse a folder whose parts were
    made with other settings (its finished parts would be reused as if they were this run's)."""
    path = args.out / "settings.json"
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k in SETTINGS}
    if path.exists():
        before = json.loads(path.read_text())
        changed = [f"{k} {before.get(k)} -> {v}" for k, v in settings.items() if before.get(k) != v]
        if changed:
            raise SystemExit(f"error: {args.out} holds the parts of a benchmark with other settings ({', '.join(changed)})"
                             f"; use another --out")
    else:
        atomic_write_text(path, json.dumps(settings, indent=1))


def choose_learning_rates(plan: Plan, submit) -> dict[tuple[str, str], float]:
    """Each (arm, model)'s learning rate: the best validation mIoU (pre-training seed 0, fine-tuning
    seed 0) of its grid, the grid extended while the best lies at an edge (`submit(jobs)` runs jobs
    and returns when they have ended)."""
    if len(plan.args.lrs) == 1:  # nothing to choose: no validation runs
        return {(arm.name, model): plan.args.lrs[0] for arm in plan.arms for model in plan.models}
    by_name = {arm.name: arm for arm in plan.arms}
    runs: dict[tuple[str, str], dict[float, Job]] = {(arm.name, model): {} for arm in plan.arms for model in plan.models}
    new = {key: sorted(plan.args.lrs) for key in runs}
    chosen = {}
    for _ in range(MAX_EXTENSIONS + 1):
        jobs = [plan.finetune(by_name[key[0]], key[1], 0, 0, lr, "val") for key, lrs in new.items() for lr in lrs]
        for job, (key, lr) in zip(jobs, [(key, lr) for key, lrs in new.items() for lr in lrs]):
            runs[key][lr] = job
        submit(jobs)
        for key in new:
            chosen[key] = max(runs[key], key=lambda lr: (score(runs[key][lr]), -lr))
        new = {key: [wider] for key in new if (wider := extend(list(runs[key]), chosen[key])) is not None}
        if not new:
            break
    return chosen


def collect(plan: Plan, tests: list[Job]) -> dict:
    """The test mIoU of every fine-tuning run, and each zero-shot report."""
    rows = []
    for job in tests:
        _, _, arm, *origin, seed, _ = job.name.split("/")
        model, pretrain_seed = (origin[0], None) if origin == ["scratch"] else (origin[0], int(origin[1][1:]))
        rows.append({"arm": arm, "model": model, "pretrain_seed": pretrain_seed, "seed": int(seed[1:]),
                     "miou": score(job)})
    zero_shot = []
    for preset in plan.args.presets:
        if preset not in ZERO_SHOT_PRESETS:
            continue
        for mode in plan.holdouts(preset):
            for seed in range(plan.args.pretrain_seeds):
                report = json.loads((plan.out / "zero_shot" / preset / mode / f"seed{seed}" / "seg_report.json")
                                    .read_text())
                zero_shot.append({"preset": preset, "holdout": mode, "pretrain_seed": seed,
                                  **{k: report[k] for k in ZERO_SHOT_KEYS}, "novel": report["unseen_classes"]})
    return {"finetune": rows, "zero_shot": zero_shot}


ZERO_SHOT_KEYS = ("miou_seen", "miou_unseen", "hiou", "prior_miou_seen", "prior_miou_unseen", "prior_hiou")


def mean_sd(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def aggregate(measured: dict, plan: Plan) -> dict:
    """Per (arm, model): mean ± sd of test mIoU over fine-tuning x pre-training seeds, and of the
    difference to scratch of the same arm and fine-tuning seed; zero-shot per (preset, holdout) over
    pre-training seeds."""
    groups: dict[tuple[str, str], dict[tuple, float]] = {}
    for r in measured["finetune"]:
        groups.setdefault((r["arm"], r["model"]), {})[(r["pretrain_seed"], r["seed"])] = r["miou"]
    rows = []
    for arm in plan.arms:
        scratch = {seed: v for (_, seed), v in groups[arm.name, "scratch"].items()}
        for model in plan.models:
            runs = groups[arm.name, model]
            mean, sd = mean_sd(list(runs.values()))
            row = {"arm": arm.name, "model": model, "labels": arm.labels(plan.args.finetune_rooms), "runs": len(runs),
                   "miou_mean": mean, "miou_sd": sd, "per_run": [runs[k] for k in sorted(runs, key=str)]}
            if model != "scratch":
                d_mean, d_sd = mean_sd([v - scratch[seed] for (_, seed), v in runs.items()])
                row.update(minus_scratch_mean=d_mean, minus_scratch_sd=d_sd,
                           beyond_2sd=bool(abs(d_mean) > 2 * d_sd) if d_sd > 0 else None)
            rows.append(row)
    zero_shot = []
    for key in sorted({(z["preset"], z["holdout"]) for z in measured["zero_shot"]}, key=lambda k: (k[0], k[1] != "labels")):
        runs = [z for z in measured["zero_shot"] if (z["preset"], z["holdout"]) == key]
        row = {"preset": key[0], "holdout": key[1], "runs": len(runs), "novel": runs[0]["novel"]}
        for k in ZERO_SHOT_KEYS:
            row[f"{k}_mean"], row[f"{k}_sd"] = mean_sd([z[k] for z in runs])
        zero_shot.append(row)
    return {"rows": rows, "zero_shot": zero_shot,
            "baseline": "scratch: a randomly initialised backbone fine-tuned with the same head (a language head of "
                        "the class names; the linear probe: a linear head on the frozen random backbone), its own "
                        "learning rate, the same labels and steps",
            "notes": ["every mIoU is on the test rooms; learning rates were chosen on the validation rooms",
                      "sd: sample standard deviation over fine-tuning x pre-training seeds; differences to scratch "
                      "are paired by fine-tuning seed",
                      "pre-training withholds the held-out classes' labels (data.holdout=labels) and keeps their "
                      "texts; strict: their texts withheld too"]}


def markdown(result: dict) -> str:
    lines = ["| arm | labels | model | runs | test mIoU | - scratch |", "|---|---|---|---:|---|---|"]
    for r in result["rows"]:
        diff = (f"{r['minus_scratch_mean']:+.3f} ± {r['minus_scratch_sd']:.3f}" if "minus_scratch_mean" in r else "-")
        lines.append(f"| {r['arm']} | {r['labels']} | {r['model']} | {r['runs']} | {r['miou_mean']:.3f} ± "
                     f"{r['miou_sd']:.3f} | {diff} |")
    if result["zero_shot"]:
        lines += ["", "| zero-shot | holdout | runs | base mIoU | novel mIoU | hIoU | prior (base / novel / hIoU) |",
                  "|---|---|---:|---|---|---|---|"]
        for z in result["zero_shot"]:
            def pm(k):
                return f"{z[k + '_mean']:.3f} ± {z[k + '_sd']:.3f}"
            lines.append(f"| {z['preset']} | {z['holdout']} | {z['runs']} | {pm('miou_seen')} | {pm('miou_unseen')} | "
                         f"{pm('hiou')} | {z['prior_miou_seen_mean']:.3f} / {z['prior_miou_unseen_mean']:.3f} / "
                         f"{z['prior_hiou_mean']:.3f} |")
        lines += ["", "Novel classes: " + ", ".join(result["zero_shot"][0]["novel"]) + "."]
    if "learning_rates" in result:
        lines += ["", "Learning rates chosen on the validation rooms: " + ", ".join(
            f"{key} {lr:g}" for key, lr in result["learning_rates"].items()) + "."]
    return "\n".join(lines) + "\n"


def write_report(result: dict, out: Path) -> None:
    """transfer.json, transfer.md and transfer.png: test mIoU against labelled points per room (the
    limited-rooms and linear-probe arms beside), one line per model, the seeds' spread as bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparsegps.files import atomic_save_figure

    atomic_write_text(out / "transfer.json", json.dumps(result, indent=1))
    atomic_write_text(out / "transfer.md", "### transfer\n\n" + f"`{result.get('command', '')}`\n\n" + markdown(result))
    arm_names = list(dict.fromkeys(r["arm"] for r in result["rows"]))
    points = [a for a in arm_names if a.startswith("points")]
    others = [a for a in arm_names if a not in points]
    models = list(dict.fromkeys(r["model"] for r in result["rows"]))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), gridspec_kw={"width_ratios": [2, max(1, len(others))]},
                             sharey=True)
    colours = {m: c for m, c in zip(models, ["#888888", "#3182bd", "#31a354", "#e6550d", "#756bb1"])}
    row = {(r["arm"], r["model"]): r for r in result["rows"]}
    width = 0.8 / max(1, len(models))
    for k, model in enumerate(models):
        xs = [int(a[len("points"):]) for a in points]
        axes[0].errorbar(xs, [row[a, model]["miou_mean"] for a in points],
                         yerr=[row[a, model]["miou_sd"] for a in points], marker="o", capsize=3,
                         color=colours[model], label=model)
        x = np.arange(len(others)) + (k - (len(models) - 1) / 2) * width
        axes[1].bar(x, [row[a, model]["miou_mean"] for a in others], width,
                    yerr=[row[a, model]["miou_sd"] for a in others], capsize=2, color=colours[model])
    axes[0].set_xscale("log")
    axes[0].set_xlabel("labelled points per room (all fine-tuning rooms)")
    axes[0].set_ylabel("test mIoU (mean ± sd over seeds)")
    axes[0].legend(fontsize=8)
    axes[1].set_xticks(np.arange(len(others)), others)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_save_figure(fig, out / "transfer.png")


def main(argv: list[str] | None = None) -> dict:
    from .arguments import main_for

    return main_for(sys.modules[__name__], "transfer", argv)


if __name__ == "__main__":
    main()
