"""The job runner of the recipes (demo, grounding recipe, transfer benchmark): dependencies, the
parallel limit, priority by order added, failures and resumption, against a recorded fake command."""
from __future__ import annotations

import threading
import time

import pytest

from sparsegps.recipes import steps
from sparsegps.recipes.steps import Job, JobFailed, Jobs


class FakeCommands:
    """Stands in for `run_command`: each argv is [name, seconds, exit code]; records when each ran."""

    def __init__(self):
        self.lock = threading.Lock()
        self.events: list[tuple[str, str]] = []
        self.running = self.most = 0
        self.threads: list[int | None] = []

    def __call__(self, argv, log, show=True, threads=None):
        name, seconds, code = argv[0], float(argv[1]), int(argv[2])
        with self.lock:
            self.events.append(("start", name))
            self.running += 1
            self.most = max(self.most, self.running)
            self.threads.append(threads)
        time.sleep(seconds)
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
    jobs.add(Job("a", ["a", "0.3", "0"]))
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
    jobs.add(Job("bad", ["bad", "0", "3"]))
    jobs.add(Job("after_bad", ["after_bad", "0", "0"], after=["bad"]))
    jobs.add(Job("other", ["other", "0", "0"]))
    with pytest.raises(JobFailed, match=r"bad failed \(exit 3\); see .*bad\.log"):
        jobs.wait()
    with pytest.raises(JobFailed):
        jobs.wait(["after_bad"])
    jobs.wait(["other"])
    assert "after_bad" not in fake.order("start") and "other" in fake.order("end")


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
