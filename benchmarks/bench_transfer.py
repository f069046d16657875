"""What pre-training buys, measured on rooms nothing was chosen on: `sparsegps bench transfer`.

A learning benchmark beside the throughput ones. On the five disjoint stores of
`sparsegps.synth.splits` (pre-training, fine-tuning and its 16-room subset, validation, test):

1. pre-train each preset once (`language`: texts only; `objects`: + object classes; `dense`: +
   per-voxel classes; the four `HOLDOUT_CLASSES` held out of all of them);
2. choose each fine-tuning arm's learning rate on the validation rooms (16 rooms, the short
   schedule, seed 0), among `--lrs`: every arm gets its own, scratch included;
3. fine-tune each arm (every preset's export, started from its zero-shot segmenter where it has
   one, else a fresh language head on its backbone; and scratch, with the same language head) on
   16 rooms and on all fine-tuning rooms, at each step count, for `--seeds` seeds, and score the
   test rooms. Presets that consumed labels of the segmentation task (per-voxel classes) are also
   compared with scratch given as many supervised steps as pre-training and fine-tuning together
   (`scratch+`);
4. segment the test rooms zero-shot with each export that has a zero-shot segmenter: classes seen
   in pre-training and held out of it apart, against the majority class.

Results: mean and standard deviation over seeds of test mIoU per arm, and of the paired difference
pre-trained - scratch; JSON, markdown and a PNG. Every job is a `sparsegps` command run in its own
process (`--jobs` at a time, the cores shared; `sparsegps.recipes.steps`); a job whose output
exists is not run again, so a killed benchmark continues where it stopped. `--quick` is a smoke
test (tiny stores, a few steps).

Time on 2 cores (a 2-core AMD EPYC VM, two jobs at a time): pre-training 244-279 s per preset, a
100-step fine-tuning 69-83 s, a 1,500-step one 16 min; the defaults (3 presets, 1,500-step arms for
`dense` and scratch on 16 rooms, 3 seeds) add up to about 85 minutes, measured in parts.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from sparsegps.files import atomic_write_text
from sparsegps.recipes.steps import Job, Jobs
from sparsegps.synth.splits import FEW_ROOMS, HOLDOUT_CLASSES, check_disjoint, synth_command

from .arguments import command_line
from .machine import machine_info

PRESET_CONFIGS = {"language": "pretrain/tiny_cpu_language.yaml", "objects": "pretrain/tiny_cpu_objects.yaml",
                  "dense": "pretrain/tiny_cpu.yaml"}
LABEL_CONSUMING = ("dense",)  # presets whose labels are the segmentation task's (per-voxel classes)
ZERO_SHOT_PRESETS = ("dense",)  # presets with a zero-shot segmenter (the dense_text loss)
ROOM_SETS = {"few": "finetune_few", "all": "finetune"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=Path("runs/bench/transfer"), help="working and report folder")
    parser.add_argument("--configs", type=Path, default=Path("configs"), help="folder of the YAML configs")
    parser.add_argument("--presets", nargs="+", default=list(PRESET_CONFIGS), choices=list(PRESET_CONFIGS))
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds per arm")
    parser.add_argument("--long-seeds", type=int, default=None,
                        help="seeds of the step counts beyond the first (default: --seeds)")
    parser.add_argument("--steps", type=int, nargs="+", default=[100, 1500], help="fine-tuning step counts")
    parser.add_argument("--long-arms", nargs="+", default=["dense", "scratch"],
                        help="arms fine-tuned at step counts beyond the first (the rest: the first only)")
    parser.add_argument("--long-rooms", nargs="+", default=["few"], choices=list(ROOM_SETS),
                        help="room sets fine-tuned at step counts beyond the first")
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-3, 5e-3, 1e-2],
                        help="learning rates each arm chooses from on the validation rooms")
    parser.add_argument("--pretrain-steps", type=int, default=200)
    parser.add_argument("--pretrain-rooms", type=int, default=1600)
    parser.add_argument("--finetune-rooms", type=int, default=160)
    parser.add_argument("--val-rooms", type=int, default=40)
    parser.add_argument("--test-rooms", type=int, default=40)
    parser.add_argument("--jobs", type=int, default=2, help="commands run at once (the cores shared)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny stores, a few steps, 1 seed")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stores")


def _quick(args) -> None:
    args.seeds, args.steps, args.lrs = 1, [2, 3], [2e-3, 5e-3]
    args.pretrain_steps, args.pretrain_rooms, args.finetune_rooms = 2, 8, FEW_ROOMS + 2
    args.val_rooms = args.test_rooms = 3


def plan(args) -> tuple[dict[str, Path], list[Job], dict]:
    """The stores, and every job in dependency order; `choices` collects the chosen learning rates."""
    out, configs = args.out, args.configs
    counts = {"pretrain": args.pretrain_rooms, "finetune": args.finetune_rooms, "finetune_few": FEW_ROOMS,
              "val": args.val_rooms, "test": args.test_rooms}
    stores = {name: out / "data" / name for name in counts}
    jobs = [Job(f"synth_{name}", synth_command(name, n, stores[name], args.seed), result=stores[name] / "index.json")
            for name, n in counts.items()]
    synths = [j.name for j in jobs]
    holdout = "[" + ",".join(HOLDOUT_CLASSES) + "]"
    for preset in args.presets:
        run = out / "pretrain" / preset
        jobs.append(Job(f"pretrain_{preset}", [
            "pretrain", "--config", str(configs / PRESET_CONFIGS[preset]), "--output-dir", str(run),
            "--set", f"steps={args.pretrain_steps}", "--set", f"data.train=[{stores['pretrain']}]",
            "--set", "data.val=[]", "--set", f"data.holdout_classes={holdout}", "--set", "num_workers=0"],
            synths, run / "summary.json"))
        if preset in ZERO_SHOT_PRESETS:
            jobs.append(Job(f"zero_shot_{preset}", [
                "eval-seg", "--checkpoint", str(run / "export.safetensors"), "--data", str(stores["test"]), "--zero-shot",
                "--out", str(out / "zero_shot" / preset)], [f"pretrain_{preset}"],
                out / "zero_shot" / preset / "seg_report.json"))
    arms = ["scratch", *args.presets]
    for arm in arms:
        for lr in args.lrs:
            jobs.append(finetune_job(args, stores, arm, "few", args.steps[0], 0, lr, "val", f"lr/{arm}/{lr:g}"))
    return stores, jobs, {"arms": arms}


def finetune_job(args, stores: dict[str, Path], arm: str, rooms: str, steps: int, seed: int, lr: float | None,
                 split: str, name: str) -> Job:
    """`finetune-seg` of one arm: scratch (its config: a fresh language head) or a preset's export
    (started from its zero-shot segmenter when it has one), scored on `split`."""
    run = args.out / "finetune" / name
    config = "seg/synthetic_cpu_scratch.yaml" if arm.startswith("scratch") else "seg/synthetic_cpu.yaml"
    argv = ["finetune-seg", "--config", str(args.configs / config), "--output-dir", str(run),
            "--set", f"data.train=[{stores[ROOM_SETS[rooms]]}]", "--set", f"data.val=[{stores[split]}]",
            "--set", f"steps={steps}", "--set", f"seed={seed}", "--set", "num_workers=0",
            "--set", f"checkpoint_every={steps}"]
    if lr is not None:
        argv += ["--set", f"optim.lr_backbone={lr:g}", "--set", f"optim.lr_heads={lr:g}"]
    after = [f"synth_{ROOM_SETS[rooms]}", f"synth_{split}"]
    if not arm.startswith("scratch"):
        export = args.out / "pretrain" / arm / "export.safetensors"
        init = "zero_shot" if arm in ZERO_SHOT_PRESETS else "text"
        argv += ["--pretrained", str(export), "--set", "model.head=language", "--set", f"model.head_init={init}"]
        after.append(f"pretrain_{arm}")
    return Job(name, argv, after, run / "summary.json")


def run(args) -> dict:
    if args.quick:
        _quick(args)
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    stores, jobs, info = plan(args)
    runner = Jobs(args.out / "logs", parallel=args.jobs)
    for job in jobs:
        runner.add(job)
    runner.wait()
    check_disjoint(stores)
    chosen = {arm: choose_lr(args.out, arm, args.lrs) for arm in info["arms"]}
    runs = []
    for arm in info["arms"]:
        for rooms in ROOM_SETS:
            for k, steps in enumerate(args.steps):
                if k and (arm not in args.long_arms or rooms not in args.long_rooms):
                    continue
                for seed in range(args.seeds if k == 0 else (args.long_seeds or args.seeds)):
                    runs.append(finetune_job(args, stores, arm, rooms, steps, seed, chosen[arm], "test",
                                             f"test/{arm}/{rooms}/{steps}/seed{seed}"))
    # scratch with the supervised steps of a label-consuming pre-training and its fine-tuning
    if any(p in LABEL_CONSUMING for p in args.presets):
        steps = args.pretrain_steps + args.steps[0]
        for seed in range(args.seeds):
            runs.append(finetune_job(args, stores, "scratch+", "few", steps, seed, chosen["scratch"], "test",
                                     f"test/scratch+/few/{steps}/seed{seed}"))
    for job in runs:
        runner.add(job)
    runner.wait()
    measured = collect(args.out, args.presets, args.seeds)
    result = aggregate(measured, args.presets, baseline_steps=args.steps[0], pretrain_steps=args.pretrain_steps)
    result.update(benchmark="transfer", command=command_line("transfer", getattr(args, "argv", None)),
                  created=time.strftime("%Y-%m-%dT%H:%M:%S"), machine=machine_info(),
                  config={k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "argv"},
                  learning_rates=chosen, stores={k: str(v) for k, v in stores.items()},
                  holdout_classes=list(HOLDOUT_CLASSES), seconds=round(time.perf_counter() - start, 1))
    write_report(result, args.out)
    print(markdown(result))
    return result


def choose_lr(out: Path, arm: str, lrs: list[float]) -> float:
    """The learning rate of `arm` with the best validation mIoU."""
    scores = {lr: json.loads((out / "finetune" / f"lr/{arm}/{lr:g}" / "summary.json").read_text())["seg_miou"]
              for lr in lrs}
    return max(scores, key=lambda lr: (scores[lr], -lr))


def collect(out: Path, presets: list[str], seeds: int) -> dict:
    """{"finetune": [{arm, rooms, steps, seed, miou}], "zero_shot": {preset: report}} from the run folders."""
    rows = []
    for summary in sorted((out / "finetune" / "test").glob("*/*/*/seed*/summary.json")):
        arm, rooms, steps, seed = summary.parent.relative_to(out / "finetune" / "test").parts
        rows.append({"arm": arm, "rooms": rooms, "steps": int(steps), "seed": int(seed[4:]),
                     "miou": json.loads(summary.read_text())["seg_miou"]})
    zero_shot = {}
    for preset in presets:
        report = out / "zero_shot" / preset / "seg_report.json"
        if report.exists():
            r = json.loads(report.read_text())
            zero_shot[preset] = {k: r.get(k) for k in ("miou", "miou_seen", "miou_unseen", "majority_miou",
                                                       "majority_miou_seen", "majority_miou_unseen", "unseen_classes")}
    return {"finetune": rows, "zero_shot": zero_shot}


def _mean_std(values: list[float]) -> tuple[float, float]:
    a = np.asarray(values, dtype=np.float64)
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def aggregate(measured: dict, presets: list[str], baseline_steps: int, pretrain_steps: int) -> dict:
    """Mean and standard deviation over seeds per (arm, rooms, steps), and of the per-seed difference
    to scratch at the same rooms and steps (paired by seed); for label-consuming presets also to
    scratch+ (scratch with pre-training's supervised steps added)."""
    groups: dict[tuple, dict[int, float]] = {}
    for r in measured["finetune"]:
        groups.setdefault((r["arm"], r["rooms"], r["steps"]), {})[r["seed"]] = r["miou"]
    rows = []
    for (arm, rooms, steps), by_seed in sorted(groups.items()):
        mean, std = _mean_std(list(by_seed.values()))
        row = {"arm": arm, "rooms": rooms, "steps": steps, "seeds": len(by_seed), "miou_mean": mean, "miou_std": std,
               "per_seed": [by_seed[s] for s in sorted(by_seed)]}
        comparisons = [("scratch", "scratch", steps)]
        if arm in LABEL_CONSUMING and steps == baseline_steps:
            comparisons.append(("scratch+", "scratch+", pretrain_steps + baseline_steps))
        if arm not in ("scratch", "scratch+"):
            for label, base_arm, base_steps in comparisons:
                base = groups.get((base_arm, rooms, base_steps))
                paired = sorted(set(by_seed) & set(base or {}))
                if paired:
                    d_mean, d_std = _mean_std([by_seed[s] - base[s] for s in paired])
                    row[f"minus_{label}_mean"], row[f"minus_{label}_std"] = d_mean, d_std
        rows.append(row)
    return {"rows": rows, "zero_shot": measured["zero_shot"],
            "baseline": "fine-tuning from scratch with the same language head, its own learning rate, the same "
                        "rooms and steps (scratch+: also pre-training's supervised steps)",
            "notes": ["every mIoU is on the test rooms; learning rates were chosen on the validation rooms",
                      "one pre-training per preset (seed 0); the seeds are fine-tuning seeds",
                      "std: sample standard deviation over seeds; differences are paired by seed"]}


def markdown(result: dict) -> str:
    def pm(mean, std):
        return f"{mean:+.3f} ± {std:.3f}"

    lines = ["| arm | rooms | steps | seeds | test mIoU | - scratch | - scratch+ |", "|---|---|---:|---:|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['arm']} | {r['rooms']} | {r['steps']} | {r['seeds']} | {r['miou_mean']:.3f} ± "
                     f"{r['miou_std']:.3f} | " + (pm(r['minus_scratch_mean'], r['minus_scratch_std'])
                                                  if 'minus_scratch_mean' in r else "-")
                     + " | " + (pm(r['minus_scratch+_mean'], r['minus_scratch+_std'])
                                if 'minus_scratch+_mean' in r else "-") + " |")
    if result["zero_shot"]:
        lines += ["", "| preset | zero-shot mIoU | seen | held out | majority class (seen / held out) |",
                  "|---|---:|---:|---:|---|"]
        for preset, z in result["zero_shot"].items():
            lines.append(f"| {preset} | {z['miou']:.3f} | {z['miou_seen']:.3f} | {z['miou_unseen']:.3f} | "
                         f"{z['majority_miou_seen']:.3f} / {z['majority_miou_unseen']:.3f} |")
    if "learning_rates" in result:
        lines += ["", "Learning rates chosen on the validation rooms: " + ", ".join(
            f"{arm} {lr:g}" for arm, lr in result["learning_rates"].items()) + "."]
    return "\n".join(lines) + "\n"


def write_report(result: dict, out: Path) -> None:
    """transfer.json, transfer.md and transfer.png (test mIoU per arm, with the seeds' spread)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from sparsegps.files import atomic_save_figure

    atomic_write_text(out / "transfer.json", json.dumps(result, indent=1))
    atomic_write_text(out / "transfer.md", "### transfer\n\n" + f"`{result.get('command', '')}`\n\n" + markdown(result))
    settings = sorted({(r["rooms"], r["steps"]) for r in result["rows"]}, key=lambda k: (k[0] != "few", k[1]))
    fig, axes = plt.subplots(1, len(settings), figsize=(3.6 * len(settings), 3.8), sharey=True, squeeze=False)
    for ax, (rooms, steps) in zip(axes[0], settings):
        rows = [r for r in result["rows"] if (r["rooms"], r["steps"]) == (rooms, steps)]
        x = np.arange(len(rows))
        ax.bar(x, [r["miou_mean"] for r in rows], yerr=[r["miou_std"] for r in rows], capsize=3,
               color=["#bbbbbb" if r["arm"].startswith("scratch") else "#3182bd" for r in rows])
        for i, r in enumerate(rows):
            ax.scatter([i] * len(r["per_seed"]), r["per_seed"], s=8, color="black", zorder=3)
        ax.set_xticks(x, [r["arm"] for r in rows], rotation=30, ha="right")
        ax.set_title(f"{'16' if rooms == 'few' else 'all'} rooms, {steps} steps", fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("test mIoU (mean ± std over seeds)")
    fig.tight_layout()
    atomic_save_figure(fig, out / "transfer.png")


def main(argv: list[str] | None = None) -> dict:
    from .arguments import main_for

    return main_for(sys.modules[__name__], "transfer", argv)


if __name__ == "__main__":
    main()
