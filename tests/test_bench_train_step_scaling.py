"""The train-step and scaling benchmarks: each quick mode runs through the CLI and writes complete,
self-consistent results (ratios, fractions and slopes recomputed here from the measured times);
scene tiling, the log-log fit and the tensor-memory count do what they claim."""
import json
import math
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from sparsegps import cli
from sparsegps.benchmarks import bench_scaling, bench_train_step

TOP_KEYS = {"benchmark", "command", "created", "machine", "config", "baseline", "rows", "targets", "notes"}
TIME_KEYS = ("seconds", "seconds_min", "seconds_max", "scenes_per_s", "ratio_vs_baseline", "peak_memory_mb")


def load(out: Path, stem: str) -> dict:
    assert (out / f"{stem}.md").read_text().startswith("### ")
    assert (out / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return json.loads((out / f"{stem}.json").read_text())


def check_common(data: dict, name: str) -> None:
    assert TOP_KEYS <= set(data), TOP_KEYS - set(data)
    assert data["benchmark"] == name and data["command"].startswith(f"sparsegps bench {name} --quick")
    machine = data["machine"]
    assert machine["cpu"] and machine["cpu_cores"] >= 1 and machine["summary"] and machine["device"] == "cpu"
    assert data["rows"] and data["targets"] and data["notes"]
    for row in data["rows"]:
        for key in TIME_KEYS:
            assert isinstance(row[key], float) and row[key] > 0 and math.isfinite(row[key]), (key, row)
        assert row["seconds_min"] <= row["seconds"] <= row["seconds_max"]
    for t in data["targets"]:
        assert set(t) == {"name", "ratio", "target", "met"} and math.isfinite(t["ratio"])


def test_train_step_quick_writes_consistent_results(tmp_path):
    assert cli.main(["bench", "train-step", "--quick", "--out", str(tmp_path)]) == 0
    data = load(tmp_path, "train_step")
    check_common(data, "train-step")
    assert "hooks" in data["config"]["timing_method"]
    rows = data["rows"]
    assert [(r["zero_stage"], r["micro_batch"]) for r in rows] == [(0, 1), (1, 1), (2, 1), (3, 1)]
    regions = ("data", "backbone", "transformers", "backward", "optimizer")
    for row in rows:
        assert row["method"] == f"ZeRO-{row['zero_stage']}" and row["repeats"] == 1
        assert set(row["region_seconds"]) == set(regions)
        assert all(row["region_seconds"][r] > 0 for r in regions), row["region_seconds"]
        assert sum(row["region_seconds"].values()) == pytest.approx(row["seconds_mean"])
        assert sum(row[f"{r}_fraction"] for r in regions) == pytest.approx(1.0)
        for r in regions:
            assert row[f"{r}_fraction"] == pytest.approx(row["region_seconds"][r] / row["seconds_mean"])
        # one timed step: its median is its mean, the sum of its regions
        assert row["seconds"] == pytest.approx(row["seconds_mean"])
        assert row["steps_per_s"] == pytest.approx(1 / row["seconds"])
        assert row["scenes_per_s"] == pytest.approx(row["micro_batch"] / row["seconds"])
        assert row["compute_seconds"] == pytest.approx(row["seconds_mean"] - row["region_seconds"]["data"])
        assert row["held_memory_mb"] > 0 and row["peak_step_memory_mb"] > 0
        assert row["peak_memory_mb"] == pytest.approx(row["held_memory_mb"] + row["peak_step_memory_mb"])
        assert row["voxels_per_step"] == rows[0]["voxels_per_step"] > 0  # every engine sees the same scenes
        base = rows[0]
        assert row["ratio_vs_baseline"] == pytest.approx(base["seconds"] / row["seconds"])
        assert row["memory_vs_baseline"] == pytest.approx(row["peak_memory_mb"] / base["peak_memory_mb"])
    assert rows[0]["ratio_vs_baseline"] == pytest.approx(1.0)
    # ZeRO-1 and -2 keep an fp32 copy of the trainable parameters besides ZeRO-0's state
    assert rows[1]["held_memory_mb"] > rows[0]["held_memory_mb"]
    assert rows[2]["held_memory_mb"] > rows[0]["held_memory_mb"]
    assert len(data["targets"]) == 3
    for t, row in zip(data["targets"], rows[1:]):
        assert f"ZeRO-{row['zero_stage']}" in t["name"] and t["ratio"] == row["ratio_vs_baseline"]
        assert t["met"] == (t["ratio"] >= t["target"])


def test_scaling_quick_writes_consistent_results(tmp_path):
    assert cli.main(["bench", "scaling", "--quick", "--out", str(tmp_path)]) == 0
    data = load(tmp_path, "scaling")
    check_common(data, "scaling")
    rows = data["rows"]
    groups = {(r["sweep"], r["method"]): [] for r in rows}
    for r in rows:
        groups[(r["sweep"], r["method"])].append(r)
    assert set(groups) == {(s, w) for s in ("points", "objects") for w in bench_scaling.WORKLOADS}
    for (sweep, workload), group in groups.items():
        group.sort(key=lambda r: r["size"])
        assert [r["size"] for r in group] == ([1.0, 2.0] if sweep == "points" else [8, 16])
        base = group[0]
        for r in group:
            assert r["scenes_per_s"] == pytest.approx(1 / r["seconds"])  # quick: one scene per batch
            assert r["voxels_per_s"] == pytest.approx(r["voxels"] / r["seconds"])
            assert r["ratio_vs_baseline"] == pytest.approx(base["seconds"] / r["seconds"])
            assert r["cost_per_voxel_vs_baseline"] == pytest.approx(
                (r["seconds"] / r["voxels"]) / (base["seconds"] / base["voxels"]))
        if sweep == "points":
            # density x2 with voxel size / sqrt(2): the same room and objects, about twice the voxels
            assert group[1]["objects"] == group[0]["objects"]
            assert 1.5 < group[1]["voxels"] / group[0]["voxels"] < 2.5
            assert group[1]["voxel_size"] == pytest.approx(group[0]["voxel_size"] / math.sqrt(2))
        else:
            assert [r["objects_per_scene"] for r in group] == [8, 16]
        # two sizes: the fitted slope is the slope of the line through both points
        x_key = "voxels" if sweep == "points" else "objects_per_scene"
        fit = next(f for f in data["fits"] if f["sweep"] == sweep and f["workload"] == workload)
        expected = (math.log(group[1]["seconds"]) - math.log(group[0]["seconds"])) / (
            math.log(group[1][x_key]) - math.log(group[0][x_key]))
        assert math.isfinite(fit["slope"]) and fit["slope"] == pytest.approx(expected)
        assert fit["local_slopes"] == [pytest.approx(expected)]
        assert all(1 <= r["neighbours_per_voxel"] <= 27 for r in group)
        assert math.isfinite(fit["memory_slope"])
    assert len(data["fits"]) == 4
    assert [t["ratio"] for t in data["targets"]] == [
        next(f["slope"] for f in data["fits"] if f["sweep"] == "points" and f["workload"] == w)
        for w in bench_scaling.WORKLOADS]
    for t in data["targets"]:
        assert t["target"] == 1.1 and t["met"] == (t["ratio"] <= 1.1)


def test_fit_loglog_recovers_a_power_law():
    x = [1e3, 2e3, 4e3, 8e3]
    fit = bench_scaling.fit_loglog(x, [3.0 * v ** 1.5 for v in x])
    assert fit["slope"] == pytest.approx(1.5) and math.exp(fit["intercept"]) == pytest.approx(3.0)
    assert fit["r2"] == pytest.approx(1.0)
    noisy = bench_scaling.fit_loglog(x, [1.0, 2.5, 3.5, 9.0])
    assert 0 < noisy["r2"] < 1


def test_neighbours_per_voxel_counts_occupied_3x3x3_neighbourhoods():
    pair_and_other_scene = torch.tensor([[0, 0, 0, 0], [0, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.int32)
    assert bench_scaling.neighbours_per_voxel(pair_and_other_scene) == pytest.approx(5 / 3)
    cube = torch.tensor([[0, x, y, z] for x in range(3) for y in range(3) for z in range(3)], dtype=torch.int32)
    assert bench_scaling.neighbours_per_voxel(cube) == pytest.approx((7 / 3) ** 3)


def test_tile_scene_repeats_points_objects_and_texts():
    from helpers import make_scene

    scene = make_scene(np.random.default_rng(0), "s", n_points=400, n_objects=3)
    tiled = bench_scaling.tile_scene(scene, 3).validate()
    assert tiled.num_points == 3 * scene.num_points and len(tiled.objects) == 3 * len(scene.objects)
    assert len({o.instance_id for o in tiled.objects}) == 9 and len(tiled.texts) == 3 * len(scene.texts)
    width = scene.xyz[:, 0].max() - scene.xyz[:, 0].min() + 0.5
    n = scene.num_points
    np.testing.assert_allclose(tiled.xyz[2 * n:], scene.xyz + np.array([2 * width, 0, 0], np.float32), atol=1e-5)
    original = {o.instance_id: o for o in scene.objects}
    for text in tiled.texts[2 * len(scene.texts):]:  # third copy: its texts name the third copy's objects
        if text.target_id >= 0:
            source = original[text.target_id - 2 * (scene.instance.max() + 1)]
            target = tiled.object_by_id()[text.target_id]
            assert target.label == source.label
            np.testing.assert_allclose(target.center, source.center + np.array([2 * width, 0, 0]), atol=1e-4)
    assert bench_scaling.tile_scene(scene, 1) is scene


UNREACHABLE = torch.zeros(1000)


def _reads_a_global():
    return UNREACHABLE


def test_tensor_bytes_counts_each_reachable_storage_once():
    torch.manual_seed(0)
    layer = torch.nn.Linear(10, 4)  # 44 parameters
    optimizer = torch.optim.AdamW(layer.parameters())
    layer(torch.randn(3, 10)).sum().backward()
    optimizer.step()  # state: exp_avg and exp_avg_sq per parameter, one scalar step tensor per parameter
    flat = torch.zeros(100)
    holder = types.SimpleNamespace(model=layer, optimizer=optimizer, views=[flat[:10], flat[50:]],
                                   closure=lambda: flat, function=_reads_a_global, again={"w": layer.weight})
    parameters_grads_adam = 4 * 44 * 4
    steps = sum(s["step"].untyped_storage().nbytes() for s in optimizer.state.values())
    assert bench_train_step.tensor_bytes(holder, torch.device("cpu")) == parameters_grads_adam + steps + 100 * 4
    assert bench_train_step.tensor_bytes(holder, torch.device("cuda")) == 0  # nothing on that device
