"""Procedural rooms: determinism, layout validity, labels, class coverage, density and `sparsegps synth`."""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest

from sparsegps.cli import main as cli_main
from sparsegps.config import load_config
from sparsegps.data import SceneStore, inspect_store
from sparsegps.language import build_scene_graph
from sparsegps.synth import (SYNTH_VOCABULARY, SynthConfig, generate_scene, generate_scenes, layout_for, preset,
                             scene_id)

ROOT = Path(__file__).resolve().parents[1]
LIGHT = ["--preset", "demo", "--set", "points_per_m2=60"]


def light_cfg(**changes) -> SynthConfig:
    cfg = preset("demo")
    cfg.points_per_m2 = 60.0
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg


def _datasets(path: Path) -> dict[str, np.ndarray]:
    out = {}
    with h5py.File(path) as f:
        f.visititems(lambda name, obj: out.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return out


def test_vocabulary_is_scannet20():
    names = json.loads((ROOT / "sparsegps/resources/scannet/benchmark_classes.json").read_text())["scannet20"]["names"]
    assert SYNTH_VOCABULARY == names and len(names) == 20


def test_same_seed_gives_identical_shards(tmp_path):
    for run in ("a", "b"):
        assert cli_main(["synth", "--scenes", "5", "--seed", "11", "--out", str(tmp_path / run),
                         "--shard-scenes", "2", *LIGHT]) == 0
    shards_a = sorted((tmp_path / "a").glob("*.h5"))
    assert [p.name for p in shards_a] == [p.name for p in sorted((tmp_path / "b").glob("*.h5"))]
    assert len(shards_a) == 3
    for pa in shards_a:
        a, b = _datasets(pa), _datasets(tmp_path / "b" / pa.name)
        assert a.keys() == b.keys()
        for name in a:
            assert np.array_equal(a[name], b[name]), name
    assert cli_main(["synth", "--scenes", "2", "--seed", "12", "--out", str(tmp_path / "c"), *LIGHT]) == 0
    assert not np.array_equal(_datasets(tmp_path / "c" / "shard-00000.h5")["points/xyz"][:100],
                              _datasets(shards_a[0])["points/xyz"][:100])


def test_scene_does_not_depend_on_the_number_of_scenes():
    cfg = light_cfg(seed=4)
    few = list(generate_scenes(cfg, 2))
    assert generate_scene(cfg, 1) == few[1]
    assert few[1].scene_id == scene_id(4, 1) == "synth_0004_000001"


@pytest.mark.parametrize("index", range(6))
def test_scene_labels_boxes_and_placement(index):
    cfg = light_cfg(seed=2)
    scene = generate_scene(cfg, index).validate()
    layout = layout_for(cfg, index)
    objects = scene.object_by_id()
    # labels: every point's semantic label is its object's class
    sem = np.array([SYNTH_VOCABULARY.index(objects[i].label) for i in scene.instance])
    assert np.array_equal(sem, scene.semantic) and (scene.instance >= 0).all()
    # boxes are the extents of the object's points
    for oid, obj in objects.items():
        pts = scene.xyz[scene.instance == oid]
        assert np.allclose(obj.center - obj.size / 2, pts.min(0), atol=1e-5)
        assert np.allclose(obj.center + obj.size / 2, pts.max(0), atol=1e-5)
    # walls and floor, then 8..16 pieces of furniture placed inside the room, none interpenetrating
    labels = Counter(o.label for o in layout.objects)
    assert labels["wall"] == 4 and labels["floor"] == 1
    furniture = layout.furniture()
    assert cfg.objects[0] <= len(furniture) <= cfg.objects[1]
    for i, a in enumerate(furniture):
        assert (a.lo[:2] >= -1e-6).all() and a.hi[0] <= layout.width + 1e-6 and a.hi[1] <= layout.depth + 1e-6
        assert a.hi[2] <= layout.height + 1e-6
        for b in furniture[i + 1:]:
            overlap = np.minimum(a.hi, b.hi) - np.maximum(a.lo, b.lo)
            assert not (overlap > 1e-3).all(), (a.label, b.label)


def test_rooms_have_supported_objects_and_repeated_classes():
    cfg = light_cfg(seed=0)
    supported, repeated = 0, 0
    for index in range(12):
        layout = layout_for(cfg, index)
        furniture = layout.furniture()
        counts = Counter(o.label for o in furniture)
        repeated += max(counts.values()) >= 2
        for o in furniture:
            below = [s for s in furniture if s is not o and abs(o.lo[2] - s.hi[2]) < 1e-6
                     and s.lo[0] <= o.base[0] <= s.hi[0] and s.lo[1] <= o.base[1] <= s.hi[1]]
            supported += bool(below) and o.lo[2] > 0.1
    assert repeated == 12
    assert supported >= 6


def test_class_coverage_over_200_scenes():
    cfg = preset("demo")
    seen = Counter()
    for index in range(200):
        seen.update(o.label for o in layout_for(cfg, index).objects)
    assert set(seen) == set(SYNTH_VOCABULARY), set(SYNTH_VOCABULARY) - set(seen)


def test_point_density_of_presets():
    demo = [generate_scene(preset("demo"), i, with_language=False).num_points for i in range(8)]
    assert 10_000 <= np.mean(demo) <= 20_000, demo
    scannet = [generate_scene(preset("scannet"), i, with_language=False).num_points for i in range(2)]
    assert all(60_000 <= n <= 300_000 for n in scannet), scannet
    # density scales the point count, nothing else
    dense = generate_scene(light_cfg(points_per_m2=120.0), 0, with_language=False)
    sparse = generate_scene(light_cfg(points_per_m2=60.0), 0, with_language=False)
    assert 1.6 < dense.num_points / sparse.num_points < 2.4
    assert [o.label for o in dense.objects] == [o.label for o in sparse.objects]


def test_sensor_jitter_and_colour_noise():
    cfg = light_cfg(jitter=0.0, color_noise=0.0, color_variation=0.0)
    scene = generate_scene(cfg, 0, with_language=False)
    floor = next(o.instance_id for o in scene.objects if o.label == "floor")
    assert np.allclose(scene.xyz[scene.instance == floor, 2], 0.0, atol=1e-6)
    noisy = generate_scene(light_cfg(jitter=0.01), 0, with_language=False)
    z = noisy.xyz[noisy.instance == floor, 2]
    assert 0.007 < z.std() < 0.013
    plain_colors = {tuple(c) for c in scene.rgb[scene.instance == floor]}
    assert len(plain_colors) <= 2  # the top face, maybe shaded; no per-point noise


def test_measured_colours_match_the_paint():
    cfg = light_cfg(seed=5)
    agree = total = 0
    for index in range(6):
        scene = generate_scene(cfg, index, with_language=False)
        graph = build_scene_graph(scene)
        for i, obj in enumerate(layout_for(cfg, index).objects):
            total += 1
            agree += graph.colors[graph.row[i]] == obj.color
    assert agree / total > 0.95


def test_presets_are_their_files_over_the_defaults(tmp_path):
    """A preset is the defaults with its package-data file written over them; --config and --set
    write over the preset (a room_types mapping replaced whole, other sections merged)."""
    import argparse

    from sparsegps.commands import synth as synth_command
    from sparsegps.synth.config import PRESETS

    assert PRESETS == ("demo", "scannet") and preset("scannet") == SynthConfig()
    demo = preset("demo")
    assert (demo.room_size, demo.objects, demo.points_per_m2, demo.language.referrals_per_scene) == (
        (4.0, 7.0), (8, 16), 150.0, 8)
    assert demo.room_height == SynthConfig().room_height and demo.language.shapes == SynthConfig().language.shapes
    (tmp_path / "mine.yaml").write_text("room_types: {office: 1.0}\nlanguage: {min_distractors: 2}\n")
    parser = argparse.ArgumentParser()
    synth_command.add_arguments(parser)
    args = parser.parse_args(["--out", str(tmp_path), "--preset", "demo", "--config", str(tmp_path / "mine.yaml"),
                              "--set", "objects=[9,12]"])
    cfg = synth_command.resolve_config(args)
    assert cfg.room_types == {"office": 1.0} and cfg.objects == (9, 12) and cfg.room_size == (4.0, 7.0)
    assert cfg.language.min_distractors == 2 and cfg.language.referrals_per_scene == 8


def test_synth_command_writes_every_kind_of_text(tmp_path, capsys):
    out = tmp_path / "rooms"
    assert cli_main(["synth", "--scenes", "6", "--seed", "1", "--out", str(out), *LIGHT,
                     "--set", "language.referrals_per_scene=8"]) == 0
    summary = capsys.readouterr().out
    for shape in ("single", "double", "chain", "between"):
        count = int(summary.split(f"{shape} ")[1].split(",")[0].split()[0])
        assert count > 0, summary
    report = inspect_store(out, progress=False)
    assert report.scenes == 6 and not report.errors
    assert report.objects > 6 * 8 and report.texts["object_caption"] == report.objects
    assert report.texts["scene_caption"] >= 6 and report.texts["referral"] >= 6 * 4
    saved = load_config(SynthConfig, out / "synth_config.yaml")
    assert saved.seed == 1 and saved.scenes == 6 and saved.points_per_m2 == 60.0
    assert saved.language.referrals_per_scene == 8
    store = SceneStore(out)
    assert store.vocabulary == SYNTH_VOCABULARY and store.shards[0].source == "sparsegps-synth"
    assert store[0] == generate_scene(saved, 0)
    assert cli_main(["inspect", str(out)]) == 0
    assert "referral" in capsys.readouterr().out
    # annotate with the run's seed and settings writes the same texts again
    before = [store[i] for i in range(len(store))]
    store.close()
    assert cli_main(["annotate", str(out), "--seed", "1", "--replace", "--config", str(out / "synth_config.yaml")]) == 0
    again = SceneStore(out)
    assert [again[i] for i in range(len(again))] == before


def test_synth_command_rejects_bad_settings(tmp_path, capsys):
    assert cli_main(["synth", "--scenes", "1", "--out", str(tmp_path), "--set", "objects=[9,3]"]) == 2
    assert "objects" in capsys.readouterr().err
    assert cli_main(["synth", "--scenes", "1", "--out", str(tmp_path), "--set", "rooms=3"]) == 2
    assert "unknown key" in capsys.readouterr().err
