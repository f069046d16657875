"""The HDF5 scene store: round trips, random access, workers, samplers, bad input, crashes."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch

from sparsegps.cli import main as cli_main
from sparsegps.data import (SCHEMA_VERSION, SceneFormatError, SceneStore, ScenesDataset, SceneText, ShardError, TransformConfig,
                            collate_scenes, upgrade_shards, write_scenes)
from sparsegps.data.transforms import GridSample, scene_to_sample

from helpers import VOCAB, make_scene

NO_AUGMENT = TransformConfig(voxel_size=0.05, augment=False)


def final_files(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_round_trip_is_bit_exact_across_shards(tmp_path, scenes):
    paths = write_scenes(scenes, tmp_path, vocabulary=VOCAB, max_scenes_per_shard=5, progress=False)
    assert [p.name for p in paths] == ["shard-00000.h5", "shard-00001.h5", "shard-00002.h5"]
    store = SceneStore(tmp_path, verify=True)
    assert len(store) == len(scenes) and store.vocabulary == VOCAB
    for i in np.random.default_rng(1).permutation(len(scenes)):  # random access, across shards
        got = store[int(i)]
        assert got == scenes[i]
        assert got.texts[1].text.endswith("näher dran ✓")
    assert store[-1] == scenes[-1]
    with pytest.raises(IndexError):
        store[len(scenes)]
    # the dataset without augmentation keeps the stored points and labels exactly
    ds = ScenesDataset(tmp_path, NO_AUGMENT)
    sample = ds[7]
    for key in ("xyz", "rgb", "instance", "semantic"):
        assert np.array_equal(sample[key], getattr(scenes[7], key))
    index = json.loads((tmp_path / "index.json").read_text())
    assert index["num_scenes"] == 12 and index["label_vocabulary"] == VOCAB


def test_shards_are_contiguous_by_default_chunked_when_compressed_and_versioned(tmp_path, scenes):
    write_scenes(scenes, tmp_path / "plain", vocabulary=VOCAB, progress=False)
    write_scenes(scenes, tmp_path / "lzf", vocabulary=VOCAB, compression="lzf", progress=False)
    with h5py.File(tmp_path / "plain" / "shard-00000.h5") as f:
        assert f["points/xyz"].compression is None and f["points/xyz"].chunks is None
        assert f.attrs["schema_version"] == SCHEMA_VERSION and json.loads(f.attrs["label_vocabulary"]) == VOCAB
        assert f["scenes/point_offset"][-1] == f["points/xyz"].shape[0] == sum(s.num_points for s in scenes)
    with h5py.File(tmp_path / "lzf" / "shard-00000.h5") as f:
        assert f["points/xyz"].compression == "lzf" and f["points/xyz"].chunks is not None
    assert [SceneStore(tmp_path / "lzf", verify=True)[i] for i in range(len(scenes))] == scenes


def _collect(loader) -> list[str]:
    return [sid for batch in loader for sid in batch["scene_ids"]]


def test_two_workers_yield_every_scene_once_per_epoch(tmp_path, scenes):
    write_scenes(scenes, tmp_path, vocabulary=VOCAB, max_scenes_per_shard=4, progress=False)
    ds = ScenesDataset(tmp_path, NO_AUGMENT)
    len(ds), ds[0]  # handles opened in the parent before the fork must not leak into workers
    loader = torch.utils.data.DataLoader(ds, batch_size=3, shuffle=True, num_workers=2,
                                         collate_fn=collate_scenes)
    for _ in range(2):
        seen = _collect(loader)
        assert sorted(seen) == sorted(s.scene_id for s in scenes)


def test_distributed_sampler_partitions_scenes(tmp_path, scenes):
    write_scenes(scenes, tmp_path, vocabulary=VOCAB, max_scenes_per_shard=5, progress=False)
    ds = ScenesDataset(tmp_path, NO_AUGMENT)
    parts = []
    for rank in range(2):
        sampler = torch.utils.data.DistributedSampler(ds, num_replicas=2, rank=rank, shuffle=True, seed=3)
        sampler.set_epoch(1)
        parts.append(_collect(torch.utils.data.DataLoader(ds, batch_size=2, sampler=sampler,
                                                          collate_fn=collate_scenes)))
    assert not set(parts[0]) & set(parts[1])
    assert sorted(parts[0] + parts[1]) == sorted(s.scene_id for s in scenes)


def test_grid_sampling_inverse_map_restores_point_labels(scenes):
    scene = scenes[3]
    # make every voxel label-pure: points of one object share a voxel only with that object
    sample = GridSample(0.01)(scene_to_sample(scene))
    assert len(sample["inverse"]) == scene.num_points
    assert np.array_equal(sample["voxel_semantic"][sample["inverse"]], scene.semantic)
    assert np.array_equal(sample["voxel_instance"][sample["inverse"]], scene.instance)
    coarse = GridSample(0.5)(scene_to_sample(scene))
    assert len(coarse["coord"]) < scene.num_points
    # every point lies inside the voxel it maps to
    origin = scene.xyz.min(axis=0)
    cell = np.floor((scene.xyz - origin) / 0.5).astype(np.int32)
    assert np.array_equal(coarse["coord"][coarse["inverse"]], cell)


def test_collate_maps_instances_to_batch_objects(tmp_path, scenes):
    write_scenes(scenes, tmp_path, vocabulary=VOCAB, progress=False)
    ds = ScenesDataset(tmp_path, NO_AUGMENT)
    batch = collate_scenes([ds[0], ds[1]])
    assert batch["coords"].dtype == torch.int32 and batch["coords"].shape[1] == 4
    off = batch["object_offsets"]
    assert off[-1] == len(scenes[0].objects) + len(scenes[1].objects)
    for b in range(2):
        v0, v1 = batch["voxel_offsets"][b], batch["voxel_offsets"][b + 1]
        assert (batch["coords"][v0:v1, 0] == b).all()
        objs = batch["voxel_object"][v0:v1]
        inst = ds[b]["voxel_instance"]
        for k, o in enumerate(scenes[b].objects):
            assert np.array_equal((objs == off[b] + k).numpy(), inst == o.instance_id)
    for t in batch["texts"]:
        if t["kind"] == "referral":
            b = t["scene"]
            assert off[b] <= t["target"] < off[b + 1]
            assert batch["object_instance"][t["target"]] == int(t["text"].split()[-1])


# ------------------------------------------------------------------------------------ bad input

def _bad(scenes, mutate):
    scenes = list(scenes)
    mutate(scenes[4])
    return scenes


@pytest.mark.parametrize("mutate, field, words", [
    (lambda s: s.xyz.__setitem__((3, 1), np.nan), "xyz", "NaN"),
    (lambda s: s.xyz.__setitem__((0, 0), np.inf), "xyz", "Inf"),
    (lambda s: setattr(s, "rgb", s.rgb[:-1]), "rgb", "match"),
    (lambda s: setattr(s, "instance", s.instance[:-2]), "instance", "match"),
    (lambda s: s.texts.append(SceneText("referral", "the ghost", 999)), "texts", "999"),
    (lambda s: s.texts.append(SceneText("referral", "x", s.objects[0].instance_id, (12345,))), "texts", "12345"),
    (lambda s: [setattr(s, a, getattr(s, a)[:0]) for a in ("xyz", "rgb", "instance", "semantic")], "xyz",
     "no points"),
])
def test_bad_scene_is_rejected_naming_scene_and_field_and_writes_nothing(tmp_path, scenes, mutate, field, words):
    bad = _bad(scenes, mutate)
    with pytest.raises(SceneFormatError) as err:
        write_scenes(bad, tmp_path, vocabulary=VOCAB, max_scenes_per_shard=100, progress=False)
    assert err.value.scene == "scene_004" and err.value.field == field
    assert "scene_004" in str(err.value) and words in str(err.value)
    assert final_files(tmp_path) == []


def test_other_schema_version_is_refused(tmp_path, scenes):
    write_scenes(scenes[:2], tmp_path, vocabulary=VOCAB, progress=False)
    with h5py.File(tmp_path / "shard-00000.h5", "a") as f:
        f.attrs["schema_version"] = 99
    with pytest.raises(ShardError) as err:  # set up from index.json: the shard is opened on first read
        SceneStore(tmp_path)[0]
    assert "schema version 99" in str(err.value) and "shard-00000.h5" in str(err.value)
    with pytest.raises(ShardError, match="schema version 99"):  # named as a file, it is opened at once
        SceneStore(tmp_path / "shard-00000.h5")


def test_truncated_and_corrupted_shards_are_detected(tmp_path, scenes, capsys):
    trunc, flip = tmp_path / "trunc", tmp_path / "flip"
    write_scenes(scenes, trunc, vocabulary=VOCAB, progress=False)
    write_scenes(scenes, flip, vocabulary=VOCAB, compression=None, progress=False)
    shard = trunc / "shard-00000.h5"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(ShardError, match="truncated or corrupted"):
        SceneStore(trunc)[0]
    assert cli_main(["inspect", str(trunc)]) == 2
    assert "shard-00000.h5" in capsys.readouterr().err

    assert cli_main(["inspect", str(flip)]) == 0
    capsys.readouterr()
    shard = flip / "shard-00000.h5"
    with h5py.File(shard) as f:
        start = f["points/xyz"].id.get_offset()
    data = bytearray(shard.read_bytes())
    data[start + 100] ^= 0xFF  # one flipped byte inside scene 0's coordinates
    shard.write_bytes(bytes(data))
    assert cli_main(["inspect", str(flip)]) == 2
    err = capsys.readouterr().err
    assert "checksum mismatch" in err and "scene_000" in err
    with pytest.raises(ShardError, match="checksum"):
        SceneStore(flip, verify=True)[0]


KILL_SCRIPT = textwrap.dedent("""
    import sys, time
    import numpy as np
    sys.path.insert(0, {tests!r})
    from helpers import VOCAB, make_scene
    from sparsegps.data import write_scenes

    def scenes():
        rng = np.random.default_rng(0)
        for i in range(40):
            if {slow}:
                time.sleep(0.1)
            yield make_scene(rng, f"scene_{{i:03d}}", n_points=3000, n_objects=5)

    write_scenes(scenes(), sys.argv[1], vocabulary=VOCAB, max_scenes_per_shard=6, progress=False)
""")


def test_pack_killed_midway_leaves_no_partial_shard_and_rerun_completes(tmp_path):
    out = tmp_path / "out"
    tests_dir = str(Path(__file__).parent)
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT.format(tests=tests_dir, slow=True), str(out)])
    deadline = time.time() + 60
    while time.time() < deadline and not (out.exists() and len(list(out.glob("shard-*.h5"))) >= 2):
        time.sleep(0.05)
    time.sleep(0.25)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finals = sorted(out.glob("shard-*.h5"))
    assert 2 <= len(finals) < 7 and not (out / "index.json").exists()
    for shard in finals:  # every final-named shard is complete and readable
        store = SceneStore([shard], verify=True)
        assert len(store) == 6 and all(store[i].num_points == 3000 for i in range(6))
    kept_mtimes = {p: p.stat().st_mtime_ns for p in finals}
    subprocess.run([sys.executable, "-c", KILL_SCRIPT.format(tests=tests_dir, slow=False), str(out)], check=True)
    index = json.loads((out / "index.json").read_text())
    assert index["num_scenes"] == 40 and index["shards_kept"] == len(finals)
    assert all(p.stat().st_mtime_ns == t for p, t in kept_mtimes.items())  # complete shards were not rewritten
    assert [s.scene_id for s in SceneStore(out)] == [f"scene_{i:03d}" for i in range(40)]
    assert not list(out.glob("*.tmp"))


# ------------------------------------------------------------------------------------ text fields

def _with_text_fields(scene):
    """The scene with the text fields of schema versions 2 and 3 filled (unicode, empty and repeated
    values)."""
    import dataclasses

    texts = [dataclasses.replace(t, source=["scanrefer", "nr3d", "ssg_ref_chain_gpt", ""][k % 4],
                                 item_id=f"ïtem-{scene.scene_id}-{k}" if k % 3 else "",
                                 shape=["free", "", "chain"][k % 3] if t.kind == "referral" else "",
                                 relation=["closest", "", "color+next_to", "à"][k % 4] if t.kind == "referral" else "")
             for k, t in enumerate(scene.texts)]
    return dataclasses.replace(scene, texts=texts)


def test_text_fields_round_trip_source_item_id_shape_and_relation(tmp_path, scenes, capsys):
    scenes = [_with_text_fields(s) for s in scenes]
    write_scenes(scenes, tmp_path, vocabulary=VOCAB, max_scenes_per_shard=5, progress=False)
    store = SceneStore(tmp_path, verify=True)
    assert [store[i] for i in range(len(store))] == scenes
    assert {t.shape for s in scenes for t in s.texts if t.kind == "referral"} == {"free", "", "chain"}
    assert cli_main(["inspect", "--json", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out)
    texts = [t for s in scenes for t in s.texts]
    assert summary["texts_per_source"] == {k: v for k, v in Counter(t.source for t in texts).items()}
    assert summary["referrals_per_shape"] == dict(Counter(t.shape for t in texts if t.kind == "referral"))
    assert summary["schema_versions"] == {str(SCHEMA_VERSION): 3}
    relations = {t.relation for s in scenes for t in s.texts if t.kind == "referral"}
    assert len(relations) >= 2 and relations <= {"closest", "", "color+next_to", "à"}  # and they round-tripped


def test_version_2_shards_read_with_empty_relations_and_upgrade(tmp_path, scenes):
    """A version-2 shard (no texts/relation) reads with every relation empty, its checksums verify,
    and `upgrade_shards` rewrites it as the current version with the same checksums."""
    write_scenes(scenes, tmp_path, vocabulary=VOCAB, progress=False)
    shard = tmp_path / "shard-00000.h5"
    with h5py.File(shard, "a") as f:  # the version-2 layout: the same file without the relation column
        del f["texts/relation"]
        del f.attrs["text_relations"]
        f.attrs["schema_version"] = 2
        stored = f["scenes/checksum"][()]
    store = SceneStore(tmp_path, verify=True)
    assert [store[i] for i in range(len(store))] == scenes and store.shards[0].schema_version == 2
    store.close()
    assert upgrade_shards(tmp_path, progress=False) == [shard]
    with h5py.File(shard) as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION and np.array_equal(f["scenes/checksum"][()], stored)
    assert [SceneStore(tmp_path, verify=True)[i] for i in range(len(scenes))] == scenes


def write_v1_shard(path: Path, scenes, vocabulary) -> None:
    """A shard in the version-1 layout (variable-length strings, no per-text source/item/shape)."""
    objects = [o for s in scenes for o in s.objects]
    texts = [t for s in scenes for t in s.texts]
    string = h5py.string_dtype("utf-8")
    with h5py.File(path, "w") as f:
        f.attrs.update({"format": "sparsegps-scenes", "schema_version": 1, "source": "old", "tool": "sparsegps 0.0",
                        "created": "2025", "label_vocabulary": json.dumps(vocabulary), "num_scenes": len(scenes),
                        "annotated_by": "kept"})
        for name in ("xyz", "rgb", "instance", "semantic"):
            f.create_dataset(f"points/{name}", data=np.concatenate([getattr(s, name) for s in scenes]),
                             chunks=True, compression="lzf")
        f.create_dataset("scenes/id", data=np.array([s.scene_id for s in scenes], dtype=object), dtype=string)
        f.create_dataset("scenes/checksum", data=np.array([s.checksum() for s in scenes], dtype="S32"))
        for name, count in (("point", lambda s: s.num_points), ("object", lambda s: len(s.objects)),
                            ("text", lambda s: len(s.texts))):
            f.create_dataset(f"scenes/{name}_offset", data=np.cumsum([0] + [count(s) for s in scenes]))
        f.create_dataset("objects/instance_id", data=np.array([o.instance_id for o in objects], np.int32))
        f.create_dataset("objects/label", data=np.array([o.label for o in objects], dtype=object), dtype=string)
        f.create_dataset("objects/label_id", data=np.array([vocabulary.index(o.label) for o in objects], np.int16))
        f.create_dataset("objects/center", data=np.array([o.center for o in objects], np.float32))
        f.create_dataset("objects/size", data=np.array([o.size for o in objects], np.float32))
        f.create_dataset("texts/kind", data=np.array([("object_caption", "scene_caption", "referral").index(t.kind)
                                                       for t in texts], np.uint8))
        f.create_dataset("texts/text", data=np.array([t.text for t in texts], dtype=object), dtype=string)
        f.create_dataset("texts/target_id", data=np.array([t.target_id for t in texts], np.int32))
        f.create_dataset("texts/distractor_offset", data=np.cumsum([0] + [len(t.distractor_ids) for t in texts]))
        f.create_dataset("texts/distractor_ids", data=np.array([d for t in texts for d in t.distractor_ids], np.int32))


def test_version_1_shards_read_and_upgrade_in_place_without_loss(tmp_path, scenes, capsys):
    write_v1_shard(tmp_path / "shard-00000.h5", scenes[:7], VOCAB)
    write_v1_shard(tmp_path / "shard-00001.h5", scenes[7:], VOCAB)
    store = SceneStore(tmp_path, verify=True)  # v1 checksums verify: empty new fields hash as before
    assert [store[i] for i in range(len(store))] == scenes
    assert all((t.source, t.item_id, t.shape, t.relation) == ("", "", "", "") for t in store[3].texts)
    assert ScenesDataset(tmp_path, NO_AUGMENT)[2]["scene_id"] == scenes[2].scene_id
    store.close()
    with h5py.File(tmp_path / "shard-00000.h5") as f:
        stored = f["scenes/checksum"][()]

    assert cli_main(["pack", "--upgrade", str(tmp_path)]) == 0
    assert "upgraded 2 shard(s)" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-00000.h5", "shard-00001.h5"]  # no temp files left
    with h5py.File(tmp_path / "shard-00000.h5") as f:
        assert f.attrs["schema_version"] == SCHEMA_VERSION and f.attrs["annotated_by"] == "kept" and f.attrs["source"] == "old"
        assert np.array_equal(f["scenes/checksum"][()], stored)  # points, objects and texts unchanged
        assert f["points/xyz"].chunks is None  # rewritten with the default layout
    store = SceneStore(tmp_path, verify=True)
    assert [store[i] for i in range(len(store))] == scenes
    assert {s.schema_version for s in store.shards} == {SCHEMA_VERSION}
    assert cli_main(["pack", "--upgrade", str(tmp_path)]) == 0  # nothing left to do
    assert "upgraded 0 shard(s)" in capsys.readouterr().out


def test_reads_without_preadv_go_through_h5py_with_the_same_result(tmp_path, scenes, monkeypatch):
    import sparsegps.data.store as store_module

    scenes = [_with_text_fields(s) for s in scenes]
    write_scenes(scenes, tmp_path, vocabulary=VOCAB, progress=False)
    monkeypatch.setattr(store_module, "_HAS_PREADV", False)  # as on macOS and Windows
    store = SceneStore(tmp_path, verify=True)
    assert [store[i] for i in range(len(store))] == scenes
    assert all(t.offset is None for t in store._shard(0).tables.values())


def test_hdf5plugin_codecs_round_trip(tmp_path, scenes):  # hdf5plugin is in the dev extra
    for codec in ("lz4", "blosc"):
        write_scenes(scenes, tmp_path / codec, vocabulary=VOCAB, compression=codec, progress=False)
        with h5py.File(tmp_path / codec / "shard-00000.h5") as f:
            assert f.attrs["compression"] == codec and f["points/xyz"].chunks is not None
        store = SceneStore(tmp_path / codec, verify=True)
        assert [store[i] for i in range(len(store))] == scenes
