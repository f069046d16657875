"""The job runner of the recipes (demo, grounding recipe, transfer benchmark): dependencies, the
parallel limit, priority by order added, failures and resumption, against a recorded fake command."""
from __future__ import annotations

import threading
import time

import pytest

from sparsegps.recipes import steps
from sparsegps.recipes.steps import Job, JobFailed, Jobs


class FakeCommands:
    """Stands in for `run_command`: each argv is [name, seconds, exit code]; records when each ran.
    A terminated command ends at once with exit -15."""

    def __init__(self):
        self.lock = threading.Lock()
        self.events: list[tuple[str, str]] = []
        self.running = self.most = 0
        self.threads: list[int | None] = []
        self.ranks: list[int] = []

    def __call__(self, argv, log, show=True, threads=None, started=None, ranks=1):
        name, seconds, code = argv[0], float(argv[1]), int(argv[2])
        stopped = threading.Event()
        with self.lock:
            self.events.append(("start", name))
            self.running += 1
            self.most = max(self.most, self.running)
            self.threads.append(threads)
            self.ranks.append(ranks)
        if started is not None:
            started(type("Process", (), {"terminate": lambda _: stopped.set()})())
        if stopped.wait(seconds):
            code = -15
        with self.lock:
            self.events.append(("end", name))
            self.running -= 1
        log.write_text(name)
        return code

    def order(self, kind: str) -> list[str]:
        return [name for k, name in self.events if k == kind]


@pytest.fixture
def fake(monkeypatch):
    commands = FakeCommands()
    monkeypatch.setattr(steps, "run_command", commands)
    return commands


def test_dependencies_parallel_limit_and_priority(tmp_path, fake, monkeypatch):
    monkeypatch.setattr(steps.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    jobs = Jobs(tmp_path / "logs", parallel=2)
    jobs.add(Job("a", ["a", "1.0", "0"]))  # still running when c (0.1 s) ends, even on a loaded machine
    jobs.add(Job("b", ["b", "0.05", "0"], after=["a"]))
    jobs.add(Job("c", ["c", "0.1", "0"]))
    jobs.add(Job("d", ["d", "0.1", "0"]))
    jobs.add(Job("e", ["e", "0.05", "0"], after=["c"]))
    jobs.wait()
    assert fake.most == 2 and set(jobs.seconds) == {"a", "b", "c", "d", "e"}
    ev = fake.events
    assert ev.index(("end", "a")) < ev.index(("start", "b")) and ev.index(("end", "c")) < ev.index(("start", "e"))
    # a and c first (their threads may record in either order); when c ends, d (added before e)
    # takes its place, although both are ready
    starts = fake.order("start")
    assert set(starts[:2]) == {"a", "c"} and starts[2] == "d"
    assert fake.threads == [2] * 5  # 4 cores shared by 2 jobs
    assert (tmp_path / "logs" / "b.log").read_text() == "b"


def test_one_at_a_time_keeps_the_thread_setting(tmp_path, fake):
    jobs = Jobs(tmp_path / "logs")
    jobs.add(Job("a", ["a", "0", "0"]))
    jobs.add(Job("b", ["b", "0", "0"]))
    jobs.wait()
    assert fake.most == 1 and fake.threads == [None, None] and fake.order("start") == ["a", "b"]


def test_a_failure_fails_its_dependants_and_is_raised(tmp_path, fake):
    jobs = Jobs(tmp_path / "logs", parallel=2)
    jobs.add(Job("done", ["done", "0", "0"]))
    jobs.add(Job("bad", ["bad", "0", "3"], after=["done"]))  # fails once "done" has ended
    jobs.add(Job("after_bad", ["after_bad", "0", "0"], after=["bad"]))
    with pytest.raises(JobFailed, match=r"bad failed \(exit 3\); see .*bad\.log"):
        jobs.wait()
    with pytest.raises(JobFailed, match="bad failed"):
        jobs.wait(["after_bad"])
    jobs.wait(["done"])  # a job that ended before the failure keeps its success
    assert fake.order("start") == ["done", "bad"]


def test_a_job_whose_result_exists_is_not_run_again(tmp_path, fake):
    result = tmp_path / "out" / "summary.json"
    jobs = Jobs(tmp_path / "logs")
    jobs.add(Job("a", ["a", "0", "0"], result=result))
    with pytest.raises(JobFailed, match="a failed"):  # exit 0 without its result is a failure
        jobs.wait()
    result.parent.mkdir()
    result.write_text("{}")
    jobs = Jobs(tmp_path / "logs")
    jobs.add(Job("a", ["a", "0", "0"], result=result))
    jobs.add(Job("b", ["b", "0", "0"], after=["a"]))
    jobs.wait()
    assert fake.order("start") == ["a", "b"] and jobs.seconds["a"] == 0.0


def test_after_a_failure_nothing_starts_and_running_jobs_are_stopped_before_the_raise(tmp_path, fake):
    jobs = Jobs(tmp_path / "logs", parallel=2)
    jobs.add(Job("slow", ["slow", "30", "0"]))
    jobs.add(Job("bad", ["bad", "0.05", "1"]))
    jobs.add(Job("later", ["later", "0", "0"]))  # independent, waiting for a slot when bad fails
    t = time.perf_counter()
    with pytest.raises(JobFailed, match="bad failed"):  # the first failure, not the stopped job's
        jobs.wait()
    assert time.perf_counter() - t < 10  # slow was stopped, not waited for
    assert "later" not in fake.order("start") and fake.order("end") == ["bad", "slow"]
    with pytest.raises(JobFailed, match=r"slow failed \(exit -15\)"):
        jobs.wait(["slow"])
    with pytest.raises(JobFailed, match="bad failed"):
        jobs.wait(["later"])


def test_the_demo_reports_a_failed_command_in_one_message(tmp_path):
    """`python -m sparsegps.demo` with a config folder lacking the pre-training config: the failed
    command and its log are named, without a traceback."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    configs = tmp_path / "configs"
    shutil.copytree(root / "configs", configs)
    (configs / "pretrain" / "tiny_cpu.yaml").unlink()
    proc = subprocess.run([sys.executable, "-m", "sparsegps.demo", "--out", str(tmp_path / "demo"), "--configs",
                           str(configs), "--pretrain-scenes", "4", "--finetune-scenes", "17", "--val-scenes", "2",
                           "--test-scenes", "2", "--workers", "1"], cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert proc.stderr.startswith("error: pretrain failed (exit 2); see ") and "pretrain.log" in proc.stderr


def test_no_job_starts_after_the_deadline_and_the_running_one_ends(tmp_path, fake):
    """A deadline ends a sitting: the job running at it ends as it would; no job starts after it (nor
    one waiting for a job that never started), and those not started raise OutOfTime."""
    import time

    from sparsegps.recipes.steps import OutOfTime

    jobs = Jobs(tmp_path / "logs", parallel=1, deadline=time.perf_counter() + 0.1)
    jobs.add(Job("a", ["a", "0.3", "0"]))
    jobs.add(Job("b", ["b", "0.05", "0"]))
    jobs.add(Job("c", ["c", "0.05", "0"], after=["b"]))
    with pytest.raises(OutOfTime, match="b: not started"):
        jobs.wait()
    assert fake.events == [("start", "a"), ("end", "a")] and set(jobs.seconds) == {"a"}
    with pytest.raises(OutOfTime, match="c: not started"):
        jobs.wait(["c"])


def test_an_exclusive_job_runs_alone_with_every_core_and_nothing_later_overtakes_it(tmp_path, fake, monkeypatch):
    monkeypatch.setattr(steps.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    jobs = Jobs(tmp_path / "logs", parallel=2)
    jobs.add(Job("a", ["a", "0.3", "0"]))
    jobs.add(Job("alone", ["alone", "0.2", "0"], exclusive=True, ranks=2))
    jobs.add(Job("b", ["b", "0.05", "0"]))  # ready, and a slot is free while a runs: it must still wait
    jobs.add(Job("c", ["c", "0.05", "0"]))
    jobs.wait()
    starts = fake.order("start")
    assert starts[:2] == ["a", "alone"] and set(starts[2:]) == {"b", "c"}
    events = fake.events
    assert events.index(("end", "a")) < events.index(("start", "alone")) < events.index(("end", "alone")) \
        < min(events.index(("start", "b")), events.index(("start", "c")))
    threads, ranks = dict(zip(starts, fake.threads)), dict(zip(starts, fake.ranks))
    assert threads["a"] == threads["b"] == 2 and ranks["a"] == 1  # the others share the 4 cores
    assert (threads["alone"], ranks["alone"]) == (2, 2)  # every core, 2 ranks of 2 threads


@pytest.mark.slow
def test_a_job_of_two_ranks_is_one_world_of_two_processes(tmp_path):
    """`run_command(..., ranks=2)` starts `sparsegps` under torch.distributed.run: one run of two ranks."""
    import json

    import numpy as np
    import yaml

    from sparsegps.data import write_scenes

    from helpers import TINY_MODEL, VOCAB, make_scene

    rng = np.random.default_rng(0)
    write_scenes([make_scene(rng, f"t{i}", 300, 3) for i in range(8)], tmp_path / "train", vocabulary=VOCAB,
                 progress=False)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"micro_batch": 2, "global_batch": 4, "steps": 2, "device": "cpu",
                                      "num_workers": 0, "checkpoint_every": 2, "model": TINY_MODEL,
                                      "data": {"train": [str(tmp_path / "train")],
                                               "transforms": {"voxel_size": 0.15, "augment": False}}}))
    code = steps.run_command(["pretrain", "--config", str(config), "--output-dir", str(tmp_path / "run")],
                             tmp_path / "log.txt", show=False, threads=1, ranks=2)
    assert code == 0, (tmp_path / "log.txt").read_text()[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["pretrain_steps"] == 2


def test_command_writes_flags_and_settings_as_the_command_line_reads_them():
    from pathlib import Path

    from sparsegps.config import apply_overrides
    from sparsegps.recipes.steps import command

    argv = command("finetune-seg", {"data.train": [Path("a/b"), "c"], "optim.lr_heads": 2e-3, "optim.lr_backbone": 1e-5, "steps": 7,
                                    "data.val": [], "model.head": "language"},
                   config=Path("x.yaml"), pretrained=None, overwrite=True, resume=False, data=["s1", "s2"])
    assert argv[:6] == ["finetune-seg", "--config", "x.yaml", "--overwrite", "--data", "s1"]
    assert argv[6] == "s2" and "--pretrained" not in argv and "--resume" not in argv
    settings = [argv[i + 1] for i, a in enumerate(argv) if a == "--set"]
    assert apply_overrides({}, settings) == {"data": {"train": ["a/b", "c"], "val": []}, "optim": {"lr_heads": 0.002, "lr_backbone": 1e-5},
                                             "steps": 7, "model": {"head": "language"}}
    with pytest.raises(steps.UsageError, match="KEY=VALUE"):
        steps.parse_settings(["model.dropout"])
    assert steps.parse_settings(["model.dropout=0.1", "a=b=c"]) == {"model.dropout": "0.1", "a": "b=c"}
