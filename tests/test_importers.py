"""`sparsegps pack`: fixtures written in the published SceneVerse, ScanNet v2, ScanRefer, ReferIt3D
and Pointcept formats round-trip to the expected points, labels, boxes and texts; problems are
reported with scan and item ids; malicious pickles are refused unrun."""
from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from plyfile import PlyData, PlyElement

from sparsegps.cli import main as cli_main
from sparsegps.data import SceneStore
from sparsegps.data.labels import load_label_map
from sparsegps.eval.grounding import evaluate_scanrefer, referral_record, write_submission
from sparsegps.importers import UnsafeFileError, load_pth

SCANNET200 = load_label_map("scannet200").names


def blob(rng, center, n, spread=0.1):
    return (np.asarray(center) + rng.uniform(-spread, spread, (n, 3))).astype(np.float64)


def expected_box(points):
    lo, hi = points.min(axis=0), points.max(axis=0)
    return (lo + hi) / 2, hi - lo


def pack(*argv) -> int:
    return cli_main(["pack", *map(str, argv)])


# ------------------------------------------------------------------------------------------ SceneVerse

def write_sceneverse(root: Path, rng) -> dict:
    """A SceneVerse download with a ScanNet scan (4-tuple, -100 background) and a 3RScan scan
    (3-tuple, float64 instance ids, -1 background), language as DATA.md and the loaders describe."""
    truth = {}
    scannet = root / "ScanNet"
    for d in ("scan_data/pcd_with_global_alignment", "scan_data/instance_id_to_label", "annotations/refer",
              "annotations/splits"):
        (scannet / d).mkdir(parents=True)
    parts = [blob(rng, (0, 0, 0.5), 60), blob(rng, (2, 0, 0.5), 50), blob(rng, (1, 2, 0.4), 70),
             blob(rng, (0, 0, 0), 40, spread=2.0), blob(rng, (3, 3, 0.3), 20), blob(rng, (5, 5, 5), 30)]
    ids = [0, 1, 2, 3, 4, -100]
    xyz = np.concatenate(parts)
    instance = np.concatenate([np.full(len(p), i) for p, i in zip(parts, ids)]).astype(np.int64)
    rgb = rng.uniform(0, 255, (len(xyz), 3))
    nyu40 = np.zeros(len(xyz), dtype=np.int64)
    torch.save((xyz, rgb, nyu40, instance), scannet / "scan_data/pcd_with_global_alignment/scene0000_00.pth")
    labels = {0: "chair", 1: "chair", 2: "coffee table", 3: "wall", 4: "end table"}
    torch.save(labels, scannet / "scan_data/instance_id_to_label/scene0000_00.pth")
    truth["scene0000_00"] = dict(xyz=xyz, rgb=rgb, instance=np.where(instance < 0, -1, instance),
                                 parts=dict(zip(ids, parts)), labels=labels)
    (scannet / "annotations/splits/scannetv2_train.txt").write_text("scene0000_00\n")

    refer = scannet / "annotations/refer"
    with open(refer / "scanrefer.jsonl", "w") as f:
        for item in [{"item_id": "scanrefer_train_000000", "scan_id": "scene0000_00", "target_id": 2,
                      "instance_type": "coffee table", "utterance": "the low table in the middle",
                      "tokens": ["the", "low", "table"], "ann_id": "0"},
                     {"item_id": "scanrefer_train_000001", "scan_id": "scene0000_00", "target_id": 1,
                      "instance_type": "chair", "utterance": "the chair on the right", "tokens": [], "ann_id": "0"}]:
            f.write(json.dumps(item) + "\n")
    with open(refer / "sr3d+.jsonl", "w") as f:
        f.write(json.dumps({"item_id": "sr3d+_000000", "scan_id": "scene0000_00", "target_id": 0,
                            "instance_type": "chair", "utterance": "excluded by default"}) + "\n")
    (refer / "ssg_ref_rel2_template.json").write_text(json.dumps([
        {"item_id": "rel2_0", "scan_id": "scene0000_00", "target_id": "0", "instance_type": "chair",
         "utterance": "the chair near the table"},
        {"item_id": "rel2_1", "scan_id": "scene0000_00", "target_id": "9", "instance_type": "lamp",
         "utterance": "the lamp that is not there"},
        {"item_id": "rel2_2", "scan_id": "scene0999_00", "target_id": "1", "instance_type": "chair",
         "utterance": "a chair in a scan nobody has"}]))
    (refer / "ssg_obj_caption_template.json").write_text(json.dumps([
        {"item_id": "cap_0", "scan_id": "scene0000_00", "target_id": "2", "instance_type": "coffee table",
         "utterance": "a low wooden coffee table"}]))
    (scannet / "annotations/scene_cap.json").write_text(json.dumps(
        {"scene0000_00": {"captions": ["a living room with two chairs", "chairs around a table"]}}))

    rscan = root / "3RScan"
    for d in ("scan_data/pcd_with_global_alignment", "scan_data/instance_id_to_label", "annotations"):
        (rscan / d).mkdir(parents=True)
    parts = [blob(rng, (0, 0, 0.4), 40), blob(rng, (1, 1, 0.4), 45), blob(rng, (0, 0, 2), 30)]
    ids = [4, 7, -1]
    xyz = np.concatenate(parts).astype(np.float32)
    instance = np.concatenate([np.full(len(p), i) for p, i in zip(parts, ids)]).astype(np.float64)
    rgb = rng.integers(0, 256, (len(xyz), 3)).astype(np.float32)
    scan = "0cac7578-8d6f-2d13-8c2d-bfa7a04f8af3"
    torch.save((xyz, rgb, instance), rscan / f"scan_data/pcd_with_global_alignment/{scan}.pth")
    labels = {np.int64(4): "bed", np.int64(7): "nightstand"}
    torch.save(labels, rscan / f"scan_data/instance_id_to_label/{scan}.pth")
    truth[scan] = dict(xyz=xyz, rgb=rgb, instance=np.where(instance < 0, -1, instance).astype(np.int64),
                       parts=dict(zip(ids, parts)), labels={4: "bed", 7: "nightstand"})
    (rscan / "annotations/ssg_ref_star_gpt.json").write_text(json.dumps([
        {"item_id": "star_0", "scan_id": scan, "target_id": 7, "instance_type": "nightstand",
         "utterance": "the nightstand beside the bed"}]))
    (rscan / "annotations/qa_questions.json").write_text("[]")
    return truth


def test_sceneverse_round_trip(tmp_path, capsys):
    rng = np.random.default_rng(0)
    truth = write_sceneverse(tmp_path / "SceneVerse", rng)
    out = tmp_path / "out"
    assert pack("--format", "sceneverse", "--src", tmp_path / "SceneVerse", "--out", out) == 0
    summary = capsys.readouterr().out
    store = SceneStore(out, verify=True)
    assert store.vocabulary == SCANNET200
    assert store.scene_ids() == ["scene0000_00", "0cac7578-8d6f-2d13-8c2d-bfa7a04f8af3"]  # ScanNet first
    for i, scene_id in enumerate(store.scene_ids()):
        scene, want = store[i], truth[scene_id]
        np.testing.assert_array_equal(scene.xyz, want["xyz"].astype(np.float32))
        np.testing.assert_array_equal(scene.rgb, np.rint(want["rgb"]).astype(np.uint8))
        np.testing.assert_array_equal(scene.instance, want["instance"])
        expected_semantic = np.array([SCANNET200.index(want["labels"][i]) if i in want["labels"] else -1
                                      for i in want["instance"]])
        np.testing.assert_array_equal(scene.semantic, expected_semantic)
        assert {o.instance_id: o.label for o in scene.objects} == want["labels"]
        for o in scene.objects:
            center, size = expected_box(want["parts"][o.instance_id].astype(np.float32))
            np.testing.assert_allclose(o.center, center, atol=1e-6)
            np.testing.assert_allclose(o.size, size, atol=1e-6)

    texts = {(t.kind, t.text): t for t in store[0].texts}
    assert len(store[0].texts) == 6  # 2 ScanRefer + 1 rel2 + 1 object caption + 2 scene captions; sr3d+ left out
    assert texts[("referral", "the chair near the table")].distractor_ids == (1,)
    assert texts[("referral", "the chair on the right")].distractor_ids == (0,)
    # ScanRefer groups by its 18 classes, where the end table is a "table" as well: "multiple"
    assert texts[("referral", "the low table in the middle")].distractor_ids == (4,)
    assert texts[("object_caption", "a low wooden coffee table")].target_id == 2
    assert texts[("scene_caption", "chairs around a table")].target_id == -1
    assert [(t.kind, t.target_id, t.distractor_ids) for t in store[1].texts] == [("referral", 7, ())]
    # schema v2: each text keeps its source, its item id there and (referrals) its shape
    assert sorted((t.source, t.item_id, t.shape) for t in store[0].texts if t.kind == "referral") == [
        ("scanrefer", "0", "free"), ("scanrefer", "0", "free"), ("ssg_ref_rel2_template", "rel2_0", "rel2")]
    assert texts[("object_caption", "a low wooden coffee table")].source == "ssg_obj_caption_template"
    assert texts[("object_caption", "a low wooden coffee table")].shape == ""
    assert texts[("scene_caption", "chairs around a table")].source == "scene_cap"
    assert [(t.source, t.item_id, t.shape) for t in store[1].texts] == [("ssg_ref_star_gpt", "star_0", "star")]

    report = json.loads((out / "pack_report.json").read_text())
    assert report["texts"] == {"referral": 4, "object_caption": 1, "scene_caption": 2}
    assert report["problems"] == {"target_missing": 1, "scene_missing": 1}
    missing = report["problem_examples"]["target_missing"][0]
    assert (missing["scan_id"], missing["item_id"]) == ("scene0000_00", "rel2_1")
    assert "scene0000_00" in summary and "rel2_1" in summary and "scene0999_00" in summary
    assert any("qa_questions" in note for note in report["notes"])


def test_sceneverse_split_language_selection_and_strict(tmp_path, capsys):
    truth = write_sceneverse(tmp_path / "SV", np.random.default_rng(1))
    out = tmp_path / "out"
    code = pack("--format", "sceneverse", "--src", tmp_path / "SV", "--out", out, "--split", "train",
                "--datasets", "ScanNet", "--language", "scanrefer,sr3d+", "--labels", "scannet20", "--strict")
    assert code == 0  # no problem among the selected files
    store = SceneStore(out)
    assert store.scene_ids() == ["scene0000_00"] and store.vocabulary == load_label_map("scannet20").names
    assert sorted(t.text for t in store[0].texts) == ["excluded by default", "the chair on the right",
                                                      "the low table in the middle"]
    chair = load_label_map("scannet20").names.index("chair")
    assert (store[0].semantic[truth["scene0000_00"]["instance"] == 0] == chair).all()
    capsys.readouterr()
    assert pack("--format", "sceneverse", "--src", tmp_path / "SV", "--out", tmp_path / "o2", "--strict") == 2
    assert "target_missing" in capsys.readouterr().out


def test_parallel_pack_matches_serial_and_reruns_skip(tmp_path, capsys):
    write_sceneverse(tmp_path / "SV", np.random.default_rng(2))
    serial, parallel = tmp_path / "serial", tmp_path / "parallel"
    assert pack("--format", "sceneverse", "--src", tmp_path / "SV", "--out", serial, "--max-scenes-per-shard", 1) == 0
    assert pack("--format", "sceneverse", "--src", tmp_path / "SV", "--out", parallel, "--workers", 2,
                "--max-scenes-per-shard", 1) == 0
    a, b = SceneStore(serial), SceneStore(parallel)
    assert a.scene_ids() == b.scene_ids() and all(a[i] == b[i] for i in range(len(a)))
    shards = sorted(serial.glob("shard-*.h5"))
    assert len(shards) == 2
    stamps = [p.stat().st_mtime_ns for p in shards]
    capsys.readouterr()
    # unchanged inputs: nothing is loaded or written
    assert pack("--format", "sceneverse", "--src", tmp_path / "SV", "--out", serial, "--max-scenes-per-shard", 1) == 0
    assert "up to date" in capsys.readouterr().out
    # an interrupted run leaves finished shards but no report: they are kept, not rewritten
    (serial / "pack_report.json").unlink()
    assert pack("--format", "sceneverse", "--src", tmp_path / "SV", "--out", serial, "--max-scenes-per-shard", 1) == 0
    assert [p.stat().st_mtime_ns for p in shards] == stamps
    assert json.loads((serial / "index.json").read_text())["shards_kept"] == 2


class RunsCommand:
    """A pickle payload: unpickling it would call `func(*args)`."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


@pytest.mark.parametrize("payload", ["os.system", "subprocess.call", "builtins.exec"])
def test_malicious_pickle_is_refused_unrun(tmp_path, capsys, payload):
    marker = tmp_path / "pwned"
    command = f"touch {marker}"
    func, args = {"os.system": (os.system, (command,)),
                  "subprocess.call": (subprocess.call, (["touch", str(marker)],)),
                  "builtins.exec": (exec, (f"open({str(marker)!r}, 'w').close()",))}[payload]
    root = tmp_path / "SV"
    write_sceneverse(root, np.random.default_rng(3))
    evil = root / "ScanNet/scan_data/pcd_with_global_alignment/scene0000_00.pth"
    torch.save((np.zeros((3, 3)), np.zeros((3, 3)), RunsCommand(func, args)), evil)

    with pytest.raises(UnsafeFileError) as error:
        load_pth(evil)
    assert str(evil) in str(error.value) and "refused" in str(error.value)
    assert not marker.exists()

    out = tmp_path / "out"
    assert pack("--format", "sceneverse", "--src", root, "--out", out) == 0  # the other scan is still packed
    assert not marker.exists()
    report = json.loads((out / "pack_report.json").read_text())
    assert report["problems"]["unsafe_file"] == 1
    assert report["problem_examples"]["unsafe_file"][0]["file"] == str(evil)
    assert SceneStore(out).scene_ids() == ["0cac7578-8d6f-2d13-8c2d-bfa7a04f8af3"]
    assert str(evil) in capsys.readouterr().out


def test_pth_written_by_numpy_1_loads(tmp_path):
    """Files saved under NumPy 1.x name `numpy.core.multiarray`; they load through the same allow-list."""
    arrays = (np.arange(6, dtype=np.float32).reshape(2, 3), np.array([0, -100]), {np.int64(3): "chair"})
    buffer = io.BytesIO()
    torch.save(arrays, buffer)
    old = tmp_path / "numpy1.pth"
    with zipfile.ZipFile(io.BytesIO(buffer.getvalue())) as src, zipfile.ZipFile(old, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("data.pkl"):
                assert b"numpy._core.multiarray" in data
                data = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            dst.writestr(info, data)
    xyz, ids, table = load_pth(old)
    np.testing.assert_array_equal(xyz, arrays[0])
    np.testing.assert_array_equal(ids, arrays[1])
    assert table == {3: "chair"}


def test_corrupt_pth_is_a_clear_error(tmp_path):
    bad = tmp_path / "scene.pth"
    bad.write_bytes(b"PK\x03\x04 this is not a torch file")
    with pytest.raises(ValueError, match="scene.pth"):
        load_pth(bad)


# -------------------------------------------------------------------------------------------- ScanNet

AXIS_ALIGNMENT = np.array([[0, -1, 0, 1], [1, 0, 0, 2], [0, 0, 1, 0.5], [0, 0, 0, 1]], dtype=np.float64)


def write_scannet(root: Path, rng) -> dict:
    """One ScanNet v2 scan (PLY, segs.json, aggregation.json, axis alignment) plus ScanRefer JSON and
    Nr3D / Sr3D CSVs, each in its published layout."""
    scene = "scene0011_00"
    d = root / "scans" / scene
    d.mkdir(parents=True)
    # segments 0-5; objects: 0 chair (segs 0, 1), 1 chair (seg 2, and seg 5 taken over from object 2),
    # 2 table (segs 3, 5); seg 4 unlabelled
    seg_centers = [(0, 0, 0.5), (0.2, 0, 0.5), (2, 0, 0.5), (1, 2, 0.4), (4, 4, 0), (1.3, 2, 0.4)]
    counts = [20, 15, 25, 30, 20, 10]
    xyz = np.concatenate([blob(rng, c, n) for c, n in zip(seg_centers, counts)]).astype(np.float32)
    seg_indices = np.concatenate([np.full(n, 100 + s) for s, n in enumerate(counts)])
    rgb = rng.integers(0, 256, (len(xyz), 3), dtype=np.uint8)
    vertex = np.empty(len(xyz), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"), ("red", "u1"), ("green", "u1"),
                                       ("blue", "u1"), ("alpha", "u1")])
    for k, c in enumerate("xyz"):
        vertex[c] = xyz[:, k]
    for k, c in enumerate(("red", "green", "blue")):
        vertex[c] = rgb[:, k]
    vertex["alpha"] = 255
    faces = np.empty(2, dtype=[("vertex_indices", "i4", (3,))])
    faces["vertex_indices"] = [[0, 1, 2], [3, 4, 5]]
    PlyData([PlyElement.describe(vertex, "vertex"), PlyElement.describe(faces, "face")]).write(
        str(d / f"{scene}_vh_clean_2.ply"))
    (d / f"{scene}_vh_clean_2.0.010000.segs.json").write_text(json.dumps(
        {"params": {"kThresh": "0.0001", "segMinVerts": "20"}, "sceneId": f"{scene}_vh_clean_2",
         "segIndices": seg_indices.tolist()}))
    groups = [{"id": 0, "objectId": 0, "segments": [100, 101], "label": "chair"},
              {"id": 2, "objectId": 2, "segments": [103, 105], "label": "coffee table"},
              {"id": 1, "objectId": 1, "segments": [105, 102], "label": "chair"}]
    (d / f"{scene}.aggregation.json").write_text(json.dumps(
        {"sceneId": f"scannet.{scene}", "appId": "Aggregator.v2", "segGroups": groups,
         "segmentsFile": f"scannet.{scene}_vh_clean_2.0.010000.segs.json"}))
    (d / f"{scene}.txt").write_text("colorHeight = 968\naxisAlignment = " + " ".join(
        f"{v:g}" for v in AXIS_ALIGNMENT.ravel()) + "\nsceneType = Living room / Lounge\n")
    # the later group in file order (object 1) wins segment 105
    instance = np.select([np.isin(seg_indices, [100, 101]), np.isin(seg_indices, [102, 105]), seg_indices == 103],
                         [0, 1, 2], -1)
    aligned = np.stack([-xyz[:, 1] + 1, xyz[:, 0] + 2, xyz[:, 2] + 0.5], axis=1)  # 90 degrees about z, shifted

    language = root / "language"
    language.mkdir()
    (language / "ScanRefer_filtered_val.json").write_text(json.dumps([
        {"scene_id": scene, "object_id": "2", "object_name": "coffee_table", "ann_id": "0",
         "description": "the table between the chairs.", "token": ["the", "table"]},
        {"scene_id": scene, "object_id": "0", "object_name": "chair", "ann_id": "1",
         "description": "the chair to the left of the other chair.", "token": ["the", "chair"]},
        {"scene_id": scene, "object_id": "7", "object_name": "lamp", "ann_id": "0",
         "description": "a lamp that is not in the scan.", "token": ["a", "lamp"]}]))
    nr3d_columns = ["assignmentid", "stimulus_id", "utterance", "correct_guess", "speaker_id", "listener_id",
                    "mentions_target_class", "uses_object_lang", "uses_spatial_lang", "uses_color_lang",
                    "uses_shape_lang", "scan_id", "instance_type", "target_id", "tokens", "dataset"]
    with open(language / "nr3d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(nr3d_columns)
        w.writerow(["3XL", f"{scene}-chair-2-1-0", "facing the table, the chair on the right", "True", "s1", "l1",
                    "True", "True", "True", "False", "False", scene, "chair", "1", "['facing', 'the']", "nr3d"])
        w.writerow(["3XM", f"{scene}-chair-2-0-1", "the one closer to the wall", "False", "s2", "l2",
                    "False", "True", "True", "False", "False", scene, "chair", "0", "['the']", "nr3d"])
    with open(language / "sr3d.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["scan_id", "target_id", "distractor_ids", "utterance", "stimulus_id", "coarse_reference_type",
                    "reference_type", "instance_type", "anchors_types", "anchor_ids"])
        w.writerow([scene, "0", "[1]", "the chair that is closest to the coffee table", f"{scene}-chair-2-0-1",
                    "horizontal", "closest", "chair", "['coffee table']", "[2]"])
        w.writerow(["scene0999_00", "3", "[]", "the bed near the door", "scene0999_00-bed-1-3", "horizontal",
                    "closest", "bed", "['door']", "[1]"])
    return dict(scene=scene, xyz=xyz, aligned=aligned, rgb=rgb, instance=instance)


def test_scannet_round_trip(tmp_path, capsys):
    want = write_scannet(tmp_path / "ScanNet", np.random.default_rng(4))
    lang = tmp_path / "ScanNet" / "language"
    out = tmp_path / "out"
    assert pack("--format", "scannet", "--src", tmp_path / "ScanNet", "--out", out,
                "--scanrefer", lang / "ScanRefer_filtered_val.json", "--nr3d", lang / "nr3d.csv",
                "--sr3d", lang / "sr3d.csv") == 0
    summary = capsys.readouterr().out
    store = SceneStore(out, verify=True)
    scene = store[0]
    assert scene.scene_id == want["scene"] and store.vocabulary == SCANNET200
    np.testing.assert_allclose(scene.xyz, want["aligned"], atol=1e-5)
    np.testing.assert_array_equal(scene.rgb, want["rgb"])
    np.testing.assert_array_equal(scene.instance, want["instance"])
    labels = {-1: -1, 0: SCANNET200.index("chair"), 1: SCANNET200.index("chair"), 2: SCANNET200.index("coffee table")}
    np.testing.assert_array_equal(scene.semantic, [labels[i] for i in want["instance"]])
    assert [(o.instance_id, o.label) for o in scene.objects] == [(0, "chair"), (1, "chair"), (2, "coffee table")]
    for o in scene.objects:
        center, size = expected_box(want["aligned"][want["instance"] == o.instance_id])
        np.testing.assert_allclose(o.center, center, atol=1e-5)
        np.testing.assert_allclose(o.size, size, atol=1e-5)
    got = [(t.text, t.target_id, t.distractor_ids) for t in scene.texts]
    assert got == [("the table between the chairs.", 2, ()),  # the Nr3D row without class mention is skipped
                   ("the chair to the left of the other chair.", 0, (1,)),
                   ("facing the table, the chair on the right", 1, (0,)),
                   ("the chair that is closest to the coffee table", 0, (1,))]
    report = json.loads((out / "pack_report.json").read_text())
    assert report["problems"] == {"target_missing": 1, "scene_missing": 1}
    missing = report["problem_examples"]["target_missing"][0]
    assert (missing["scan_id"], missing["item_id"]) == (want["scene"], "ScanRefer_filtered_val_000002")
    assert report["problem_examples"]["scene_missing"][0]["item_id"] == "sr3d_000001"
    assert "ScanRefer_filtered_val_000002" in summary and "sr3d_000001" in summary
    assert any("mentions_target_class" in note for note in report["notes"])

    # source, the benchmark's own item id, the referral's shape and (Sr3D) its relation
    assert [(t.source, t.item_id, t.shape, t.relation) for t in scene.texts] == [
        ("scanrefer", "0", "free", ""), ("scanrefer", "1", "free", ""), ("nr3d", "nr3d_000000", "free", ""),
        ("sr3d", "sr3d_000000", "horizontal", "closest")]

    # the stored referrals carry everything ScanRefer's metric needs: unique/multiple and boxes
    records = [referral_record(scene, k, predicted) for k, predicted in ((0, 2), (1, 1))]
    result = evaluate_scanrefer(records)["splits"]
    assert result["unique"]["acc@0.5"] == 1.0 and result["multiple"]["acc@0.25"] == 0.0

    # ...and its submission file, against one written by hand from the fixture's boxes
    path = write_submission(records, "scanrefer", tmp_path)
    table, chosen_chair = (scene.object_by_id()[i] for i in (2, 1))

    def corners(o):
        (x, y, z), (dx, dy, dz) = o.center.astype(float), o.size.astype(float) / 2
        return [[x + dx, y + dy, z + dz], [x + dx, y + dy, z - dz], [x - dx, y + dy, z - dz], [x - dx, y + dy, z + dz],
                [x + dx, y - dy, z + dz], [x + dx, y - dy, z - dz], [x - dx, y - dy, z - dz], [x - dx, y - dy, z + dz]]

    want_rows = [{"scene_id": "scene0011_00", "object_id": "2", "ann_id": "0", "bbox": corners(table),
                  "unique_multiple": 0},
                 {"scene_id": "scene0011_00", "object_id": "0", "ann_id": "1", "bbox": corners(chosen_chair),
                  "unique_multiple": 1}]
    got_rows = json.loads(path.read_text())
    assert [{k: v for k, v in r.items() if k != "bbox"} for r in got_rows] == \
        [{k: v for k, v in r.items() if k != "bbox"} for r in want_rows]
    for got_row, want_row in zip(got_rows, want_rows):
        np.testing.assert_allclose(got_row["bbox"], want_row["bbox"], rtol=1e-6)
    # Nr3D / Sr3D: the CSV row ids with predictions
    nr3d = [referral_record(scene, 2, 0), referral_record(scene, 3, 0)]
    lines = write_submission(nr3d, "nr3d", tmp_path).read_text().splitlines()
    assert lines == ["item_id,scan_id,target_id,predicted_id,correct", "nr3d_000000,scene0011_00,1,0,0",
                     "sr3d_000000,scene0011_00,0,0,1"]


def test_scannet_split_uses_official_lists(tmp_path, capsys):
    write_scannet(tmp_path / "ScanNet", np.random.default_rng(5))
    # scene0011_00 is in ScanNet's official val split, so a train-only pack has nothing to write
    assert pack("--format", "scannet", "--src", tmp_path / "ScanNet", "--out", tmp_path / "o", "--split",
                "train") == 2
    assert "no scene" in capsys.readouterr().err
    assert pack("--format", "scannet", "--src", tmp_path / "ScanNet", "--out", tmp_path / "o", "--split", "val") == 0


def test_scannet_bad_input_names_file_scene_and_field(tmp_path, capsys):
    want = write_scannet(tmp_path / "ScanNet", np.random.default_rng(6))
    segs = tmp_path / "ScanNet/scans" / want["scene"] / f"{want['scene']}_vh_clean_2.0.010000.segs.json"
    segs.write_text(json.dumps({"segIndices": [0, 1, 2]}))
    assert pack("--format", "scannet", "--src", tmp_path / "ScanNet", "--out", tmp_path / "o") == 2
    captured = capsys.readouterr()
    assert "no scene could be packed" in captured.err
    expected = f"[bad_scene] scan {want['scene']}, file {segs}: segIndices: expected 120 integer segment ids"
    assert expected in captured.out
    assert not (tmp_path / "o" / "index.json").exists()


# ------------------------------------------------------------------------------------------- Pointcept

def test_pointcept_round_trip(tmp_path):
    rng = np.random.default_rng(7)
    folder = tmp_path / "pointcept" / "train" / "scene0000_00"
    folder.mkdir(parents=True)
    parts = [blob(rng, (0, 0, 0), 30), blob(rng, (1, 1, 1), 40), blob(rng, (3, 0, 0), 20)]
    coord = np.concatenate(parts).astype(np.float32)
    color = rng.integers(0, 256, (len(coord), 3), dtype=np.uint8)
    s20 = load_label_map("scannet20").names
    segment20 = np.concatenate([np.full(30, s20.index("chair")), np.full(40, s20.index("table")), np.full(20, -1)])
    segment20[:3] = s20.index("floor")  # a few stray points: the object keeps its majority class
    instance = np.concatenate([np.full(30, 0), np.full(40, 1), np.full(20, -1)])
    for name, array in (("coord", coord), ("color", color), ("segment20", segment20), ("instance", instance)):
        np.save(folder / f"{name}.npy", array)
    out = tmp_path / "out"
    assert pack("--format", "pointcept", "--src", tmp_path / "pointcept", "--out", out, "--labels", "scannet20") == 0
    scene = SceneStore(out)[0]
    np.testing.assert_array_equal(scene.xyz, coord)
    np.testing.assert_array_equal(scene.rgb, color)
    np.testing.assert_array_equal(scene.semantic, segment20)
    np.testing.assert_array_equal(scene.instance, instance)
    assert [(o.instance_id, o.label) for o in scene.objects] == [(0, "chair"), (1, "table")]
    center, size = expected_box(coord[30:70])
    np.testing.assert_allclose(scene.objects[1].center, center, atol=1e-6)
    np.testing.assert_allclose(scene.objects[1].size, size, atol=1e-6)
