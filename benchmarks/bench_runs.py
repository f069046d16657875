"""Whole pre-training runs of several arms, alternated: scenes/s as `sparsegps pretrain` reports it,
and, with `--evaluate`, what each run learnt.

    sparsegps bench runs --data STORE \
        --arm now python configs/pretrain/tiny_cpu.yaml \
        --arm before /path/to/other/venv/bin/python /path/to/other/checkout/configs/pretrain/tiny_cpu.yaml \
        [--steps 60] [--rounds 3] [--threads 2] [--set KEY=VALUE ...] [--evaluate VAL_STORE] [--out DIR]

An arm is a label, a Python interpreter (whose `sparsegps` is the install to measure: another
virtual environment holds another version) and a pre-training config. Round r runs each arm's
`python -m sparsegps.cli pretrain` once, in turn (A B A B), on the same store with the same
`--set` overrides and threads, at seed `--seed` + r, each in a fresh run folder; so load that
changes during the benchmark slows the arms alike, and the rounds are the seeds of a learning
comparison. An arm's throughput is the mean `scenes_per_s` of its logged windows after the first
(start-up, DataLoader workers and the first steps' allocations excluded), the median over rounds;
`ratio_vs_baseline` is against the first arm. With `--parallel 2` two runs share the machine (the
next arms in turn), which halves a learning comparison's time and makes its throughput numbers
those of a shared machine. With `--out` every run's folder stays in OUT/runs, and a run that
finished is not run again when the benchmark is started anew (an interrupted comparison continues).

`--evaluate STORE` scores every run's export on STORE, with the arm's own install: held-out
grounding (`eval-pretrain`: accuracy, the class prior, class and within-class accuracy) and
zero-shot segmentation (`eval-seg --zero-shot`: mIoU, on the classes seen in pre-training and on
those held out of it); mean and standard deviation over the rounds (seeds).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from tqdm.auto import tqdm

from sparsegps.benchmarks.arguments import add_common_arguments, command_line, main_for, resolve_common
from sparsegps.benchmarks.machine import machine_info
from sparsegps.benchmarks.report import Result, bar_chart, finish, ratio, target
from sparsegps.files import atomic_write_text
from sparsegps.recipes.steps import command_environment

NAME = "runs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser)
    parser.add_argument("--arm", nargs=3, action="append", required=True, metavar=("LABEL", "PYTHON", "CONFIG"),
                        help="an arm: its label, the Python whose sparsegps runs it, its pre-training config")
    parser.add_argument("--data", type=Path, required=True, help="the store every arm pre-trains on")
    parser.add_argument("--steps", type=int, default=60, help="optimizer steps per run (quick: 4)")
    parser.add_argument("--log-every", type=int, default=None,
                        help="steps per logged window (default: steps / 4; quick 2)")
    parser.add_argument("--rounds", type=int, default=None, help="runs of each arm (default 3, quick 1)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every arm's config (e.g. data.holdout_classes=[sofa])")
    parser.add_argument("--evaluate", type=Path, default=None,
                        help="a held-out store every run's export is scored on (grounding, zero-shot segmentation)")
    parser.add_argument("--parallel", type=int, default=1, help="runs at once (default 1)")
    parser.add_argument("--target", type=float, default=None,
                        help="wanted ratio of the later arms' scenes/s to the first arm's (default: none)")


LEARNING = {"grounding_accuracy": ("grounding", "accuracy"), "class_prior": ("grounding", "class_prior"),
            "within_class_accuracy": ("grounding", "within_class_accuracy"),
            "class_accuracy": ("grounding", "class_accuracy"), "zero_shot_miou": ("zero_shot", "miou"),
            "zero_shot_miou_seen": ("zero_shot", "miou_seen"), "zero_shot_miou_unseen": ("zero_shot", "miou_unseen")}


def _call(cmd: list[str], log: Path, env: dict, label: str) -> None:
    """Run `cmd` in the run's folder: `python -m` puts the working directory first on the module
    path, so a source checkout there would shadow the arm's own install."""
    with open(log, "w") as f:
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=log.parent)
    if done.returncode:
        raise SystemExit(f"error: arm {label} failed (exit {done.returncode}); see {log}\n  {shlex.join(cmd)}")


def run_arm(label: str, python: str, config: str, seed: int, args: argparse.Namespace, out: Path) -> dict:
    """One `pretrain` run of an arm (and its evaluation): its logged windows' scenes/s, its scores."""
    done = out / "result.json"
    if done.exists():  # a finished run of an earlier, interrupted benchmark
        return json.loads(done.read_text())
    out.mkdir(parents=True, exist_ok=True)
    run_dir = out / "run"
    shutil.rmtree(run_dir, ignore_errors=True)  # a run stopped half-way starts again (any install reads this)
    cmd = [python, "-m", "sparsegps.cli", "pretrain", "--config", config, "--output-dir", str(run_dir),
           "--set", f"steps={args.steps}", "--set", f"log_every={args.log_every}", "--set", f"seed={seed}",
           "--set", f"data.train=[{args.data}]", "--set", "data.val=[]", "--set", f"checkpoint_every={args.steps}",
           *(x for item in args.set for x in ("--set", item))]
    env = command_environment(args.threads or None)
    _call(cmd, out / "pretrain.log", env, label)
    windows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [w["scenes_per_s"] for w in windows if w.get("kind") == "train"]
    if len(rates) < 2:
        raise SystemExit(f"error: arm {label} logged {len(rates)} window(s); use more --steps than --log-every")
    got = {"scenes_per_s": statistics.fmean(rates[1:]), "command": shlex.join(cmd)}
    if args.evaluate is not None:
        export = str(run_dir / "export.safetensors")
        _call([python, "-m", "sparsegps.cli", "eval-pretrain", "--checkpoint", export, "--data", str(args.evaluate),
               "--out", str(out / "grounding")], out / "eval_pretrain.log", env, label)
        _call([python, "-m", "sparsegps.cli", "eval-seg", "--checkpoint", export, "--data", str(args.evaluate),
               "--zero-shot", "--out", str(out / "zero_shot")], out / "eval_seg.log", env, label)
        reports = {"grounding": json.loads((out / "grounding" / "grounding.json").read_text()),
                   "zero_shot": json.loads((out / "zero_shot" / "seg_report.json").read_text())}
        got.update({key: reports[part][field] for key, (part, field) in LEARNING.items()})
    atomic_write_text(done, json.dumps(got))
    return got


def run(args: argparse.Namespace) -> dict:
    resolve_common(args, repeats=1, warmup=0)
    if args.quick:
        args.steps, args.log_every = min(args.steps, 4), 2
    args.log_every = args.log_every or max(1, args.steps // 4)
    rounds = args.rounds or (1 if args.quick else 3)
    args.arm = [(label, python if os.sep not in python else str(Path(python).absolute()), str(Path(config).absolute()))
                for label, python, config in args.arm]
    args.data = args.data.absolute()
    args.evaluate = args.evaluate.absolute() if args.evaluate is not None else None
    labels = [a[0] for a in args.arm]
    if len(set(labels)) != len(labels):
        raise SystemExit("error: --arm labels must differ")
    # with --out the runs stay in OUT/runs (a finished run is not run again when the benchmark is
    # started anew); without, in a temporary folder
    root = args.out / "runs" if args.out is not None else Path(tempfile.mkdtemp(prefix="sparsegps-bench-runs-"))
    root.mkdir(parents=True, exist_ok=True)
    installs = {label: subprocess.run([python, "-c", "import sparsegps; print(sparsegps.__file__)"], cwd=root,
                                      capture_output=True, text=True).stdout.strip() for label, python, _ in args.arm}
    runs = [(r, arm) for r in range(rounds) for arm in args.arm]  # arms in turn, round by round
    measured: dict[str, list[dict]] = {label: [] for label in labels}
    try:
        with concurrent.futures.ThreadPoolExecutor(max(1, args.parallel)) as pool:
            futures = [(arm[0], pool.submit(run_arm, *arm, args.seed + r, args, root / f"{arm[0]}-{r}"))
                       for r, arm in runs]
            for label, future in tqdm(futures, desc="runs", unit="run"):
                measured[label].append(future.result())
    finally:
        if args.out is None:
            shutil.rmtree(root, ignore_errors=True)

    result = Result(NAME, command_line(NAME, getattr(args, "argv", None)), dict(vars(args)),
                    baseline=f"the first arm ({labels[0]}), in the same rounds")
    for label, python, config in args.arm:
        rates = [m["scenes_per_s"] for m in measured[label]]
        seconds = [1.0 / x for x in rates]  # seconds per scene, per run
        row = {"method": label, "python": python, "sparsegps": installs[label], "pretrain_config": config,
               "seconds": statistics.median(seconds), "seconds_min": min(seconds), "seconds_max": max(seconds),
               "repeats": len(rates), "scenes_per_s": statistics.median(rates), "scenes_per_s_runs": rates,
               "command": measured[label][0]["command"]}
        if args.evaluate is not None:
            for key in LEARNING:
                values = [m[key] for m in measured[label]]
                row[key] = statistics.fmean(values)
                row[f"{key}_sd"] = statistics.stdev(values) if len(values) > 1 else 0.0
                row[f"{key}_runs"] = values
        result.rows.append(row)
    base = result.rows[0]
    for row in result.rows:
        row["ratio_vs_baseline"] = ratio(base["seconds"], row["seconds"])
    if args.target is not None:
        for row in result.rows[1:]:
            result.targets.append(target(f"{row['method']} vs {base['method']}, pre-training scenes/s",
                                         row["ratio_vs_baseline"], args.target))
    result.notes += [
        f"{rounds} round(s) of {args.steps}-step runs (seeds {args.seed}-{args.seed + rounds - 1}), arms in turn, "
        f"{args.parallel} at a time; scenes/s per run: the mean of its logged windows of {args.log_every} steps after "
        "the first; the row's value: the median over runs",
        f"threads: {args.threads or 'torch default'} (OMP_NUM_THREADS) per run; the config's DataLoader workers",
    ]
    columns = ["method", "repeats", "scenes_per_s", "seconds", "ratio_vs_baseline"]
    if args.evaluate is not None:
        result.notes.append(f"learning: scores on {args.evaluate}, mean over the rounds; *_sd: their standard "
                            "deviation")
        columns += [k for key in LEARNING for k in (key, f"{key}_sd")]
    return finish(result, machine_info(args.device), columns, args.out, plot=_plot)


def _plot(data: dict, path: Path) -> None:
    bar_chart(path, [r["method"] for r in data["rows"]], [r["scenes_per_s"] for r in data["rows"]],
              ylabel="pre-training scenes/s (median run)", title="Whole pre-training runs, alternated")


def main(argv: list[str] | None = None) -> dict:
    return main_for(sys.modules[__name__], NAME, argv)


if __name__ == "__main__":
    main()
