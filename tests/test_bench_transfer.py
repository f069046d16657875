"""The transfer benchmark's bookkeeping on a fake run: per-seed collection, mean and standard deviation,
paired differences to scratch (and to scratch with pre-training's supervised steps), the learning
rate chosen on validation, and the report files."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from sparsegps.benchmarks import bench_transfer as bt

# (arm, rooms, steps) -> test mIoU of seeds 0, 1, 2
FAKE = {("scratch", "few", 100): [0.10, 0.14, 0.12], ("dense", "few", 100): [0.30, 0.26, 0.31],
        ("language", "few", 100): [0.15, 0.13, 0.16], ("scratch+", "few", 300): [0.20, 0.22, 0.18],
        ("scratch", "few", 1500): [0.50, 0.52, 0.54], ("dense", "few", 1500): [0.53, 0.55, 0.54]}


def write(path: Path, data: dict) -> None:
    path.mkdir(parents=True, exist_ok=True)
    (path / ("seg_report.json" if "miou_seen" in data else "summary.json")).write_text(json.dumps(data))


@pytest.fixture
def fake_run(tmp_path):
    for (arm, rooms, steps), mious in FAKE.items():
        for seed, miou in enumerate(mious):
            write(tmp_path / "finetune" / "test" / arm / rooms / str(steps) / f"seed{seed}", {"seg_miou": miou})
    for lr, miou in ((0.002, 0.20), (0.005, 0.25), (0.01, 0.25)):  # a tie: the smaller rate wins
        write(tmp_path / "finetune" / "lr" / "scratch" / f"{lr:g}", {"seg_miou": miou})
    write(tmp_path / "zero_shot" / "dense", {"miou": 0.2, "miou_seen": 0.25, "miou_unseen": 0.05,
                                             "majority_miou": 0.02, "majority_miou_seen": 0.03,
                                             "majority_miou_unseen": 0.0, "unseen_classes": ["sofa"]})
    return tmp_path


def test_mean_std_and_paired_differences_by_hand(fake_run):
    measured = bt.collect(fake_run, ["language", "dense"], seeds=3)
    assert len(measured["finetune"]) == 3 * len(FAKE)
    result = bt.aggregate(measured, ["language", "dense"], baseline_steps=100, pretrain_steps=200)
    rows = {(r["arm"], r["rooms"], r["steps"]): r for r in result["rows"]}
    dense = rows["dense", "few", 100]
    assert dense["per_seed"] == FAKE["dense", "few", 100] and dense["seeds"] == 3
    assert dense["miou_mean"] == pytest.approx(np.mean([0.30, 0.26, 0.31]))
    assert dense["miou_std"] == pytest.approx(np.std([0.30, 0.26, 0.31], ddof=1))
    # paired by seed: (0.30 - 0.10, 0.26 - 0.14, 0.31 - 0.12)
    differences = [0.20, 0.12, 0.19]
    assert dense["minus_scratch_mean"] == pytest.approx(np.mean(differences))
    assert dense["minus_scratch_std"] == pytest.approx(np.std(differences, ddof=1))
    # the label-consuming preset is also compared with scratch given its supervised steps (200 + 100)
    assert dense["minus_scratch+_mean"] == pytest.approx(np.mean([0.10, 0.04, 0.13]))
    assert "minus_scratch+_mean" not in rows["language", "few", 100]  # consumed no segmentation labels
    assert rows["dense", "few", 1500]["minus_scratch_mean"] == pytest.approx(0.02)
    assert "minus_scratch_mean" not in rows["scratch", "few", 100]
    assert result["zero_shot"]["dense"]["miou_unseen"] == 0.05


def test_learning_rate_is_chosen_on_validation_and_reports_are_written(fake_run):
    assert bt.choose_lr(fake_run, "scratch", [0.002, 0.005, 0.01]) == 0.005
    result = bt.aggregate(bt.collect(fake_run, ["dense"], 3), ["dense"], 100, 200)
    result.update(learning_rates={"scratch": 0.005}, command="sparsegps bench transfer")
    bt.write_report(result, fake_run)
    table = (fake_run / "transfer.md").read_text()
    assert "| dense | few | 100 | 3 | 0.290 ± 0.026 | +0.170 ± 0.044 | +0.090 ± 0.046 |" in table
    assert "scratch 0.005" in table
    assert json.loads((fake_run / "transfer.json").read_text())["rows"]
    assert (fake_run / "transfer.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_failed_command_is_reported_in_one_line_naming_its_log(tmp_path, capsys):
    """`sparsegps bench transfer` whose first command fails (a store of no rooms): exit 1 and one
    message naming the job, its log and its command, no traceback."""
    from sparsegps import cli

    code = cli.main(["bench", "transfer", "--presets", "dense", "--pretrain-rooms", "0",
                     "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err, err
    assert err.startswith("error: synth_pretrain failed (exit 2); see ") and "synth_pretrain.log" in err
    assert "$ sparsegps synth --preset demo --scenes 0" in err
