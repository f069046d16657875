"""`bench step` (where a pre-training step's time goes) and `bench runs` (whole runs, alternated):
the attribution of forward and backward time to components, and both quick modes through the CLI."""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest
import torch
import yaml
from torch import nn

from sparsegps import cli
from sparsegps.benchmarks.bench_step import SCOPE, attribute
from sparsegps.data import write_scenes

from helpers import TINY_MODEL, VOCAB, make_scene


def test_attribution_gives_each_scope_its_forward_and_the_backward_of_what_it_made():
    """A large layer and a small one, each in its scope, the loss outside both: the large layer's
    forward and backward dominate, and the backward of operations made outside any scope (the
    loss) lands in no layer's row."""
    torch.manual_seed(0)
    big, small = nn.Linear(1024, 1024), nn.Linear(1024, 4)
    x = torch.randn(4096, 1024)

    def step():
        with torch.profiler.record_function(SCOPE + "forward"):
            with torch.profiler.record_function(SCOPE + "big"):
                h = torch.relu(big(x))
            with torch.profiler.record_function(SCOPE + "small"):
                y = small(h)
            loss = y.square().mean()
        loss.backward()

    step()  # first calls pay one-time costs
    with torch.profiler.profile() as prof:
        step()
    forward, backward = attribute(prof.events(), cuda=False)
    assert forward["big"] > 3 * forward["small"] > 0
    assert backward["big"] > 3 * backward["small"] > 0
    assert forward["model (other)"] > 0  # the loss, outside the two layers
    # every backward node went somewhere, and the big layer's weight gradient (its matmuls) to it
    events = [e for e in prof.events() if e.name.startswith("autograd::engine::evaluate_function")]
    total = sum(e.time_range.elapsed_us() for e in events)
    assert sum(backward.values()) == pytest.approx(total)
    assert backward["big"] > 0.5 * total


def test_bench_step_quick_through_the_cli_with_a_variant(tmp_path):
    argv = ["bench", "step", "--quick", "--variant", "no_mlm", "model.loss.mlm=0", "--out", str(tmp_path)]
    assert cli.main(argv) == 0
    data = json.loads((tmp_path / "step.json").read_text())
    assert (tmp_path / "step.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "**as configured**" in (tmp_path / "step.md").read_text()
    rows = {r["method"]: r for r in data["rows"]}
    assert set(rows) == {"as configured", "no_mlm"}
    assert rows["as configured"]["ratio_vs_baseline"] == pytest.approx(1.0)
    assert rows["no_mlm"]["ratio_vs_baseline"] == pytest.approx(rows["as configured"]["seconds"] / rows["no_mlm"]["seconds"])
    assert [t["name"] for t in data["targets"]] == ["no_mlm vs as configured, scenes/s"]
    for label, components in data["details"]["components"].items():
        for name in ("data", "U-Net", "pooling", "spatial transformer", "text encoder", "grounding encoder",
                     "optimizer"):
            assert components[name]["total_ms"] > 0, (label, name)
        assert components["U-Net"]["backward_ms"] > 0
        assert components["text encoder"]["backward_ms"] < 0.2 * components["text encoder"]["forward_ms"]  # frozen
        # almost all of the backward is attributed to a component
        backward = sum(c["backward_ms"] for c in components.values())
        assert components.get("backward (other)", {"backward_ms": 0})["backward_ms"] < 0.2 * backward
        assert sum(c["share"] for c in components.values()) == pytest.approx(1.0)
    assert "MLM head" in data["details"]["components"]["as configured"]
    assert "MLM head" not in data["details"]["components"]["no_mlm"]


@pytest.mark.slow
def test_bench_runs_quick_alternates_arms_and_scores_their_exports(tmp_path):
    rng = np.random.default_rng(0)
    write_scenes([make_scene(rng, f"t{i}", 300, 3) for i in range(8)], tmp_path / "train", vocabulary=VOCAB,
                 progress=False)
    write_scenes([make_scene(rng, f"v{i}", 300, 3) for i in range(2)], tmp_path / "val", vocabulary=VOCAB,
                 progress=False)
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({"micro_batch": 2, "global_batch": 2, "device": "cpu", "num_workers": 0,
                                      "model": {**TINY_MODEL, "class_names": [], "loss": {"dense_text": 1.0}},
                                      "data": {"transforms": {"voxel_size": 0.15, "augment": False}}}))
    argv = ["bench", "runs", "--quick", "--data", str(tmp_path / "train"), "--evaluate", str(tmp_path / "val"),
            "--arm", "a", sys.executable, str(config), "--arm", "b", sys.executable, str(config),
            "--out", str(tmp_path / "out")]
    assert cli.main(argv) == 0
    data = json.loads((tmp_path / "out" / "runs.json").read_text())
    assert [r["method"] for r in data["rows"]] == ["a", "b"]
    import sparsegps

    for row in data["rows"]:
        assert row["sparsegps"] == sparsegps.__file__  # the install the arm's interpreter imports
        assert row["repeats"] == 1 and row["scenes_per_s"] > 0
        assert 0 <= row["grounding_accuracy"] <= 1 and 0 <= row["zero_shot_miou"] <= 1
        assert row["grounding_accuracy_sd"] == 0.0  # one round
    # the same install, config and seed: the same scores
    assert data["rows"][0]["class_accuracy"] == pytest.approx(data["rows"][1]["class_accuracy"])
