"""`make gpu-check`'s driver: what it does without a GPU, and its step runner and report."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from sparsegps.benchmarks import gpu_check


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU answer")
def test_without_a_gpu_it_says_so_and_exits_zero(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "sparsegps.benchmarks.gpu_check", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "no GPU" in proc.stdout
    assert not any(tmp_path.iterdir())


def test_steps_fit_the_eight_and_a_half_minute_budget(tmp_path):
    plan = gpu_check.steps(tmp_path)
    assert sum(s.timeout_s for s in plan) <= 8.5 * 60
    names = [s.name for s in plan]
    assert names == ["doctor", "pytest -m gpu", "kernel compile report", "bench attention", "bench encoder",
                     "bench train-step", "backbone gradients in fp16"]
    train = next(s for s in plan if s.name == "bench train-step").command
    assert "base_gpu.yaml" in " ".join(train) and train[train.index("--zero-stages") + 1:][:2] == ["0", "2"]
    assert "model.attention_backend=triton" in train


def test_a_step_records_status_output_and_timeout(tmp_path):
    ok = gpu_check.Step("fine", [sys.executable, "-c", "print('hello'); print('done')"], 60)
    failing = gpu_check.Step("failing", [sys.executable, "-c", "import sys; print('bad'); sys.exit(3)"], 60)
    slow = gpu_check.Step("slow", [sys.executable, "-c", "import time; print('start', flush=True); time.sleep(30)"], 1)
    for step in (ok, failing, slow):
        gpu_check.run_step(step, tmp_path)
    assert ok.status == "ok" and ok.tail.endswith("done")
    assert failing.status == "exit 3" and "bad" in failing.tail
    assert slow.status.startswith("timed out")
    assert (tmp_path / "fine.log").read_text().startswith("hello")

    table = tmp_path / "table.md"
    table.write_text("### bench\n| a |\n")
    ok.reports = [str(table), str(tmp_path / "missing.md")]
    gpu_check.write_report(tmp_path, [ok, failing, slow], "a test GPU", 12.0)
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["gpu"] == "a test GPU" and data["ok"] is False
    assert [s["status"] for s in data["steps"]] == ["ok", "exit 3", slow.status]
    report = (tmp_path / "gpu_check.md").read_text()
    assert "| failing | exit 3 |" in report and "### bench" in report


def test_grad_precision_compares_every_preset_batch_and_scaling(tmp_path, monkeypatch):
    """On CPU both sides run in fp32: the check's plumbing, with exact agreement."""
    monkeypatch.setattr(gpu_check, "GRAD_PRECISION_PRESETS", ("tiny",))
    monkeypatch.setattr(gpu_check, "GRAD_PRECISION_SCENES", 1)
    rows = gpu_check.grad_precision(tmp_path, device="cpu")
    assert [(r["global_batch"], r["scaling"]) for r in rows] == [
        (b, s) for b in (8, 64, 512) for s in ("none", "S=65536")]
    assert all(r["relative_error"] == 0 and r["zero_where_fp32_nonzero_pct"] == 0 and not r["overflow"] for r in rows)
    assert json.loads((tmp_path / "grad_precision.json").read_text()) == rows
    assert "| tiny | 512 | S=65536 | 0 | 0 | False |" in (tmp_path / "grad_precision.md").read_text()


@pytest.mark.slow
def test_kernel_registers_compiles_for_hopper_without_a_gpu():
    """The small-L kernels compile for sm_90 on this machine; ptxas's numbers come back."""
    import os

    code = ("import json; from sparsegps.benchmarks.kernel_registers import report; "
            "print(json.dumps(report(90, 'bf16', sizes=[(80, 64)])))")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = json.loads(proc.stdout.strip().splitlines()[-1])
    assert [r["kernel"] for r in rows] == ["small forward", "small backward"]
    for row in rows:
        assert 0 < row["registers"] <= 255 and row["stack_bytes"] >= 0
    assert rows[0]["stack_bytes"] == 0  # the forward's tiles were chosen not to spill
