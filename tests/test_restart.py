"""Restarts the way a cluster runs them, on gloo ranks of one machine: a stop signal on one rank
mid-run leaves a complete checkpoint and `resume: auto` ends with the weights of an uninterrupted
run; a ZeRO-2 checkpoint of 2 ranks continues on 1 and one of 1 rank on 2, reading the same samples
at the same steps."""
from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import VOCAB, make_scene
from multirank import join_as, spawn
from helpers import pretrain_config as config

from sparsegps.data import write_scenes
from sparsegps.exports import read_export
from sparsegps.train.checkpoint import consolidated_state, verify_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SCENES, GLOBAL_BATCH, SEED = 8, 2, 0  # 4 steps an epoch


def _worker(rank, world, port, data, runs):
    """pretrain() with `resume: auto` for each (output_dir, steps, stop_at_forward) of `runs`, one after
    the other in these processes, recording the (epoch, index) items this rank reads and, right after
    a resume, the parameters and buffers the engine holds; in a run's forward number
    `stop_at_forward` (0: never) rank 0 alone sends itself SIGTERM."""
    join_as(rank, world, port)
    import sparsegps.train.loop as loop
    from sparsegps.data import ScenesDataset
    from sparsegps.errors import Preempted
    from sparsegps.models.gps import GPSModel
    from sparsegps.train.pretrain import pretrain

    read, forwards, resumed = [], [], {}
    original_item, original_forward, original_restore = ScenesDataset.__getitem__, GPSModel.forward, loop.restore

    def recording(self, item):
        read.append(item)
        return original_item(self, item)

    def forward(self, batch):
        forwards.append(1)
        if rank == 0 and len(forwards) == stop_at_forward:
            os.kill(os.getpid(), signal.SIGTERM)  # mid-step: this forward, backward and step still run
        return original_forward(self, batch)

    def restore(run, engine, order):
        import deepspeed

        position = original_restore(run, engine, order)
        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()),
                                               enabled=engine.zero_optimization_stage() == 3):
            resumed.update({k: v.detach().clone() for k, v in engine.module.state_dict().items()})
        return position

    ScenesDataset.__getitem__, GPSModel.forward, loop.restore = recording, forward, restore
    for out, steps, stop_at_forward in runs:
        read.clear(), forwards.clear(), resumed.clear()
        torch.manual_seed(0)
        cfg = config(Path(data), Path(out), steps=steps, micro_batch=1, global_batch=GLOBAL_BATCH,
                     checkpoint_every=2, keep_checkpoints=5, dist_timeout_s=120, resume="auto", seed=SEED,
                     deepspeed=str(ROOT / "configs/deepspeed/zero2.json"),
                     data={"train": [str(Path(data) / "train")], "val": [],
                           "transforms": {"voxel_size": 0.15, "augment": False}})
        try:
            result = {"steps": pretrain(cfg, progress=False)["pretrain_steps"]}
        except Preempted as e:
            result = {"preempted": e.step, "signal": e.signal_name, "exit_code": e.exit_code}
        attempt = len(list(Path(out).glob(f"rank{rank}-*")))
        torch.save({"read": list(read), "resumed": dict(resumed), **result}, Path(out) / f"rank{rank}-{attempt}.pt")


def outcome(out: Path, rank: int, attempt: int) -> dict:
    return torch.load(out / f"rank{rank}-{attempt}.pt", weights_only=False)


def steps_read(out: Path, attempt: int, world: int, first_step: int) -> dict[int, list]:
    """{step: the (epoch, index) items of the step, micro-step by micro-step, rank by rank}."""
    reads = [outcome(out, r, attempt)["read"] for r in range(world)]
    micro = GLOBAL_BATCH // world
    steps = {}
    for k in range(len(reads[0]) // micro):
        items = [item for r in range(world) for item in reads[r][k * micro:(k + 1) * micro]]
        steps.setdefault(first_step + k * micro * world // GLOBAL_BATCH, []).extend(items)
    return steps


def the_order(steps: range) -> dict[int, list]:
    """The oracle: epoch e is torch.randperm(SCENES) seeded with SEED + e; step k (from 1) reads
    the next GLOBAL_BATCH of it."""
    per_epoch = SCENES // GLOBAL_BATCH
    order = {}
    for k in steps:
        epoch, within = divmod(k - 1, per_epoch)
        perm = torch.randperm(SCENES, generator=torch.Generator().manual_seed(SEED + epoch)).tolist()
        order[k] = [(epoch, i) for i in perm[within * GLOBAL_BATCH:(within + 1) * GLOBAL_BATCH]]
    return order


def fresh_copy(checkpoint: Path, out: Path) -> None:
    """A run folder holding only `checkpoint`, as if the run had stopped right after saving it."""
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(checkpoint, out / "checkpoints" / checkpoint.name)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("restart")
    rng = np.random.default_rng(0)
    write_scenes([make_scene(rng, f"t{i}", 300, 3) for i in range(SCENES)], root / "train", vocabulary=VOCAB,
                 progress=False)
    return root


@pytest.mark.slow
def test_a_signal_stops_every_rank_at_a_checkpoint_and_any_world_size_continues_the_run(data, tmp_path):
    """SIGTERM to rank 0 alone during step 3: both ranks finish step 3, save it and stop, and the same
    command (`resume: auto`) ends with the weights of an uninterrupted run, bit for bit. The run's
    2-rank ZeRO-2 checkpoint of step 2 continues on 1 rank, and that rank's checkpoint on 2 ranks:
    right after each resume the engine holds exactly the checkpoint's consolidated weights and
    BatchNorm statistics, and every step of every run reads the samples the one order gives it."""
    straight, stopped, one, two = tmp_path / "straight", tmp_path / "stopped", tmp_path / "one", tmp_path / "two"
    spawn(_worker, str(data), [(str(straight), 4, 0), (str(stopped), 4, 3), (str(stopped), 4, 0)])
    assert outcome(straight, 0, 0)["steps"] == 4 and steps_read(straight, 0, 2, 1) == the_order(range(1, 5))
    for rank in range(2):
        assert {k: v for k, v in outcome(stopped, rank, 0).items() if k not in ("read", "resumed")} == \
            {"preempted": 3, "signal": "SIGTERM", "exit_code": 143}
    assert steps_read(stopped, 0, 2, 1) == the_order(range(1, 4))
    assert verify_checkpoint(stopped / "checkpoints" / "step3") is None
    assert outcome(stopped, 0, 1)["steps"] == 4 and steps_read(stopped, 1, 2, 4) == the_order(range(4, 5))
    a = read_export(straight / "export.safetensors").state_dict
    b = read_export(stopped / "export.safetensors").state_dict
    assert a.keys() == b.keys()
    for name in a:  # same ranks, same order of every reduction
        assert torch.equal(a[name], b[name]), name

    fresh_copy(stopped / "checkpoints" / "step2", one)
    spawn(_worker, str(data), [(str(one), 3, 0)], world=1)
    assert outcome(one, 0, 0)["steps"] == 3 and steps_read(one, 0, 1, 3) == the_order(range(3, 4))
    fresh_copy(one / "checkpoints" / "step3", two)
    spawn(_worker, str(data), [(str(two), 4, 0)])
    assert outcome(two, 0, 0)["steps"] == 4 and steps_read(two, 0, 2, 4) == the_order(range(4, 5))
    for folder, checkpoint, ranks in ((one, one / "checkpoints/step2", 1), (two, two / "checkpoints/step3", 2)):
        expected, _, _ = consolidated_state(checkpoint.parent, tag=checkpoint.name)
        assert any("running_mean" in name for name in expected)
        for rank in range(ranks):
            resumed = outcome(folder, rank, 0)["resumed"]
            assert resumed.keys() == expected.keys()
            for name, value in expected.items():
                assert torch.equal(resumed[name].to(value.dtype), value), (folder.name, rank, name)
