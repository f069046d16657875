"""What a cluster run stands on, without launching one: the world each launcher's environment names
(SLURM's compressed node lists included), the DeepSpeed launcher's --local_rank, the sample order
that does not depend on the world size, stop signals, the check that output_dir is one folder for
every rank, and the shard store's descriptor budget and index-only setup."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import torch

from helpers import VOCAB, make_scene
from multirank import spawn
from sparsegps import cli
from sparsegps.data import SceneStore, ShardError, write_scenes
from sparsegps.errors import Preempted, UsageError
from sparsegps.launch import discover_world, expand_nodelist, strip_local_rank
from sparsegps.train.order import SampleOrder


@pytest.mark.parametrize("nodelist,hosts", [
    ("node07", ["node07"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("gpu[8-10],cpu-a1", ["gpu8", "gpu9", "gpu10", "cpu-a1"]),
    ("r[1-2]n[09-10]", ["r1n09", "r1n10", "r2n09", "r2n10"]),
    ("a[1,3],b[001-002]", ["a1", "a3", "b001", "b002"]),
])
def test_slurm_node_lists_expand_in_order(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("nodelist", ["node[01-03", "node01-03]", "node[03-01]", "node[a-b]", ""])
def test_malformed_node_lists_are_refused(nodelist):
    with pytest.raises(ValueError):
        expand_nodelist(nodelist)


SLURM_TASK = {"SLURM_PROCID": "5", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "4242",
              "SLURM_JOB_NODELIST": "gpu[03-04,09]"}


def test_each_launcher_s_environment_names_one_world():
    torchrun = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "3", "MASTER_ADDR": "n1", "MASTER_PORT": "29500"}
    world = discover_world(torchrun)
    assert (world.rank, world.size, world.local_rank, world.master_addr, world.master_port) == (3, 8, 3, "n1", 29500)
    # srun: rank, size and local rank from SLURM; the first host of the node list and a port from the job id
    world = discover_world(SLURM_TASK)
    assert (world.rank, world.size, world.local_rank, world.master_addr, world.launcher) == (5, 16, 1, "gpu03", "slurm")
    assert world.master_port == discover_world({**SLURM_TASK, "SLURM_PROCID": "0"}).master_port == 15000 + 4242
    given = discover_world({**SLURM_TASK, "MASTER_ADDR": "head", "MASTER_PORT": "7000"})
    assert (given.master_addr, given.master_port) == ("head", 7000)
    # a step's task count wins over the job's; torchrun inside srun sets RANK, which wins over SLURM's
    assert discover_world({**SLURM_TASK, "SLURM_STEP_NUM_TASKS": "8"}).size == 8
    assert discover_world({**SLURM_TASK, **torchrun}).launcher == "torchrun/deepspeed"
    alone = discover_world({})
    assert (alone.rank, alone.size, alone.launcher) == (0, 1, "alone")


@pytest.mark.parametrize("env,message", [
    ({"RANK": "0"}, "RANK is set but not WORLD_SIZE, MASTER_ADDR, MASTER_PORT"),
    ({"SLURM_PROCID": "1"}, "neither SLURM_STEP_NUM_TASKS nor SLURM_NTASKS"),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "9"}, "no host to meet at"),
    ({"SLURM_PROCID": "1", "SLURM_NTASKS": "2", "SLURM_NODELIST": "n1"}, "no port to meet at"),
    ({**SLURM_TASK, "SLURM_JOB_NODELIST": "gpu[03"}, "SLURM_JOB_NODELIST='gpu[03'"),
    ({**SLURM_TASK, "SLURM_PROCID": "16"}, "rank 16 is outside a world of 16"),
])
def test_a_partial_world_is_refused_in_one_line(env, message):
    with pytest.raises(UsageError, match=message.replace("[", r"\[")) as error:
        discover_world(env)
    assert "\n" not in str(error.value)


def test_the_deepspeed_launcher_s_local_rank_goes_before_or_after_the_subcommand():
    assert strip_local_rank(["--local_rank=3", "pretrain", "--config", "x"]) == (["pretrain", "--config", "x"], 3)
    assert strip_local_rank(["pretrain", "--local_rank", "2", "--resume"]) == (["pretrain", "--resume"], 2)
    assert strip_local_rank(["pretrain", "--config", "x"]) == (["pretrain", "--config", "x"], None)
    assert strip_local_rank(["--local_rank=x", "pretrain"]) == (["--local_rank=x", "pretrain"], None)


def test_the_sample_order_does_not_depend_on_the_world_size():
    """Step k reads the same samples on 1, 2 or 4 ranks (with any split into micro-batches), from the
    start or from any step on, and epoch e is a seeded permutation cut to whole global batches."""
    size, global_batch, seed, steps = 22, 8, 3, 7  # 2 steps per epoch; 6 of each permutation dropped
    order = SampleOrder(size, global_batch, seed)
    permutations = [torch.randperm(size, generator=torch.Generator().manual_seed(seed + e)).tolist()[:16]
                    for e in range(4)]
    expected = [[(k // 2, i) for i in permutations[k // 2][(k % 2) * 8:(k % 2 + 1) * 8]] for k in range(steps)]
    for world, micro in ((1, 8), (1, 2), (2, 4), (2, 1), (4, 2), (8, 1)):
        for start_step in (0, 3):
            shares = [order.rank_share(start_step * global_batch, rank, world, micro) for rank in range(world)]
            for k in range(start_step, steps):
                step = []
                for _ in range(global_batch // (micro * world)):  # micro-steps; ranks in rank order
                    for share in shares:
                        step += [next(share) for _ in range(micro)]
                assert step == expected[k], (world, micro, k)
    assert order.epoch_of(16) == 1 and order.epoch_of(15) == 0
    with pytest.raises(UsageError, match="5 scenes cannot fill one global batch of 8"):
        SampleOrder(5, 8, 0)


def test_stop_signals_set_a_flag_while_training_and_restore_the_handlers():
    from sparsegps.train.preemption import StopSignals

    before = signal.getsignal(signal.SIGUSR1)
    with StopSignals() as signals:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.received == signal.SIGUSR1  # the first one counts
    assert signal.getsignal(signal.SIGUSR1) is before


def test_the_checkpoint_clock_is_rank_0_s_alone(monkeypatch):
    import sparsegps.train.preemption as preemption

    now = [1000.0]
    monkeypatch.setattr(preemption.time, "monotonic", lambda: now[0])
    clocks = [preemption.CheckpointClock(2.0, rank) for rank in (0, 1)] + [preemption.CheckpointClock(0.0, 0)]
    now[0] += 119.0
    assert [c.due() for c in clocks] == [False, False, False]
    now[0] += 1.0
    assert [c.due() for c in clocks] == [True, False, False]  # only rank 0's clock says save; 0 minutes: never
    clocks[0].reset()
    assert not clocks[0].due()


def test_a_stopped_run_exits_with_128_plus_the_signal_and_one_line(monkeypatch, capsys):
    import sparsegps.train.pretrain as module

    def stopped(cfg, progress=True):
        assert cfg.resume == "auto"
        raise Preempted("SIGTERM", signal.SIGTERM, 12, "runs/x/checkpoints/step12")

    monkeypatch.setattr(module, "pretrain", stopped)
    monkeypatch.setenv("LOCAL_RANK", "0")  # what the launcher sets beside --local_rank; undone after
    config = Path(__file__).resolve().parents[1] / "configs/pretrain/tiny_cpu.yaml"
    assert cli.main(["--local_rank=0", "pretrain", "--config", str(config), "--resume", "auto"]) == 143
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["stopped by SIGTERM after step 12: checkpoint runs/x/checkpoints/step12 saved; the same command "
                     "with --resume auto continues the run"]


def _shared_check_worker(rank, world, port, root, same):
    from multirank import join_as

    join_as(rank, world, port)
    import torch.distributed as dist

    from sparsegps.train.run import check_shared_directory

    dist.init_process_group("gloo", rank=rank, world_size=world)
    # rank 1 looks at another folder under the same name: a node-local disk
    folder = Path(root) / ("run" if same or rank == 0 else "elsewhere/run")
    try:
        check_shared_directory(folder)
        outcome = "ok"
    except UsageError as e:
        outcome = str(e)
    (Path(root) / f"outcome{rank}.txt").write_text(outcome)


@pytest.mark.parametrize("same", [True, False], ids=["shared", "node-local"])
def test_an_output_dir_that_is_not_one_folder_for_all_ranks_stops_every_rank(tmp_path, same):
    spawn(_shared_check_worker, str(tmp_path), same)
    outcomes = [(tmp_path / f"outcome{r}.txt").read_text() for r in range(2)]
    if same:
        assert outcomes == ["ok", "ok"] and not list((tmp_path / "run").iterdir())  # the token is gone
        return
    assert outcomes[0] == outcomes[1] and "\n" not in outcomes[0]
    assert outcomes[0].startswith(f"output_dir {tmp_path / 'run'} is not one folder for all ranks: rank 1 on ")
    assert "cannot read rank 0's token" in outcomes[0]


def open_descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture(scope="module")
def many_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("many-shards")
    rng = np.random.default_rng(0)
    write_scenes([make_scene(rng, f"s{i:03d}", 60, 1) for i in range(40)], root, vocabulary=VOCAB,
                 max_scenes_per_shard=1, progress=False)
    return root


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")
@pytest.mark.parametrize("cap", [5, 1000])
def test_a_store_keeps_at_most_max_open_shards_open(many_shards, cap):
    store = SceneStore(many_shards, max_open=cap)
    base, peak = open_descriptors(), 0
    for i in np.random.default_rng(1).permutation(len(store)).tolist() * 2:
        assert store[i].scene_id == f"s{i:03d}"
        peak = max(peak, open_descriptors() - base)
    # every open shard holds two descriptors (h5py's and the one read with preadv)
    assert peak == 2 * min(cap, len(store)) and len(store._open) == min(cap, len(store))
    store.close()
    assert open_descriptors() == base


def test_a_store_is_set_up_from_its_index_alone(many_shards, tmp_path, monkeypatch):
    import sparsegps.data.store as store_module

    opened = []
    original = store_module._open_shard
    monkeypatch.setattr(store_module, "_open_shard", lambda path: opened.append(Path(path).name) or original(path))
    store = SceneStore(many_shards)
    assert opened == [] and len(store) == 40 and store.vocabulary == VOCAB
    assert store.scene_ids()[:2] == ["s000", "s001"] and opened == []
    assert store[7].scene_id == "s007" and opened == ["shard-00007.h5"]
    # shards named as files are opened to count them, as before
    opened.clear()
    assert len(SceneStore([many_shards / "shard-00003.h5", many_shards / "shard-00004.h5"])) == 2
    assert opened == ["shard-00003.h5", "shard-00004.h5"]
    # a shard the index lists but the folder lacks is named at setup
    partial = tmp_path / "partial"
    partial.mkdir()
    for name in ("index.json", "shard-00000.h5", "shard-00001.h5"):
        (partial / name).write_bytes((many_shards / name).read_bytes())
    with pytest.raises(ShardError, match=r"shard-00002\.h5.*listed in index.json but missing"):
        SceneStore(partial)


def test_a_stale_index_is_named_on_first_read(many_shards, tmp_path):
    import json

    for name in ("shard-00000.h5", "shard-00001.h5"):
        (tmp_path / name).write_bytes((many_shards / name).read_bytes())
    index = json.loads((many_shards / "index.json").read_text())
    index["shards"] = index["shards"][:2]
    index["shards"][1]["scenes"].append("gone")
    (tmp_path / "index.json").write_text(json.dumps(index))
    store = SceneStore(tmp_path)
    assert len(store) == 3 and store[0].scene_id == "s000"
    with pytest.raises(ShardError, match=r"shard-00001\.h5.*holds 1 scenes where index.json lists 2"):
        store[1]


def test_the_open_file_limit_is_raised_to_the_hard_limit():
    import resource

    from sparsegps.data.store import raise_open_file_limit

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if hard != resource.RLIM_INFINITY and hard > 256:
            resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
        raised, _ = raise_open_file_limit()
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] == raised
        assert raised == hard or (hard == resource.RLIM_INFINITY and raised >= 256)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


class SignalsItself(torch.utils.data.Dataset):
    """Each item sends SIGTERM and SIGUSR1 to the process reading it, as SLURM signals every process."""

    def __len__(self) -> int:
        return 4

    def __getitem__(self, i: int) -> int:
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        return i


@pytest.mark.parametrize("ignore", [True, False])
def test_dataloader_workers_outlive_a_job_wide_stop_signal(ignore):
    from sparsegps.train.preemption import ignore_stop_signals_in_worker

    loader = torch.utils.data.DataLoader(SignalsItself(), num_workers=1,
                                         worker_init_fn=ignore_stop_signals_in_worker if ignore else None)
    if ignore:
        assert [int(x) for x in loader] == [0, 1, 2, 3]
    else:  # what the training process would meet without it
        with pytest.raises(RuntimeError, match="DataLoader worker"):
            list(loader)


class BrokenEngine:
    """What load_latest_checkpoint asks of a DeepSpeed engine; every load fails like a corrupt file."""

    def __init__(self, stage: int):
        self.stage, self._config, self.tried = stage, type("Config", (), {})(), []

    def zero_optimization_stage(self) -> int:
        return self.stage

    def load_checkpoint(self, directory, tag):
        self.tried.append((Path(directory).name, tag))
        raise RuntimeError("PytorchStreamReader failed reading zip archive")


def fake_checkpoint(directory: Path, step: int, world: int, stage: int | None, manifest: bool = True) -> None:
    import json

    folder = directory / f"step{step}"
    folder.mkdir(parents=True)
    (folder / "mp_rank_00_model_states.pt").write_bytes(b"not a checkpoint")
    if manifest:
        (folder / "manifest.json").write_text(json.dumps({"step": step, "world_size": world, "zero_stage": stage,
                                                          "files": {"mp_rank_00_model_states.pt": 16}}))


def test_when_no_checkpoint_loads_the_error_says_why_for_each(tmp_path):
    from sparsegps.train.checkpoint import load_latest_checkpoint

    assert load_latest_checkpoint(BrokenEngine(2), tmp_path / "none") is None  # nothing there: start afresh
    fake_checkpoint(tmp_path, 6, world=1, stage=2, manifest=False)  # its writer died before the manifest
    fake_checkpoint(tmp_path, 4, world=2, stage=2)  # another world size: needs resharding, fails
    fake_checkpoint(tmp_path, 2, world=1, stage=2)  # this world size: a corrupt file
    engine = BrokenEngine(2)
    with pytest.warns(UserWarning), pytest.raises(UsageError) as error:
        load_latest_checkpoint(engine, tmp_path)
    message = str(error.value)
    assert "\n" not in message and message.startswith(f"no checkpoint in {tmp_path} loads: ")
    assert "step6: no manifest (partial checkpoint)" in message
    assert "step4: failed to load (written by 2 ranks, this run has 1: RuntimeError: converting it to a universal " \
           "checkpoint failed" in message
    assert "step2: failed to load (RuntimeError: PytorchStreamReader failed reading zip archive)" in message
    assert engine.tried == [(tmp_path.name, "step2")]  # resharding failed before DeepSpeed read anything
    assert not (tmp_path / "step4/.tmp-universal").exists()
    with pytest.warns(UserWarning), pytest.raises(UsageError, match="step4 was written under ZeRO stage 2 and this "
                                                                    "run uses stage 3"):
        load_latest_checkpoint(BrokenEngine(3), tmp_path)


@pytest.mark.parametrize("local_rank,visible,expected", [(3, 8, 3), (3, 1, 0), (5, 2, 1)])
def test_a_rank_takes_its_local_gpu_among_those_it_sees(monkeypatch, local_rank, visible, expected):
    from sparsegps.device import pick_device

    monkeypatch.setenv("LOCAL_RANK", str(local_rank))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert pick_device("cuda") == torch.device("cuda", expected)
