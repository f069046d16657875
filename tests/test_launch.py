"""The command line as users launch it: `torchrun -m sparsegps.cli pretrain` on 2 ranks with uneven
data and an odd held-out set, kill-and-resume on 2 ranks, one run continued by every launcher (the
deepspeed launcher's form, the sbatch script's srun tasks, static and c10d torchrun nodes) through a
SIGTERM, and errors a user can fix printed as one line with exit status 2 (once, on several ranks)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from multirank import odd_val_set, uneven_train_set
from helpers import pretrain_config as config

from sparsegps import cli
from sparsegps.config import save_config, to_dict
from sparsegps.errors import UsageError
from sparsegps.exports import read_export

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER_VARS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE")


def torchrun(*args: str, ranks: int = 2) -> list[str]:
    from sparsegps.launch import free_port

    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    return [*launcher, "--nproc_per_node", str(ranks), "--master_port", str(free_port()), "-m", "sparsegps.cli",
            *args]


def launch(cmd: list[str], wait: bool = True, timeout: float = 400, env: dict | None = None):
    env = {**{k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}, **(env or {})}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    proc = subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    if not wait:
        return proc
    try:
        output = proc.communicate(timeout=timeout)[0].decode()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"{' '.join(cmd)} hung for {timeout} s") from None
    return proc.returncode, output


@pytest.fixture(scope="module")
def run_config(tmp_path_factory) -> Path:
    """A YAML config of the tiny model on uneven shards (rank 1 meets micro-batches without
    referrals, captions, texts or objects) and 3 held-out scenes evaluated every 3 steps."""
    root = tmp_path_factory.mktemp("launch")
    uneven_train_set(root / "train", micro_batch=1)
    odd_val_set(root / "val")
    cfg = config(root, root / "unused", steps=6, micro_batch=1, global_batch=2, eval_every=3, checkpoint_every=2,
                 keep_checkpoints=5, dist_timeout_s=120,
                 data={"train": [str(root / "train")], "val": [str(root / "val")], "eval_max_scenes": None,
                       "transforms": {"voxel_size": 0.15, "augment": False}})
    save_config(cfg, root / "run.yaml")
    return root / "run.yaml"


def pretrain_args(run_config: Path, out: Path, *extra: str) -> list[str]:
    return ["pretrain", "--config", str(run_config), "--deepspeed", str(ROOT / "configs/deepspeed/zero2.json"),
            "--output-dir", str(out), *extra]


@pytest.mark.slow
def test_torchrun_two_ranks_uneven_data_with_evaluation_and_kill_resume(run_config, tmp_path):
    code, output = launch(torchrun(*pretrain_args(run_config, tmp_path / "straight")))
    assert code == 0, output[-4000:]
    summary = json.loads((tmp_path / "straight" / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["pretrain_steps"] == 6 and summary["eval_scenes"] == 3
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["kind"] == "eval"] == [3]

    killed = tmp_path / "killed"
    proc = launch(torchrun(*pretrain_args(run_config, killed)), wait=False)
    deadline = time.time() + 300
    while time.time() < deadline and not (killed / "checkpoints" / "step2").exists() and proc.poll() is None:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (killed / "checkpoints" / "step2").exists() and not (killed / "export.safetensors").exists()
    code, output = launch(torchrun(*pretrain_args(run_config, killed, "--resume")))
    assert code == 0, output[-4000:]
    assert "resumed from" in output
    a = read_export(tmp_path / "straight" / "export.safetensors").state_dict
    b = read_export(killed / "export.safetensors").state_dict
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_missing_shards_on_two_ranks_is_one_line_once(run_config, tmp_path):
    code, output = launch(torchrun(*pretrain_args(run_config, tmp_path / "run", "--set", "data.train=[nowhere]")))
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert errors == ["error: no such shard or directory: nowhere"], output[-3000:]
    # no rank prints a traceback ([rankN]: lines); torchrun then reports the children's exit status
    assert "[rank0]:" not in output and "[rank1]:" not in output and code != 0


def run_cli(capsys, *argv: str) -> tuple[int, str]:
    code = cli.main(list(argv))
    return code, capsys.readouterr().err


def test_expected_failures_are_one_line_with_exit_status_2(tmp_path, capsys, run_config):
    not_a_checkpoint = tmp_path / "notes.txt"
    not_a_checkpoint.write_text("hello")
    data = str(run_config.parent / "val")
    cases = {
        ("eval-seg", "--checkpoint", str(tmp_path / "missing.pt"), "--data", data): "missing.pt: no such export file",
        ("eval-seg", "--checkpoint", str(not_a_checkpoint), "--data", data): "notes.txt: not a sparsegps export",
        ("eval-pretrain", "--checkpoint", str(tmp_path / "missing.pt"), "--data", data): "no such export file",
        ("export", str(tmp_path / "nothing"), "--out", str(tmp_path / "x.pt")): "no complete checkpoint",
        ("pretrain", "--config", str(run_config), "--set", "steps=abc"): "steps: expected an integer",
        ("pretrain", "--config", str(run_config), "--output-dir", str(tmp_path / "fresh"), "--resume"):
            "--resume: no complete checkpoint",
        ("pretrain", "--config", str(run_config), "--output-dir", str(tmp_path / "fresh"), "--resume", "must"):
            "--resume: no complete checkpoint",
    }
    for argv, message in cases.items():
        code, err = run_cli(capsys, *argv)
        lines = err.strip().splitlines()
        assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], (argv, err)
    with pytest.raises(Exception, match="no such export file"):  # --debug shows the traceback
        cli.main(["eval-seg", "--checkpoint", str(tmp_path / "missing.pt"), "--data", data, "--debug"])


def test_an_export_of_another_shape_is_refused_naming_the_file(tmp_path, run_config):
    from sparsegps.exports import ExportInfo, load_model, save_export
    from sparsegps.models.gps import GPSModel

    cfg = config(run_config.parent, tmp_path)
    save_export(tmp_path / "other.safetensors", GPSModel(cfg.model).state_dict(),
                ExportInfo("pretraining", {**to_dict(cfg.model), "d_model": 64}))
    with pytest.raises(UsageError, match=r"other\.safetensors: its weights do not fit this model"):
        load_model(tmp_path / "other.safetensors")


def two_nodes(*args: str, node_rank: int | None, port: int) -> list[str]:
    """One torchrun "node" of two, one rank each: static (`node_rank` given) or c10d rendezvous."""
    exe = Path(sys.executable).with_name("torchrun")
    launcher = [str(exe)] if exe.exists() else [sys.executable, "-m", "torch.distributed.run"]
    if node_rank is None:
        rendezvous = ["--rdzv_backend", "c10d", "--rdzv_endpoint", f"127.0.0.1:{port}", "--rdzv_id", "cluster-test"]
    else:
        rendezvous = ["--node_rank", str(node_rank), "--master_addr", "127.0.0.1", "--master_port", str(port)]
    return [*launcher, "--nnodes", "2", "--nproc_per_node", "1", *rendezvous, "-m", "sparsegps.cli", *args]


def finish_all(procs, timeout: float = 400) -> list[tuple[int, str]]:
    """Exit status and output of each process, read concurrently (a full pipe would stall its rank)."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(len(procs)) as pool:
        outputs = list(pool.map(lambda p: launch_output(p, timeout), procs))
    return [(p.returncode, output) for p, output in zip(procs, outputs)]


def launch_output(proc, timeout: float) -> str:
    try:
        return proc.communicate(timeout=timeout)[0].decode()
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise AssertionError(f"{' '.join(proc.args)} hung for {timeout} s") from None


def port_is_free(port: int) -> bool:
    import socket

    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def newest_checkpoint(out: Path) -> tuple[int, dict]:
    from sparsegps.train.checkpoint import complete_checkpoints

    found, broken = complete_checkpoints(out / "checkpoints")
    assert found and not broken, broken
    return found[0].step, json.loads((found[0].path / "manifest.json").read_text())


@pytest.mark.slow
def test_one_run_through_every_launcher_with_signals_and_auto_resume(run_config, tmp_path, capsys, monkeypatch):
    """One run folder, continued by each launcher in turn with `--resume auto`: the deepspeed
    launcher's `--local_rank=0 pretrain` starts it afresh on one rank; the sbatch script's two srun tasks
    (SLURM variables, no RANK) continue it as one world of 2; two static torchrun nodes continue it
    until SIGTERM, which leaves a complete checkpoint; two c10d-rendezvous torchrun nodes finish it."""
    from sparsegps.launch import free_port

    out = tmp_path / "run"
    args = pretrain_args(run_config, out, "--resume", "auto", "--set", "data.val=[]", "--set", "eval_every=0")
    # the deepspeed launcher runs `python -u -m sparsegps.cli --local_rank=0 pretrain ...` (LOCAL_RANK set too)
    monkeypatch.setenv("LOCAL_RANK", "0")
    # checkpoints by the clock too: every step, as 0.006 s have always passed since the last one
    clock = ["--set", "checkpoint_every=100", "--set", "checkpoint_every_minutes=0.0001"]
    assert cli.main(["--local_rank=0", *args, "--set", "steps=2", *clock]) == 0, capsys.readouterr().err[-3000:]
    assert newest_checkpoint(out)[1]["world_size"] == 1 and (out / "checkpoints/step1/manifest.json").exists()
    assert "resumed" not in capsys.readouterr().out  # an empty folder: started afresh

    # configs/slurm/pretrain.sbatch as SLURM runs it on 2 nodes of one task (a stand-in srun on PATH gives
    # each task SLURM's variables, no RANK): the tasks meet at the node list's first host, on a port
    # derived from the job id, and continue the 1-rank checkpoint as one world of 2
    job = next(j for j in range(1000, 10000) if port_is_free(15000 + j))
    slurm = {"PATH": f"{ROOT / 'tests/fake_slurm'}:{os.environ['PATH']}", "SLURM_JOB_ID": str(job),
             "SLURM_NTASKS": "2", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NODELIST": "localhost",
             "CONFIG": str(run_config), "DEEPSPEED": str(ROOT / "configs/deepspeed/zero2.json"), "OUTPUT_DIR": str(out),
             "PYTHON": sys.executable, "FAKE_SCONTROL_LOG": str(tmp_path / "scontrol.log")}
    sbatch = ["bash", str(ROOT / "configs/slurm/pretrain.sbatch"), "--set", "data.val=[]", "--set", "eval_every=0"]
    code, output = launch([*sbatch, "--set", "steps=4", "--set", "num_workers=1"], env=slurm)
    assert code == 0, output[-4000:]
    assert f"2 ranks, rendezvous at localhost:{15000 + job}" in output
    assert "step 2, 4 samples consumed, epoch 0; written by 1 rank(s), now 2" in output
    assert json.loads((out / "summary.json").read_text())["world_size"] == 2
    assert newest_checkpoint(out)[1]["world_size"] == 2 and not (tmp_path / "scontrol.log").exists()
    # stopped by SIGUSR1 or SIGTERM (exit 138 / 143): the job requeues itself; any other failure is reported
    for status, requeued in ((138, True), (143, True), (2, False)):
        code, _ = launch(sbatch, env={**slurm, "FAKE_SRUN_EXIT": str(status)})
        log = tmp_path / "scontrol.log"
        assert (code, log.exists() and log.read_text() == f"requeue {job}\n") == (0 if requeued else status, requeued)
        log.unlink(missing_ok=True)

    port = free_port()
    procs = [launch(two_nodes(*args, "--set", "steps=40", "--set", "num_workers=1", node_rank=r, port=port),
                    wait=False) for r in range(2)]
    deadline = time.time() + 300
    while time.time() < deadline and all(p.poll() is None for p in procs):
        lines = (out / "metrics.jsonl").read_text().splitlines()
        if json.loads(next(line for line in reversed(lines) if line.endswith("}")))["step"] >= 5:
            break
        time.sleep(0.1)
    for proc in procs:  # what a scheduler does before the time limit: SIGTERM to each node's launcher
        os.killpg(proc.pid, signal.SIGTERM)
    (code0, output), (code1, _) = finish_all(procs)
    step, manifest = newest_checkpoint(out)
    assert code0 != 0 and code1 != 0 and 5 <= step < 40 and manifest["world_size"] == 2, output[-4000:]
    assert f"stopped by SIGTERM after step {step}: checkpoint {out / 'checkpoints' / f'step{step}'} saved" in output

    port = free_port()
    procs = [launch(two_nodes(*args, "--set", f"steps={step + 1}", node_rank=None, port=port), wait=False)
             for _ in range(2)]
    (code0, output), (code1, _) = finish_all(procs)
    assert code0 == code1 == 0, output[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["pretrain_steps"] == step + 1


def test_a_group_made_without_local_rank_gets_it_when_it_is_a_group_of_one(monkeypatch):
    """DeepSpeed's engine reads LOCAL_RANK even when the process group exists already (made by a
    script, or by an earlier run in this process whose environment was since restored)."""
    import os

    from sparsegps.errors import UsageError
    from sparsegps.launch import export_local_rank

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    with pytest.raises(UsageError, match="rank 1 of a process group of 2 made without LOCAL_RANK"):
        export_local_rank(1, 2)
    assert "LOCAL_RANK" not in os.environ
    export_local_rank(0, 1)
    assert os.environ["LOCAL_RANK"] == "0"
    monkeypatch.setenv("LOCAL_RANK", "3")
    export_local_rank(0, 2)
    assert os.environ["LOCAL_RANK"] == "3"
