"""Grounding metrics against hand-computed cases: box IoU, ReferIt3D splits, ScanRefer Acc@k."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sparsegps.data import Scene, SceneText, boxes_from_points
from sparsegps.eval.grounding import (box_from_corners, box_iou, evaluate_referit3d, evaluate_scanrefer,
                                      format_table, is_hard, is_view_dependent, load_proposal_boxes,
                                      referral_record, save_report)

UNIT = [0, 0, 0, 1, 1, 1]


@pytest.mark.parametrize("a, b, iou", [
    (UNIT, UNIT, 1.0),
    (UNIT, [0.5, 0, 0, 1, 1, 1], 0.5 / 1.5),        # half overlap along x
    (UNIT, [0, 0, 0, 2, 2, 2], 1 / 8),              # contained
    (UNIT, [1, 0, 0, 1, 1, 1], 0.0),                # touching faces
    (UNIT, [5, 5, 5, 1, 1, 1], 0.0),                # apart
    ([1, 1, 1, 2, 2, 2], [2, 1.5, 1, 2, 1, 2], 2 / 10),  # [0,2]^3 vs [1,3]x[1,2]x[0,2]: 2 / (8 + 4 - 2)
    (UNIT, [0, 0, 0, 1, 1, 0], 0.0),                # a flat box has no volume
])
def test_box_iou_hand_cases(a, b, iou):
    assert box_iou(a, b) == pytest.approx(iou)
    assert box_iou(b, a) == pytest.approx(iou)


def test_box_iou_broadcasts_and_checks():
    got = box_iou([UNIT, [0.5, 0, 0, 1, 1, 1]], UNIT)
    np.testing.assert_allclose(got, [1.0, 1 / 3])
    with pytest.raises(ValueError):
        box_iou([0, 0, 0, 1, 1], UNIT)
    corners = np.array([[x, y, z] for x in (0, 2) for y in (1, 2) for z in (-1, 1)])
    np.testing.assert_allclose(box_from_corners(corners), [1, 1.5, 0, 2, 1, 2])


def test_split_rules():
    assert not is_hard(0) and not is_hard(1) and is_hard(2)  # hard: more than two same-class objects
    assert is_view_dependent("the chair on the left.")  # punctuation does not hide the word
    assert is_view_dependent("the left-most lamp") and is_view_dependent("Facing the bed")
    assert not is_view_dependent("the lefty mug") and not is_view_dependent("the chair next to the desk")
    assert is_view_dependent(["looking", "at", "it"]) and not is_view_dependent(["the", "leftish", "one"])


def test_referit3d_splits_hand_computed():
    records = [
        dict(target_id=1, predicted_id=1, num_distractors=0, utterance="the chair on the left."),   # ok  easy dep
        dict(target_id=2, predicted_id=3, num_distractors=1, utterance="the big table"),            # bad easy indep
        dict(target_id=4, predicted_id=4, num_distractors=2, utterance="the lamp behind the sofa"), # ok  hard dep
        dict(target_id=5, predicted_id=6, num_distractors=5, utterance="the leftmost stool"),       # bad hard dep
        dict(target_id=7, predicted_id=7, num_distractors=3, utterance="the cup near the sink"),    # ok  hard indep
        dict(target_id=8, predicted_id=9, num_distractors=1, utterance="the lefty mug"),            # bad easy indep
    ]
    report = evaluate_referit3d(records)
    splits = report["splits"]
    assert report["benchmark"] == "referit3d"
    assert {k: (v["correct"], v["total"]) for k, v in splits.items()} == {
        "overall": (3, 6), "easy": (1, 3), "hard": (2, 3), "view_dependent": (2, 3), "view_independent": (1, 3)}
    assert splits["overall"]["accuracy"] == 0.5 and splits["easy"]["accuracy"] == pytest.approx(1 / 3)
    table = format_table(report)
    assert "| Accuracy (%) | 50.0 | 33.3 | 66.7 | 66.7 | 33.3 |" in table
    assert "| Referrals | 6 | 3 | 3 | 3 | 3 |" in table
    # given tokens win over the utterance; an empty split has no accuracy
    one = evaluate_referit3d([dict(target_id=1, predicted_id=1, num_distractors=0, utterance="plain",
                                   tokens=["facing", "it"])])["splits"]
    assert one["view_dependent"]["total"] == 1 and one["view_independent"]["accuracy"] is None
    with pytest.raises(KeyError, match="predicted_id"):
        evaluate_referit3d([dict(target_id=1, num_distractors=0, utterance="x")])


def test_scanrefer_acc_hand_computed(tmp_path):
    records = [
        dict(target_box=UNIT, predicted_box=UNIT, num_distractors=0),                  # IoU 1     unique
        dict(target_box=UNIT, predicted_box=[0.5, 0, 0, 1, 1, 1], num_distractors=2),  # IoU 1/3   multiple
        dict(target_box=UNIT, predicted_box=[0, 0, 0, 2, 2, 2], num_distractors=0),    # IoU 1/8   unique
        dict(target_box=UNIT, predicted_box=[1, 0, 0, 1, 1, 1], num_distractors=1),   # IoU 0     multiple
        dict(target_box=UNIT, predicted_box=None, num_distractors=1),                  # no box    multiple
        dict(target_box=UNIT, predicted_box=[0, 0, 0, 1, 1, 0.6], num_distractors=0),  # IoU 0.6   unique
    ]
    report = evaluate_scanrefer(records, box_source="proposals.json")
    s = report["splits"]
    assert (s["unique"]["correct@0.25"], s["unique"]["correct@0.5"], s["unique"]["total"]) == (2, 2, 3)
    assert (s["multiple"]["correct@0.25"], s["multiple"]["correct@0.5"], s["multiple"]["total"]) == (1, 0, 3)
    assert s["overall"]["acc@0.25"] == 0.5 and s["overall"]["acc@0.5"] == pytest.approx(1 / 3)
    assert s["unique"]["mean_iou"] == pytest.approx((1 + 1 / 8 + 0.6) / 3)
    table = format_table(report)
    assert "| Acc@0.25 (%) | 66.7 | 33.3 | 50.0 |" in table and "| Acc@0.5 (%) | 66.7 | 0.0 | 33.3 |" in table
    assert "proposals.json" in table
    # IoU exactly at the threshold counts (IoU >= k)
    edge = evaluate_scanrefer([dict(target_box=UNIT, predicted_box=[0, 0, 0, 1, 1, 0.5], num_distractors=0),
                               dict(target_box=UNIT, predicted_box=[0, 0, 0, 1, 1, 0.25], num_distractors=0)])
    assert edge["splits"]["overall"]["correct@0.5"] == 1 and edge["splits"]["overall"]["correct@0.25"] == 2
    json_path, md_path = save_report(report, tmp_path / "scanrefer.json")
    assert json.loads(json_path.read_text()) == report and md_path.read_text() == table


def test_records_from_a_stored_scene_and_proposals(tmp_path):
    xyz = np.array([[0, 0, 0], [1, 1, 1], [2, 0, 0], [3, 1, 1], [5, 5, 5]], dtype=np.float32)
    instance = np.array([0, 0, 1, 1, -1], dtype=np.int32)
    objects = boxes_from_points(xyz, instance, {0: "chair", 1: "chair"})
    scene = Scene("s", xyz, np.zeros((5, 3), np.uint8), instance, np.full(5, -1, np.int16), objects,
                  [SceneText("scene_caption", "a room"), SceneText("referral", "the chair on the left", 0, (1,))])
    record = referral_record(scene, 1, predicted_id=1)
    np.testing.assert_allclose(record["target_box"], [0.5, 0.5, 0.5, 1, 1, 1])
    np.testing.assert_allclose(record["predicted_box"], [2.5, 0.5, 0.5, 1, 1, 1])
    assert record["num_distractors"] == 1 and record["utterance"] == "the chair on the left"
    assert evaluate_referit3d([record])["splits"]["view_dependent"]["correct"] == 0
    with pytest.raises(ValueError, match="scene_caption"):
        referral_record(scene, 0, predicted_id=0)

    (tmp_path / "p.json").write_text(json.dumps({"s": [[0.5, 0.5, 0.5, 1, 1, 1], [9, 9, 9, 1, 1, 1]], "t": []}))
    np.savez(tmp_path / "p.npz", s=np.array([[0.5, 0.5, 0.5, 1, 1, 1]]))
    for path in (tmp_path / "p.json", tmp_path / "p.npz"):
        proposals = load_proposal_boxes(path)
        record = referral_record(scene, 1, predicted_id=0, proposals=proposals["s"])
        assert evaluate_scanrefer([record])["splits"]["overall"]["acc@0.5"] == 1.0
    assert load_proposal_boxes(tmp_path / "p.json")["t"].shape == (0, 6)
    assert referral_record(scene, 1, predicted_id=5, proposals=proposals["s"])["predicted_box"] is None
    (tmp_path / "bad.json").write_text(json.dumps({"s": [[1, 2, 3]]}))
    with pytest.raises(ValueError, match="bad.json"):
        load_proposal_boxes(tmp_path / "bad.json")
