"""Faults injected into real runs, and what the job does about each: random bytes in a shard's
colour table or a NaN coordinate end training in one line naming file, scene and field (also from a
DataLoader worker, and from one rank of two), or with `data.on_corrupt: skip` are trained around and
reported; a damaged checkpoint is passed over for the previous one on resume and on export; a full
disk ends the run in one line and keeps the complete checkpoints. (The run folder's lock and
`--overwrite`: test_folder_lock.py; config limits: test_training_commands.py; a killed rank and
SIGTERM: test_launch.py and test_restart.py.)"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from helpers import pretrain_config, write_pretrain_shards

from sparsegps.config import to_dict
from sparsegps.data import ScenesDataset, SceneStore
from sparsegps.data.scene import SceneFormatError
from sparsegps.errors import UsageError
from sparsegps.train.checkpoint import complete_checkpoints, consolidated_state, verify_checkpoint
from sparsegps.train.pretrain import pretrain

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def damage(store: Path, scene_id: str, table: str, how: str = "random bytes") -> Path:
    """Damage scene `scene_id`'s rows of `table` in its shard: 'random bytes' written over the rows in
    the file itself (as a failing disk would), or 'nan' in its first coordinate (through HDF5).
    Returns the shard's path."""
    reader = SceneStore(store, verify=False)
    shard, local = reader.locate(reader.scene_ids().index(scene_id))
    path = reader.shards[shard].path
    reader.close()
    with h5py.File(path, "r+") as f:
        offsets = f["scenes/point_offset" if table.startswith("points/") else "scenes/object_offset"]
        a, b = (int(x) for x in offsets[local:local + 2])
        dataset = f[table]
        if how == "nan":
            rows = dataset[a:b]
            rows[0, 0] = np.nan
            dataset[a:b] = rows
            return path
        row_bytes = dataset.dtype.itemsize * int(np.prod(dataset.shape[1:]))
        start = dataset.id.get_offset()
        assert start is not None, "the test shards' tables are contiguous"
    garbage = np.random.default_rng(0).integers(0, 256, (b - a) * row_bytes, dtype=np.uint8).tobytes()
    with open(path, "r+b") as f:
        f.seek(start + a * row_bytes)
        f.write(garbage)
    return path


def run_cli(args: list[str], timeout: float = 300, env: dict | None = None) -> tuple[int, str, float]:
    """`python -m sparsegps.cli ARGS` in a fresh process: exit status, output, seconds taken."""
    env = {**{k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}, **(env or {})}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    start = time.time()
    proc = subprocess.run(args if args[0] != "sparsegps" else [sys.executable, "-m", "sparsegps.cli", *args[1:]],
                          env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
    return proc.returncode, proc.stdout.decode(), time.time() - start


def error_lines(output: str) -> list[str]:
    return [line for line in re.split(r"[\r\n]", output) if line.startswith("error:")]


def write_config(cfg, path: Path) -> Path:
    path.write_text(yaml.safe_dump(to_dict(cfg)))
    return path


@pytest.fixture
def shards(tmp_path) -> Path:
    return write_pretrain_shards(tmp_path / "data")


# ------------------------------------------------------------------------------------ damaged data

def test_random_bytes_in_a_colour_table_end_training_in_one_line_from_a_worker(shards, tmp_path):
    shard = damage(shards / "train", "t3", "points/rgb")
    cfg = pretrain_config(shards, tmp_path / "run", num_workers=1, steps=4)
    code, output, _ = run_cli(["sparsegps", "pretrain", "--config", str(write_config(cfg, tmp_path / "c.yaml"))])
    errors = error_lines(output)
    assert code == 2 and len(errors) == 1, output[-3000:]
    assert f"file '{shard}', scene 't3', field 'scenes/checksum': checksum mismatch" in errors[0]
    assert errors[0].endswith("(in DataLoader worker process 0)") and "Traceback" not in output
    assert not list((tmp_path / "run").glob("checkpoints/step*"))  # nothing trained on it was saved


def test_a_nan_coordinate_is_a_data_error_naming_the_field_not_a_nan_loss(shards, tmp_path):
    shard = damage(shards / "train", "t5", "points/xyz", how="nan")
    with pytest.raises(SceneFormatError) as raised:
        pretrain(pretrain_config(shards, tmp_path / "run", steps=4), progress=False)
    assert (raised.value.file, raised.value.scene, raised.value.field) == (str(shard), "t5", "xyz")
    assert "NaN or Inf coordinates" in str(raised.value)
    # unverified reads check coordinates too
    reader = SceneStore(shards / "train", verify=False)
    with pytest.raises(SceneFormatError, match="field 'xyz'"):
        reader[reader.scene_ids().index("t5")]


def test_skip_trains_around_damaged_scenes_and_reports_them(shards, tmp_path, capsys):
    shard = damage(shards / "train", "t3", "points/rgb")
    damage(shards / "train", "t4", "points/xyz", how="nan")
    dataset = ScenesDataset(shards / "train", on_corrupt="skip")
    ids = dataset.store.scene_ids()
    replaced = dataset[ids.index("t3")]  # t3, then t4, are damaged: t5 stands in
    assert replaced["scene_id"] == "t5"
    assert [(f, s) for f, s, _ in replaced["skipped"]] == [(str(shard), "t3"), (str(shard), "t4")]
    assert dataset[ids.index("t5")]["skipped"] == []
    with pytest.raises(SceneFormatError, match="scene 't3'"):
        ScenesDataset(shards / "train")[ids.index("t3")]

    cfg = pretrain_config(shards, tmp_path / "run", steps=4, data={
        **to_dict(pretrain_config(shards, tmp_path))["data"], "on_corrupt": "skip"})
    summary = pretrain(cfg, progress=False)
    assert summary["pretrain_steps"] == 4
    assert summary["skipped_scenes"] == 2 and summary["skipped_files"] == [str(shard)]
    warnings = [line for line in capsys.readouterr().out.splitlines() if "skipped damaged scene" in line]
    assert sorted(line.split("scene ")[1].split(" ")[0] for line in warnings) == ["'t3'", "'t4'"]  # each once


# ------------------------------------------------------------------------------ damaged checkpoints

def _scribble(path: Path) -> None:
    """Random bytes over the middle of a file, its size unchanged."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 2)
        f.write(np.random.default_rng(1).integers(0, 256, min(4096, size // 4), dtype=np.uint8).tobytes())


def test_a_damaged_checkpoint_is_passed_over_on_resume_and_export(shards, tmp_path):
    run = tmp_path / "run"
    pretrain(pretrain_config(shards, run, steps=4, keep_checkpoints=3), progress=False)
    step2, step4 = run / "checkpoints" / "step2", run / "checkpoints" / "step4"
    assert verify_checkpoint(step4, content=True) is None
    states = next(step4.glob("*model_states.pt"))
    _scribble(states)
    assert verify_checkpoint(step4) is None  # same size: only the hashes see it
    assert "is damaged" in verify_checkpoint(step4, content=True) and states.name in verify_checkpoint(step4, True)
    with pytest.warns(UserWarning, match=r"step4 is unusable: file .*model_states.pt is damaged"):
        _, _, tag = consolidated_state(run / "checkpoints")
    assert tag == "step2"

    code, output, _ = run_cli(["sparsegps", "pretrain", "--config", str(write_config(
        pretrain_config(shards, run, steps=6, keep_checkpoints=3, resume="auto"), tmp_path / "c.yaml"))])
    assert code == 0, output[-3000:]
    assert "step4 is unusable" in output and f"resumed from {step2} (step 2" in output
    assert json.loads((run / "summary.json").read_text())["pretrain_steps"] == 6

    for folder in complete_checkpoints(run / "checkpoints")[0]:
        _scribble(next(folder.path.glob("*model_states.pt")))
    code, output, _ = run_cli(["sparsegps", "export", str(run / "checkpoints"), "--out", str(tmp_path / "x.pt")])
    errors = error_lines(output)
    assert code == 2 and len(errors) == 1 and "no complete checkpoint to export" in errors[0], output[-2000:]
    assert "step6: file" in errors[0] and "is damaged" in errors[0]


# ------------------------------------------------------------------------------------- a full disk

def _can_mount_tmpfs() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /tmp"],
                           capture_output=True)
    return probe.returncode == 0


@pytest.mark.skipif(not _can_mount_tmpfs(), reason="needs unshare and a tmpfs mount in a user namespace")
def test_a_full_disk_is_one_line_and_keeps_the_complete_checkpoints(shards, tmp_path):
    probe = tmp_path / "probe"
    pretrain(pretrain_config(shards, probe, steps=2, checkpoint_every=2), progress=False)
    size = sum(p.stat().st_size for p in (probe / "checkpoints" / "step2").rglob("*") if p.is_file())
    run, kept = tmp_path / "run", tmp_path / "kept"
    run.mkdir()
    cfg = write_config(pretrain_config(shards, run, steps=6, checkpoint_every=2, keep_checkpoints=3),
                       tmp_path / "c.yaml")
    # a disk with room for one checkpoint and a half, mounted over the run's folder
    script = (f"mount -t tmpfs -o size={int(size * 1.5) // 1024 + 64}k tmpfs {run} && "
              f"{sys.executable} -m sparsegps.cli pretrain --config {cfg}; code=$?; "
              f"cp -r {run}/checkpoints {kept}; exit $code")
    code, output, _ = run_cli(["unshare", "-rm", "sh", "-c", script])
    errors = error_lines(output)
    assert code == 2 and len(errors) == 1, output[-3000:]
    assert f"no space left on the disk of {run / 'checkpoints'}" in errors[0] and "checkpoint step4" in errors[0]
    assert "Traceback" not in output
    assert sorted(p.name for p in kept.iterdir() if p.name.startswith(("step", ".tmp"))) == ["step2"]
    assert verify_checkpoint(kept / "step2", content=True) is None
    consolidated_state(kept)  # loadable


# ------------------------------------------------------------------------------ one rank of two

@pytest.mark.slow
def test_a_damaged_scene_on_one_rank_ends_both_in_one_line_well_before_the_timeout(tmp_path):
    from multirank import uneven_train_set

    from sparsegps.launch import free_port
    from sparsegps.train.order import SampleOrder

    n = uneven_train_set(tmp_path / "train", micro_batch=1)
    order = SampleOrder(n, 2, 0)
    first_of_rank1 = next(order.rank_share(0, 1, 2, 1))[1]
    scene_id = SceneStore(tmp_path / "train").scene_ids()[first_of_rank1]
    damage(tmp_path / "train", scene_id, "points/rgb")
    cfg = pretrain_config(tmp_path, tmp_path / "run", steps=4, micro_batch=1, global_batch=2, dist_timeout_s=120,
                          num_workers=1, data={"train": [str(tmp_path / "train")], "val": [],
                                               "transforms": {"voxel_size": 0.15, "augment": False}})
    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    code, output, seconds = run_cli([*launcher, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m",
                                     "sparsegps.cli", "pretrain", "--config",
                                     str(write_config(cfg, tmp_path / "c.yaml"))], timeout=400)
    errors = error_lines(output)
    assert code != 0 and len(errors) == 1, output[-3000:]
    assert errors[0].startswith("error: rank 1: file ") and f"scene '{scene_id}'" in errors[0]
    assert "[rank0]:" not in output and "[rank1]:" not in output  # no traceback
    assert seconds < 100, f"{seconds:.0f} s: the job waited for the collective timeout"
