"""`make demo` end to end at a toy size: every step runs as its own process and summary.json holds
every reported field; a pre-training override reaches the pre-training run."""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
FIELDS = ("grounding_acc", "grounding_chance", "grounding_class_prior", "grounding_within_class_accuracy",
          "grounding_class_accuracy", "seg_miou_few", "seg_miou_few_scratch",
          "seg_miou_few_scratch_long", "zero_shot_miou", "zero_shot_miou_seen", "zero_shot_baseline",
          "zero_shot_baseline_seen", "zero_shot_baseline_unseen", "zero_shot_baseline_hiou",
          "pretrain_scenes_per_s", "total_seconds")


@pytest.mark.slow
def test_demo_runs_every_step_and_reports_every_field(tmp_path):
    """Also from a process that holds a process group's rendezvous port (as this test process does
    after in-process training tests): the demo's steps must not inherit it."""
    out = tmp_path / "demo"
    with socket.socket() as held:  # a world of one whose rendezvous port is taken
        held.bind(("127.0.0.1", 0))
        held.listen()
        group = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                 "MASTER_PORT": str(held.getsockname()[1])}
        proc = subprocess.run([sys.executable, "-m", "sparsegps.demo", "--out", str(out), "--configs",
                               str(ROOT / "configs"), "--pretrain-scenes", "8", "--finetune-scenes", "18",
                               "--val-scenes", "3", "--test-scenes", "3", "--pretrain-steps", "2", "--seg-steps", "2",
                               "--workers", "1", "--pretrain-set", "model.referral_contrast=projected",
                               "--pretrain-set", "num_workers=0"],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **group}, capture_output=True,
                              text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for name in FIELDS:
        assert isinstance(summary[name], float) and math.isfinite(summary[name]), (name, summary[name])
    assert 0 <= summary["zero_shot_miou"] <= 1 and summary["pretrain_steps"] == 2
    # five stores, every number measured on the test rooms, the held-out classes and the preset named
    assert set(summary["stores"]) == {"pretrain", "finetune", "finetune_few", "val", "test"}
    assert summary["measured_on"] == "test" and len(summary["holdout_classes"]) == 4
    assert summary["preset"] == "dense" and summary["labels_consumed"] == ["texts", "object_classes", "voxel_classes"]
    assert summary["seg_steps_scratch_long"] == 4
    assert summary["holdout"] == "labels"  # labels withheld, texts kept
    from sparsegps.synth.splits import room_fingerprints

    prints = {name: room_fingerprints(path) for name, path in summary["stores"].items()}
    assert prints["finetune_few"] <= prints["finetune"]
    names = ["pretrain", "finetune", "val", "test"]
    assert all(not prints[a] & prints[b] for i, a in enumerate(names) for b in names[i + 1:])
    for name in ("seg_few", "seg_few_scratch", "seg_few_scratch_long"):
        assert yaml.safe_load((out / name / "config.yaml").read_text())["data"]["val"] == [summary["stores"]["test"]]
    assert (out / "pretrain/grounding.png").exists() and (out / "pretrain/loss_curve.png").exists()
    assert summary["pretrain_overrides"] == ["model.referral_contrast=projected", "num_workers=0"]
    used = yaml.safe_load((out / "pretrain/config.yaml").read_text())
    assert used["model"]["referral_contrast"] == "projected" and used["num_workers"] == 0
    seg = yaml.safe_load((out / "seg_few/config.yaml").read_text())  # fine-tuned from the zero-shot segmenter
    assert (seg["model"]["head"], seg["model"]["head_init"]) == ("language", "zero_shot")
    scratch = yaml.safe_load((out / "seg_few_scratch/config.yaml").read_text())  # the same head type
    assert (scratch["model"]["head"], scratch["model"]["head_init"]) == ("language", "text")
    assert "sparsegps demo results" in proc.stdout and list((out / "gallery").glob("*.png"))
