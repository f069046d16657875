"""The benchmark suite: every benchmark's quick mode runs and writes complete, self-consistent results;
`sparsegps bench` forwards flags and reports missing benchmarks; the shared helpers measure what
they claim."""
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsegps import cli
from sparsegps.benchmarks import bench_batch_prep, bench_data, bench_encoder, flops, memory, report, scenes, timing
from sparsegps.commands import bench as bench_command

REPO = Path(__file__).resolve().parents[1]
TOP_KEYS = {"benchmark", "command", "created", "machine", "config", "baseline", "rows", "targets", "notes"}
ROW_KEYS = {"method", "seconds", "seconds_min", "seconds_max", "repeats", "scenes_per_s", "ratio_vs_baseline"}


def check_schema(data: dict, name: str, baseline_of) -> None:
    """Every field present, numbers positive, ratios recomputed from the measured times."""
    assert TOP_KEYS <= set(data), TOP_KEYS - set(data)
    assert data["benchmark"] == name
    assert data["command"].startswith(f"sparsegps bench {name}")
    assert data["machine"]["cpu"] and data["machine"]["cpu_cores"] >= 1 and data["machine"]["summary"]
    assert data["rows"] and data["targets"] and data["notes"]
    for row in data["rows"]:
        assert ROW_KEYS <= set(row), ROW_KEYS - set(row)
        for key in ("seconds", "seconds_min", "seconds_max", "scenes_per_s", "ratio_vs_baseline"):
            assert isinstance(row[key], float) and row[key] > 0 and math.isfinite(row[key]), (key, row)
        assert row["seconds_min"] <= row["seconds"] <= row["seconds_max"]
        base = baseline_of(row, data["rows"])
        assert row["ratio_vs_baseline"] == pytest.approx(base["seconds"] / row["seconds"])
        if row is base:
            assert row["ratio_vs_baseline"] == pytest.approx(1.0)
    for t in data["targets"]:
        assert set(t) == {"name", "ratio", "target", "met"}
        assert t["met"] == (t["ratio"] >= t["target"])
        assert any(r["ratio_vs_baseline"] == t["ratio"] for r in data["rows"])


def load(out: Path, stem: str) -> dict:
    assert (out / f"{stem}.md").read_text().startswith(f"### ")
    assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / f"{stem}.json").read_text())


def test_bench_data_quick_through_the_cli(tmp_path, capsys):
    assert cli.main(["bench", "data", "--quick", "--out", str(tmp_path), "--compression", "lzf", "none"]) == 0
    data = load(tmp_path, "data")
    check_schema(data, "data", lambda row, rows: next(
        r for r in rows if r["method"].startswith("pth") and r["workers"] == row["workers"]
        and r["cache"] == row["cache"] and r["worker_start"] == row["worker_start"]))
    methods = {r["method"] for r in data["rows"]}
    assert methods == {"shards (lzf)", "shards (none)", "shards (none, unverified)", "pth (GPS)", "npy (Pointcept)"}
    assert {(r["workers"], r["worker_start"]) for r in data["rows"]} == {(0, "-"), (2, "fresh"), (2, "persistent")}
    assert data["config"]["scenes"] == 12
    for row in data["rows"]:
        assert row["bytes_on_disk"] > 0
        assert row["scenes_per_s"] == pytest.approx(12 / row["seconds"])
        assert row["cpu_seconds"] > 0 and row["cpu_ratio_vs_baseline"] > 0
    assert "--compression lzf none" in data["command"]
    assert "| shards (lzf) |" in capsys.readouterr().out


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")
def test_bench_shards_quick_caps_what_each_worker_holds_open(tmp_path):
    argv = ["bench", "shards", "--quick", "--passes", "1", "--max-open", "4", "0", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    data = json.loads((tmp_path / "shards.json").read_text())
    capped, uncapped = data["rows"]
    assert (capped["max_open"], uncapped["max_open"], capped["workers"]) == (4, "none", 2)
    # 40 shards read in a shuffled order: without a cap each worker keeps most of them open
    assert capped["open_shards_max"] == 4 and uncapped["open_shards_max"] > 15
    assert uncapped["descriptors_max"] - capped["descriptors_max"] >= 2 * (uncapped["open_shards_max"] - 4) - 4
    assert capped["uss_mb_max"] > 0 and set(data["details"]["setup_seconds"]) == {"index.json", "shard files"}


def test_bench_encoder_quick(tmp_path):
    bench_encoder.main(["--quick", "--out", str(tmp_path)])
    data = load(tmp_path, "encoder")
    check_schema(data, "encoder", lambda row, rows: next(
        r for r in rows if r["method"].startswith("PointNet") and r["objects"] == row["objects"]
        and r["mode"] == row["mode"]))
    assert {(r["method"], r["mode"]) for r in data["rows"]} == {
        ("PointNet++ (GPS)", "forward"), ("PointNet++ (GPS)", "train"),
        ("sparsegps tiny", "forward"), ("sparsegps tiny", "train")}
    for row in data["rows"]:
        assert row["elements"] > 0 and row["elements_per_s"] > 0
        assert row["gflops_forward"] > 0 and row["peak_memory_mb"] >= 0
    pointnet = next(r for r in data["rows"] if r["method"].startswith("PointNet"))
    assert pointnet["elements"] == 8 * 1024
    # GPS's PointNet++ per object: 2 x multiply-adds of its MLPs (1024, 512 and 16 grouped points) and head.
    macs = 1024 * 12672 + 512 * 65920 + 16 * 590592 + 768 * 768
    assert pointnet["gflops_forward"] == pytest.approx(8 * 2 * macs / 1e9, rel=1e-6)


def test_bench_batch_prep_quick(tmp_path):
    bench_batch_prep.main(["--quick", "--out", str(tmp_path), "--workers", "0"])
    data = load(tmp_path, "batch_prep")
    check_schema(data, "batch-prep", lambda row, rows: next(
        r for r in rows if r["method"] == "GPS (per item)" and r["workers"] == row["workers"]))
    assert [r["method"] for r in data["rows"]] == ["GPS (per item)", "GPS (crops cached)", "sparsegps"]
    assert data["rows"][1]["startup_s"] > 0
    stages = data["details"]["stage_seconds_per_scene"]
    assert list(stages["GPS (per item)"]) == ["load .pth", "crop objects", "rotate, resample, normalise", "collate"]
    assert {"read shard", "GridSample", "collate"} <= set(stages["sparsegps"])
    assert all(v > 0 for s in stages.values() for v in s.values())
    voxelization = data["details"]["voxelization_ms_per_scene"]
    assert {"packed-key sort (GridSample)", "np.unique sort (before)"} <= set(voxelization)
    assert all(ms > 0 for ms in voxelization.values())
    for row in data["rows"]:
        assert row["cpu_seconds"] > 0 and row["cpu_ratio_vs_baseline"] > 0


def test_bench_grad_underflow_quick_through_the_cli(tmp_path):
    assert cli.main(["bench", "grad-underflow", "--quick", "--out", str(tmp_path)]) == 0
    data = load(tmp_path, "grad_underflow")
    assert TOP_KEYS <= set(data) and data["command"].startswith("sparsegps bench grad-underflow")
    rows = {(r["where"], r["global_batch"], r["method"]): r for r in data["rows"]}
    assert set(rows) == {(w, b, m) for w in ("output", "input", "parameters") for b in (8, 64, 512)
                         for m in ("S=1", "S=2^16")}
    for where in ("output", "input", "parameters"):
        plain = [rows[where, b, "S=1"] for b in (8, 64, 512)]
        # the gradient is rescaled as 1 / global batch (quick: 2 scenes measured)
        assert plain[1]["median_abs"] == pytest.approx(plain[0]["median_abs"] / 8, rel=1e-9)
        assert plain[0]["lost_pct"] <= plain[1]["lost_pct"] <= plain[2]["lost_pct"]
        for b in (8, 64, 512):
            scaled = rows[where, b, "S=2^16"]
            assert scaled["median_abs"] == pytest.approx(rows[where, b, "S=1"]["median_abs"] * 2 ** 16, rel=1e-9)
            assert scaled["lost_pct"] <= rows[where, b, "S=1"]["lost_pct"]
    assert plain[2]["lost_pct"] > 0  # the parameters' gradient at 512 scenes loses some elements unscaled
    assert [t["name"].split(" gradient")[0] for t in data["targets"]] == ["percent of the output",
                                                                         "percent of the input"]


def test_fp16_shares_agree_with_rounding_to_fp16():
    from sparsegps.benchmarks.bench_grad_underflow import fp16_shares

    magnitudes = torch.logspace(-12, 7, 2001, dtype=torch.float64)
    values = torch.cat([magnitudes, -magnitudes, torch.zeros(10, dtype=torch.float64)])
    values = values[(values.abs() - 2.0 ** -25).abs() > 1e-12]  # away from the rounding boundaries
    values = values[(values.abs() - 65504).abs() > 16]
    half = values.half()
    nonzero = values != 0
    shares = fp16_shares(values)
    n = int(nonzero.sum())
    assert shares["zero_pct"] == pytest.approx(100 * 10 / len(values))
    assert shares["lost_pct"] == pytest.approx(100 * int(((half == 0) & nonzero).sum()) / n)
    assert shares["overflow_pct"] == pytest.approx(100 * int(half.isinf().sum()) / n)
    subnormal_or_zero = half.abs() < torch.finfo(torch.float16).tiny
    assert shares["below_normal_pct"] == pytest.approx(100 * int((subnormal_or_zero & nonzero).sum()) / n, abs=0.1)


def test_bench_list_reports_missing_benchmarks(capsys, monkeypatch):
    monkeypatch.setitem(bench_command.BENCHMARKS, "future", ("sparsegps.benchmarks.bench_not_written", "later"))
    assert cli.main(["bench", "list"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert "future" in lines and "not available" in lines["future"]
    assert "not available" not in lines["data"]
    assert cli.main(["bench", "future", "--quick"]) == 2
    assert "not available" in capsys.readouterr().err


def test_bench_table_names_the_planned_modules():
    assert {n: m for n, (m, _) in bench_command.BENCHMARKS.items()} == {
        "data": "sparsegps.benchmarks.bench_data", "encoder": "sparsegps.benchmarks.bench_encoder",
        "batch-prep": "sparsegps.benchmarks.bench_batch_prep",
        "attention": "sparsegps.benchmarks.bench_spatial_attention",
        "train-step": "sparsegps.benchmarks.bench_train_step", "scaling": "sparsegps.benchmarks.bench_scaling",
        "step": "sparsegps.benchmarks.bench_step", "runs": "sparsegps.benchmarks.bench_runs",
        "transfer": "sparsegps.benchmarks.bench_transfer", "shards": "sparsegps.benchmarks.bench_shards",
        "grad-underflow": "sparsegps.benchmarks.bench_grad_underflow"}


def test_benchmark_runs_as_a_script():
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_data.py"), "--help"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "--compression" in proc.stdout and "--quick" in proc.stdout


# ------------------------------------------------------------------------------------------ helpers

def test_time_interleaved_can_track_cpu_time():
    timings = timing.time_interleaved({"spin": lambda: sum(range(200_000)), "sleep": lambda: time.sleep(0.05)},
                                      repeats=2, warmup=0, track_cpu=True)
    assert timings["sleep"].median >= 0.05 and timings["sleep"].to_dict()["cpu_seconds"] < 0.04
    assert timings["spin"].to_dict()["cpu_seconds"] > 0
    assert "cpu_seconds" not in timing.time_call(lambda: None, repeats=1, warmup=0).to_dict()


def test_time_call_runs_warmup_then_repeats_and_takes_the_median():
    calls = []
    measured = timing.time_call(lambda: calls.append(1), repeats=3, warmup=2, before_each=lambda: calls.append(0))
    assert calls == [1, 1, 0, 1, 0, 1, 0, 1]
    assert len(measured.times) == 3
    assert timing.Timing([3.0, 1.0, 2.0]).median == 2.0
    assert timing.Timing([3.0, 1.0, 2.0]).to_dict() == {"seconds": 2.0, "seconds_min": 1.0, "seconds_max": 3.0,
                                                         "repeats": 3}


def test_peak_memory_sees_a_large_allocation():
    size = 256 * 2**20

    def allocate():
        t = torch.ones(size // 4, dtype=torch.float32)
        t += 1  # touch every page
        return float(t[-1])

    peak = memory.peak_memory(allocate)
    assert 0.8 * size <= peak <= 2.5 * size
    assert memory.peak_memory(lambda: None) < 0.2 * size


def test_count_flops_of_a_matmul():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    assert flops.count_flops(lambda: a @ b) == 2 * 8 * 16 * 4


def test_random_room_has_the_sizes_asked_for_and_is_valid():
    scene = scenes.random_room("r", np.random.default_rng(0), num_objects=7, num_points=5000)
    scene.validate()
    assert scene.num_points == 5000
    assert len(scene.objects) == 7
    assert set(np.unique(scene.instance).tolist()) == set(range(7)) | {-1}
    again = scenes.random_room("r", np.random.default_rng(0), num_objects=7, num_points=5000)
    assert again == scene


def test_markdown_table_and_ratio():
    table = report.markdown_table([{"a": 1.23456, "b": None}, {"a": 12345.6, "b": "x"}], ["a", "b"])
    assert table.splitlines() == ["| a | b |", "| --- | --- |", "| 1.23 | - |", "| 12,346 | x |"]
    assert report.ratio(3.0, 1.5) == 2.0
    assert report.target("t", 2.0, 3.0) == {"name": "t", "ratio": 2.0, "target": 3.0, "met": False}


def test_pth_layout_round_trips_with_weights_only(tmp_path):
    scene = scenes.random_room("room_a", np.random.default_rng(0), num_objects=3, num_points=500)
    (tmp_path / "pcd").mkdir()
    (tmp_path / "inst_to_label").mkdir()
    bench_data.write_pth(scene, tmp_path)
    (xyz, rgb, semantic, instance), labels = bench_data.read_pth(tmp_path, "room_a")
    np.testing.assert_array_equal(xyz, scene.xyz)
    np.testing.assert_array_equal(rgb, scene.rgb)
    np.testing.assert_array_equal(instance, scene.instance)
    np.testing.assert_array_equal(semantic, scene.semantic)
    assert labels == {o.instance_id: o.label for o in scene.objects}
    bench_data.write_npy(scene, tmp_path / "npy")
    arrays = bench_data.read_npy(tmp_path / "npy", "room_a")
    np.testing.assert_array_equal(arrays["coord"], scene.xyz)
    np.testing.assert_array_equal(arrays["instance"], scene.instance)
