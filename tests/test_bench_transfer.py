"""The transfer benchmark's bookkeeping on fake runs (mean and standard deviation over fine-tuning x
pre-training seeds, differences to scratch paired by fine-tuning seed, the learning-rate grid
extended while its best lies at an edge, the report files), a failed command in one line, and a
quick run through the CLI that a second start reuses without running anything again."""
from __future__ import annotations

import argparse
import json

import numpy as np
import pytest

from sparsegps.benchmarks import bench_transfer as bt


def plan_for(tmp_path, **overrides) -> bt.Plan:
    parser = argparse.ArgumentParser()
    bt.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--presets", "language", "dense", "--pretrain-seeds", "2",
                              "--seeds", "2", "--points", "20"])
    vars(args).update(overrides)
    return bt.Plan(args)


def finish(job, miou: float) -> None:
    job.result.parent.mkdir(parents=True, exist_ok=True)
    job.result.write_text(json.dumps({"seg_miou": miou}))


def test_mean_sd_and_differences_paired_by_fine_tuning_seed_by_hand(tmp_path):
    plan = plan_for(tmp_path)
    assert [a.name for a in plan.arms] == ["points20", "rooms16", "linear"] and plan.models == ["scratch", "language",
                                                                                                 "dense"]
    values = {("scratch", None): [0.10, 0.14], ("dense", 0): [0.30, 0.26], ("dense", 1): [0.28, 0.20],
              ("language", 0): [0.12, 0.15], ("language", 1): [0.11, 0.13]}
    tests = []
    for arm in plan.arms:
        for (model, pretrain_seed), mious in values.items():
            for seed, miou in enumerate(mious):
                job = plan.finetune(arm, model, pretrain_seed, seed, 0.003, "test")
                finish(job, miou)
                tests.append(job)
    for mode in ("labels", "strict"):
        for seed in range(2):
            report = tmp_path / "zero_shot" / "dense" / mode / f"seed{seed}" / "seg_report.json"
            report.parent.mkdir(parents=True)
            report.write_text(json.dumps({"miou_seen": 0.3 + seed / 10, "miou_unseen": 0.1, "hiou": 0.15,
                                          "prior_miou_seen": 0.03, "prior_miou_unseen": 0.01, "prior_hiou": 0.015,
                                          "unseen_classes": ["sofa"]}))
    result = bt.aggregate(bt.collect(plan, tests), plan)
    rows = {(r["arm"], r["model"]): r for r in result["rows"]}
    dense = rows["points20", "dense"]
    runs = [0.30, 0.26, 0.28, 0.20]
    assert dense["runs"] == 4 and sorted(dense["per_run"]) == sorted(runs)
    assert dense["miou_mean"] == pytest.approx(np.mean(runs)) and dense["miou_sd"] == pytest.approx(np.std(runs, ddof=1))
    # each pre-training's run of fine-tuning seed s against scratch's run of seed s
    differences = [0.30 - 0.10, 0.26 - 0.14, 0.28 - 0.10, 0.20 - 0.14]
    assert dense["minus_scratch_mean"] == pytest.approx(np.mean(differences))
    assert dense["minus_scratch_sd"] == pytest.approx(np.std(differences, ddof=1))
    assert dense["beyond_2sd"] == (np.mean(differences) > 2 * np.std(differences, ddof=1))
    assert "minus_scratch_mean" not in rows["points20", "scratch"] and rows["points20", "scratch"]["runs"] == 2
    assert dense["labels"] == "160 rooms, 20 labelled points" and "linear head" in rows["linear", "dense"]["labels"]
    zero = {(z["preset"], z["holdout"]): z for z in result["zero_shot"]}
    assert zero["dense", "labels"]["miou_seen_mean"] == pytest.approx(0.35) and zero["dense", "strict"]["runs"] == 2
    assert [z["holdout"] for z in result["zero_shot"]] == ["labels", "strict"]

    result.update(learning_rates={"points20/dense": 0.003}, command="sparsegps bench transfer")
    bt.write_report(result, tmp_path)
    table = (tmp_path / "transfer.md").read_text()
    assert (f"| points20 | 160 rooms, 20 labelled points | dense | 4 | {np.mean(runs):.3f} ± {np.std(runs, ddof=1):.3f} "
            f"| {np.mean(differences):+.3f} ± {np.std(differences, ddof=1):.3f} |") in table
    assert "| dense | labels | 2 | 0.350 ± 0.071 |" in table and "points20/dense 0.003" in table
    assert json.loads((tmp_path / "transfer.json").read_text())["rows"]
    assert (tmp_path / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_learning_rate_grid_extends_while_the_best_lies_at_an_edge(tmp_path):
    """Validation mIoU peaks at 0.054 for one arm (beyond the grid's top, 0.02), at 0.006 for the
    others: the first grows its grid upwards by the grid's ratio until the best is inside (or the
    extensions run out); the others keep theirs."""
    plan = plan_for(tmp_path, lrs=[0.002, 0.006, 0.018], presets=["dense"], pretrain_seeds=1)
    ran = []

    def submit(jobs):
        for job in jobs:
            ran.append(job.name)
            lr = float(job.name.rsplit("/lr", 1)[1])
            peak = 0.054 if "/points20/dense/" in job.name else 0.006
            finish(job, 1.0 - abs(np.log(lr / peak)))

    chosen = bt.choose_learning_rates(plan, submit)
    assert chosen["points20", "dense"] == pytest.approx(0.054)
    assert all(lr == pytest.approx(0.006) for key, lr in chosen.items() if key != ("points20", "dense"))
    dense = sorted(float(n.rsplit("/lr", 1)[1]) for n in ran if "/points20/dense/" in n)
    assert dense == pytest.approx([0.002, 0.006, 0.018, 0.054, 0.162])  # 0.054 inside: no third extension
    assert len(ran) == len(set(ran)) == 3 * 2 * 3 + 2  # every job once
    assert bt.extend([0.002, 0.006], 0.002) == pytest.approx(0.002 / 3) and bt.extend([0.002, 0.006, 0.018], 0.006) is None


def test_pre_training_must_outlast_fine_tuning(tmp_path, capsys):
    from sparsegps import cli

    with pytest.raises(SystemExit, match="at least 5x"):
        cli.main(["bench", "transfer", "--pretrain-steps", "100", "--steps", "100", "--out", str(tmp_path)])


def test_a_failed_command_is_reported_in_one_line_naming_its_log(tmp_path, capsys):
    """`sparsegps bench transfer` whose first command fails (a store of no rooms): exit 1 and one
    message naming the job, its log and its command, no traceback."""
    from sparsegps import cli

    code = cli.main(["bench", "transfer", "--presets", "dense", "--pretrain-rooms", "0", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert err.startswith("error: synth_pretrain failed (exit 2); see ") and "synth_pretrain.log" in err
    assert "$ sparsegps synth --preset demo --scenes 0" in err


@pytest.mark.slow
def test_quick_run_reports_every_arm_and_a_second_start_reuses_every_part(tmp_path, capsys):
    from sparsegps import cli

    argv = ["bench", "transfer", "--quick", "--presets", "dense", "--no-strict", "--out", str(tmp_path)]
    assert cli.main([*argv, "--budget-minutes", "0"]) == 0  # a sitting with no time starts nothing
    assert "the same command continues" in capsys.readouterr().out and not (tmp_path / "data" / "pretrain").exists()
    assert cli.main(argv) == 0
    result = json.loads((tmp_path / "transfer.json").read_text())
    assert {(r["arm"], r["model"]) for r in result["rows"]} == {(a, m) for a in ("points20", "rooms3", "linear")
                                                                for m in ("scratch", "dense")}
    assert all(0 <= r["miou_mean"] <= 1 for r in result["rows"])
    assert [(z["preset"], z["holdout"]) for z in result["zero_shot"]] == [("dense", "labels")]
    assert not (tmp_path / "finetune" / "val").exists()  # one learning rate: nothing to choose on validation
    assert (tmp_path / "transfer.png").exists() and any(result["job_seconds"].values())
    # the pre-training exports say what they withheld
    from sparsegps.exports import read_export

    assert read_export(tmp_path / "pretrain/dense/labels/seed0/export.safetensors").info.holdout == "labels"
    assert cli.main(argv) == 0  # started again: every part is reused
    again = json.loads((tmp_path / "transfer.json").read_text())
    assert set(again["job_seconds"]) == set(result["job_seconds"]) and not any(again["job_seconds"].values())
    assert again["rows"] == result["rows"]


def test_a_folder_of_other_settings_is_refused(tmp_path):
    plan = plan_for(tmp_path)
    bt.check_settings(plan.args)
    bt.check_settings(plan.args)  # the same settings: its parts are this run's
    plan.args.steps += 1
    with pytest.raises(SystemExit, match=r"other settings \(steps 120 -> 121\)"):
        bt.check_settings(plan.args)
