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
FIELDS = ("grounding_acc", "grounding_chance", "seg_miou", "seg_miou_scratch", "seg_miou_few", "seg_miou_few_scratch",
          "zero_shot_miou", "zero_shot_baseline", "pretrain_scenes_per_s", "total_seconds")


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
                               str(ROOT / "configs"), "--train-scenes", "8", "--val-scenes", "3", "--pretrain-steps",
                               "2", "--seg-steps", "2", "--pretrain-set", "model.referral_contrast=projected",
                               "--pretrain-set", "num_workers=0"],
                              cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **group}, capture_output=True,
                              text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    for name in FIELDS:
        assert isinstance(summary[name], float) and math.isfinite(summary[name]), (name, summary[name])
    assert 0 <= summary["zero_shot_miou"] <= 1 and summary["pretrain_steps"] == 2
    assert summary["pretrain_overrides"] == ["model.referral_contrast=projected", "num_workers=0"]
    used = yaml.safe_load((out / "pretrain/config.yaml").read_text())
    assert used["model"]["referral_contrast"] == "projected" and used["num_workers"] == 0
    seg = yaml.safe_load((out / "seg/config.yaml").read_text())  # fine-tuned from the zero-shot segmenter
    assert (seg["model"]["head"], seg["model"]["head_init"]) == ("language", "zero_shot")
    assert "sparsegps demo results" in proc.stdout and list((out / "gallery").glob("*.png"))
