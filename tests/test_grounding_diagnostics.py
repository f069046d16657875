"""Grounding diagnostics against hand-computed cases: wrong class, right class but wrong instance, target."""
from __future__ import annotations

import json

import numpy as np
import pytest

from sparsegps.eval.grounding_diagnostics import (flat_summary, format_diagnostics, grounding_diagnostics,
                                                  save_diagnostics)

CLASSES = ["chair", "chair", "table", "chair"]  # the target (1) has two same-class distractors
BOXES = np.array([[0, 0, 0, 2, 2, 2], [3, 0, 0, 1, 1, 1], [9, 9, 0, 1, 1, 1], [1, 1, 0, 0.5, 0.5, 0.5]], float)


def record(scores, relation="closest", shape="single", source="generated", utterance="the chair near the door"):
    return {"scores": scores, "target": 1, "classes": CLASSES, "boxes": BOXES, "relation": relation, "shape": shape,
            "source": source, "utterance": utterance}


WRONG_CLASS = record([0.5, 0.2, 0.9, 0.1])  # picks the table; among chairs it would pick chair 0
WRONG_INSTANCE = record([0.9, 0.2, 0.1, 0.3], relation="color+next_to", shape="double")  # picks chair 0
TARGET = record([0.1, 0.9, 0.2, 0.3], relation="next_to", shape="double")


def test_overall_numbers_of_three_hand_cases():
    report = grounding_diagnostics([WRONG_CLASS, WRONG_INSTANCE, TARGET])
    assert report["referrals"] == 3
    assert report["accuracy"] == pytest.approx(1 / 3)
    assert report["class_accuracy"] == pytest.approx(2 / 3)  # the second picks a chair, the wrong one
    assert report["within_class_accuracy"] == pytest.approx(1 / 3)  # among chairs only the third is right
    assert report["class_prior"] == pytest.approx(1 / 3)  # three chairs each time
    assert report["chance"] == pytest.approx(1 / 4)
    assert flat_summary(report)["grounding_within_class_accuracy"] == pytest.approx(1 / 3)


def test_a_wrong_class_choice_can_still_be_right_within_the_class():
    # picks the table, but among the chairs the target scores highest
    report = grounding_diagnostics([record([0.1, 0.5, 0.9, 0.3])])
    assert (report["accuracy"], report["class_accuracy"], report["within_class_accuracy"]) == (0.0, 0.0, 1.0)


def test_breakdowns_by_relation_shape_same_class_and_view():
    nr3d = record([0.1, 0.9, 0.2, 0.3], relation="", shape="free", source="nr3d",
                  utterance="facing the bed, the chair on the left")
    report = grounding_diagnostics([WRONG_CLASS, WRONG_INSTANCE, TARGET, nr3d])
    by_relation = report["by_relation"]
    # a referral counts once under each relation it uses; one without a relation under "(none)"
    assert {k: v["referrals"] for k, v in by_relation.items()} == {"(none)": 1, "closest": 1, "color": 1, "next_to": 2}
    assert by_relation["next_to"]["accuracy"] == 0.5 and by_relation["color"]["accuracy"] == 0.0
    assert {k: v["referrals"] for k, v in report["by_shape"].items()} == {"double": 2, "free": 1, "single": 1}
    assert list(report["by_same_class"]) == ["3"] and report["by_same_class"]["3"]["class_prior"] == pytest.approx(1 / 3)
    # view dependence is defined for ReferIt3D's referrals only (its word list)
    assert {k: v["referrals"] for k, v in report["by_view"].items()} == {"view_dependent": 1}


def test_same_class_counts_and_padding_are_respected():
    # two objects of the class, a padded slot (-inf) that must never be chosen
    r = {"scores": [0.2, 0.1, -np.inf], "target": 0, "classes": ["lamp", "lamp", "lamp"], "relation": "tallest"}
    report = grounding_diagnostics([r])
    assert report["accuracy"] == 1.0 and report["chance"] == 0.5
    assert report["class_prior"] == 0.5  # candidates only: the padded slot is no object
    with pytest.raises(ValueError, match="target 5"):
        grounding_diagnostics([{**r, "target": 5}])


def test_within_class_preferences_against_the_target_rate():
    # chair 0 is the largest; WRONG_INSTANCE and WRONG_CLASS's within-class choice both pick it
    picks = grounding_diagnostics([WRONG_CLASS, WRONG_INSTANCE, TARGET])["within_class_picks"]
    assert picks["largest"]["chosen"] == pytest.approx(2 / 3) and picks["largest"]["is_target"] == 0.0
    assert picks["first_slot"]["chosen"] == pytest.approx(2 / 3)
    assert picks["smallest"]["chosen"] == 0.0  # chair 3 is the smallest, never chosen


def test_reports_are_written_as_json_markdown_and_a_chart(tmp_path):
    report = grounding_diagnostics([WRONG_CLASS, WRONG_INSTANCE, TARGET])
    paths = save_diagnostics(report, tmp_path, "grounding", "test")
    assert [p.name for p in paths] == ["grounding.json", "grounding.md", "grounding.png"]
    assert json.loads(paths[0].read_text())["referrals"] == 3
    assert paths[2].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| next_to | 2 | 0.500 |" in format_diagnostics(report)
