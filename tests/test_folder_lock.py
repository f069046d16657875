"""A run folder belongs to one run: a second run is refused naming the holder, a dead run's lock is
taken over, an earlier run's checkpoints are never removed without --overwrite."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest
from helpers import TINY_MODEL, pretrain_config, write_pretrain_shards

from sparsegps import cli
from sparsegps.errors import UsageError
from sparsegps.train import folder_lock
from sparsegps.train.pretrain import pretrain


def test_a_live_holder_is_refused_a_dead_one_taken_over(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / ".lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname(),
                                                    "started": "2026-01-01 00:00:00", "command": "sparsegps pretrain"}))
        error = folder_lock.acquire(tmp_path)
        assert f"belongs to a running run (pid {holder.pid} on {socket.gethostname()}" in error
    finally:
        holder.kill()
        holder.wait()
    assert folder_lock.acquire(tmp_path) is None  # its process is gone: stale
    assert "a stale lock" in capsys.readouterr().out
    assert json.loads((tmp_path / ".lock").read_text())["pid"] == os.getpid()
    (tmp_path / ".lock").write_text(json.dumps({"pid": 1, "host": "another-node", "started": "x"}))
    error = folder_lock.acquire(tmp_path)
    assert "on another-node" in error and f"if that run is gone, remove {tmp_path / '.lock'}" in error
    (tmp_path / ".lock").write_text("{half-writ")  # damaged
    assert folder_lock.acquire(tmp_path) is None
    folder_lock.release(tmp_path)
    assert not (tmp_path / ".lock").exists()


def test_checkpoints_are_kept_without_overwrite_and_the_lock_ends_with_the_run(tmp_path, capsys):
    shards = write_pretrain_shards(tmp_path / "data")
    run = tmp_path / "run"
    cfg = pretrain_config(shards, run, steps=2, checkpoint_every=2, model=TINY_MODEL)
    pretrain(cfg, progress=False)
    assert not (run / ".lock").exists()  # released at the end
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(UsageError, match=r"holds an earlier run's checkpoints \(step2\): continue it with --resume "
                                         r"auto, or start afresh with --overwrite"):
        pretrain(cfg, progress=False)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before and not (run / ".lock").exists()
    config = tmp_path / "tiny.yaml"
    import yaml

    from sparsegps.config import to_dict

    config.write_text(yaml.safe_dump(to_dict(cfg)))
    assert cli.main(["pretrain", "--config", str(config), "--overwrite"]) == 0
    assert "removed the checkpoints of an earlier run" in capsys.readouterr().out
