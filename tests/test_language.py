"""Scene graphs, relations, the referral checker, text generation and `sparsegps annotate`.

Relations are checked on hand-built scenes with known answers, and every generated referral is
re-evaluated by the small oracle below, written from the relation definitions independently of
`sparsegps.language.relations`.
"""
from __future__ import annotations

import json
from itertools import combinations

import h5py
import numpy as np
import pytest

from sparsegps.cli import main as cli_main
from sparsegps.data import Scene, SceneStore, SceneText, boxes_from_points, write_scenes
from sparsegps.language import (Anchor, Clause, LanguageConfig, Referral, RelationThresholds, annotate_scene,
                                build_scene_graph, check_referral, generate_language, guess_room_type,
                                language_rng, satisfying)
from sparsegps.language.templates import NOUNS, plural, render_referral
from sparsegps.synth import SYNTH_VOCABULARY, generate_scene, preset

T = RelationThresholds()


# ----------------------------------------------------------------------------------------- helpers

def box_scene(boxes: list[tuple[str, tuple, tuple, tuple]], scene_id: str = "hand") -> Scene:
    """A scene whose objects are exactly the given boxes (label, lo, hi, rgb): each box's corners
    and some points on its surface carry its instance id."""
    rng = np.random.default_rng(0)
    xyz, rgb, inst = [], [], []
    for i, (label, lo, hi, color) in enumerate(boxes):
        lo, hi = np.array(lo, float), np.array(hi, float)
        corners = np.array([[x, y, z] for x in (lo[0], hi[0]) for y in (lo[1], hi[1]) for z in (lo[2], hi[2])])
        inner = lo + rng.random((40, 3)) * (hi - lo)
        pts = np.concatenate([corners, inner])
        xyz.append(pts)
        rgb.append(np.tile(color, (len(pts), 1)))
        inst.append(np.full(len(pts), i))
    xyz = np.concatenate(xyz).astype(np.float32)
    inst = np.concatenate(inst).astype(np.int32)
    labels = {i: b[0] for i, b in enumerate(boxes)}
    vocab = {n: k for k, n in enumerate(SYNTH_VOCABULARY)}
    semantic = np.array([vocab.get(b[0], -1) for b in boxes], np.int16)[inst]
    return Scene(scene_id, xyz, np.concatenate(rgb).astype(np.uint8), inst, semantic,
                 boxes_from_points(xyz, inst, labels)).validate()


BROWN, GRAY, BLUE, RED, WHITE = (115, 74, 45), (128, 128, 128), (48, 88, 168), (178, 40, 40), (236, 236, 232)


@pytest.fixture(scope="module")
def room():
    """A hand-built room: ids in comments. Answers below are worked out by hand."""
    return box_scene([
        ("table", (2.0, 2.0, 0.0), (3.0, 3.0, 0.75), BROWN),  # 0
        ("chair", (3.1, 2.2, 0.0), (3.6, 2.7, 0.9), GRAY),  # 1: 0.1 m east of the table
        ("chair", (5.0, 2.3, 0.0), (5.5, 2.8, 0.9), BLUE),  # 2: 2 m east of the table
        ("chair", (0.5, 6.0, 0.0), (1.0, 6.5, 0.9), GRAY),  # 3: far north-west
        ("bed", (5.0, 5.0, 0.0), (7.0, 7.0, 0.6), WHITE),  # 4
        ("picture", (5.3, 6.9, 1.2), (6.7, 6.95, 1.7), RED),  # 5: above the bed, near its head
        ("picture", (0.0, 3.0, 1.2), (0.05, 3.8, 1.7), BLUE),  # 6: on a bare wall
        ("otherfurniture", (2.3, 2.3, 0.75), (2.6, 2.6, 1.1), (35, 35, 38)),  # 7: on the table
        ("otherfurniture", (6.0, 1.0, 0.0), (6.4, 1.4, 0.4), (35, 35, 38)),  # 8: on the floor
        ("desk", (0.5, 0.5, 0.0), (1.7, 1.2, 0.76), BROWN),  # 9
        ("door", (7.9, 3.0, 0.0), (8.0, 3.9, 2.0), WHITE),  # 10
        ("floor", (0.0, 0.0, -0.02), (8.0, 8.0, 0.0), BROWN),  # 11
    ])


def anchored(relation, *anchor_ids):
    return Clause(relation, tuple(Anchor(a) for a in anchor_ids))


# ----------------------------------------------------------------------------------------- relations

def test_closest_and_farthest_chair_to_the_table(room):
    g = build_scene_graph(room)
    assert satisfying(g, "chair", (anchored("closest", 0),)) == (1,)
    assert satisfying(g, "chair", (anchored("farthest", 0),)) == (3,)
    assert satisfying(g, "chair", (anchored("closest", 4),)) == (2,)


def test_vertical_relations(room):
    g = build_scene_graph(room)
    assert satisfying(g, "picture", (anchored("above", 4),)) == (5,)
    assert satisfying(g, "bed", (anchored("below", 5),)) == (4,)
    assert satisfying(g, "otherfurniture", (anchored("on", 0),)) == (7,)
    assert satisfying(g, "table", (anchored("supporting", 7),)) == (0,)
    # the picture on the wall is above nothing; the lamp on the table is not 'above' it (touching)
    assert satisfying(g, "picture", (anchored("above", 9),)) == ()
    assert satisfying(g, "otherfurniture", (anchored("above", 0),)) == ()


def test_next_to_between_size_and_colour(room):
    g = build_scene_graph(room)
    assert satisfying(g, "chair", (anchored("next_to", 0),)) == (1,)
    # chairs 1 and 2 lie in the hull of the table and the door; of the desk and the bed, only chair 1
    assert satisfying(g, "chair", (anchored("between", 0, 10),)) == (1, 2)
    assert satisfying(g, "chair", (anchored("between", 9, 4),)) == (1,)
    assert satisfying(g, "chair", (Clause("color", value="blue"),)) == (2,)
    assert satisfying(g, "chair", (Clause("color", value="gray"),)) == (1, 3)
    assert satisfying(g, "picture", (Clause("largest"),)) == (5,)
    assert g.colors[g.row[4]] == "white" and g.colors[g.row[0]] == "brown"


def test_checker_accepts_unique_and_rejects_ambiguous(room):
    g = build_scene_graph(room)
    assert check_referral(g, Referral(1, "chair", (anchored("closest", 0),), "single")).ok
    two = check_referral(g, Referral(1, "chair", (anchored("between", 0, 10),), "between"))
    assert not two.ok and two.satisfying == (1, 2) and "ambiguous" in two.reason
    # the conjunction picks chair 1 alone: between table and door and gray
    assert check_referral(g, Referral(1, "chair", (anchored("between", 0, 10), Clause("color", value="gray")),
                                      "double")).ok
    wrong = check_referral(g, Referral(2, "chair", (anchored("closest", 0),), "single"))
    assert not wrong.ok and wrong.satisfying == (1,)
    # an anchor whose class is not unique must be singled out by its own clause
    assert not check_referral(g, Referral(5, "picture", (anchored("above", 1),), "single")).ok
    # malformed: wrong anchor count, same class anchor, structural target
    assert not check_referral(g, Referral(1, "chair", (Clause("closest", ()),), "single")).ok
    assert not check_referral(g, Referral(1, "chair", (anchored("next_to", 2),), "single")).ok
    assert not check_referral(g, Referral(11, "floor", (anchored("below", 0),), "single")).ok


def test_chain_through_another_object(room):
    g = build_scene_graph(room)
    # "the picture closest to the chair that is farthest from the table": chair 3, then picture 6
    far_chair = Anchor(3, Clause("farthest", (Anchor(0),)))
    assert check_referral(g, Referral(6, "picture", (Clause("closest", (far_chair,)),), "chain")).ok
    assert not check_referral(g, Referral(5, "picture", (Clause("closest", (far_chair,)),), "chain")).ok
    # 'the gray chair' does not single out a chair (chairs 1 and 3 are gray)
    gray_chair = Anchor(1, Clause("color", value="gray"))
    assert not check_referral(g, Referral(5, "picture", (Clause("closest", (gray_chair,)),), "chain")).ok
    # 'the chair closest to the desk' is chair 1, and the table is next to it
    near_desk = Anchor(1, Clause("closest", (Anchor(9),)))
    assert check_referral(g, Referral(0, "table", (Clause("next_to", (near_desk,)),), "chain")).ok


def test_room_type_guess():
    from collections import Counter
    assert guess_room_type(Counter({"toilet": 1, "sink": 1})) == "bathroom"
    assert guess_room_type(Counter({"bed": 1, "desk": 1})) == "bedroom"
    assert guess_room_type(Counter({"refrigerator": 1, "table": 1, "chair": 4})) == "kitchen"
    assert guess_room_type(Counter({"table": 1, "chair": 8})) == "conference room"
    assert guess_room_type(Counter({"lamp": 1})) == "room"


# ----------------------------------------------------------------------------------------- oracle

def _box(o):
    return o.center - o.size / 2, o.center + o.size / 2


def _in_fp(p, lo, hi):
    return lo[0] <= p[0] <= hi[0] and lo[1] <= p[1] <= hi[1]


def _in_hull(p, points):
    """p inside the convex hull of `points`: on the inner side of every supporting line."""
    for a, b in combinations(points, 2):
        if np.allclose(a, b):
            continue
        side = [(b[0] - a[0]) * (q[1] - a[1]) - (b[1] - a[1]) * (q[0] - a[0]) for q in points]
        if min(side) >= -1e-9 or max(side) <= 1e-9:  # a hull edge (all points on one side)
            s = (b[0] - a[0]) * (p[1] - a[1]) - (b[1] - a[1]) * (p[0] - a[0])
            inner = 1 if max(side) > 1e-9 else -1
            if s * inner < -1e-9:
                return False
    return True


def oracle_holds(boxes, colors, clause, cand, same_class) -> bool:
    """Truth of `clause` for object `cand` among `same_class`, from the definitions."""
    lo, hi = boxes[cand]
    c = (lo + hi) / 2
    name = clause.relation
    if name == "color":
        return colors[cand] == clause.value
    if name in ("largest", "smallest", "tallest", "shortest"):
        measure = (lambda i: float(np.prod(np.maximum(boxes[i][1] - boxes[i][0], 1e-3)))) if name in (
            "largest", "smallest") else (lambda i: float(boxes[i][1][2] - boxes[i][0][2]))
        others = [measure(i) for i in same_class if i != cand]
        v = measure(cand)
        if name == "largest":
            return all(v >= o * T.size_ratio for o in others)
        if name == "smallest":
            return all(v * T.size_ratio <= o for o in others)
        if name == "tallest":
            return all(v >= o + T.height_margin for o in others)
        return all(v + T.height_margin <= o for o in others)
    anchors = [a.object_id for a in clause.anchors]
    if cand in anchors:
        return False
    alo, ahi = boxes[anchors[0]]
    ac = (alo + ahi) / 2
    if name in ("closest", "farthest"):
        def dist(i):
            return float(np.linalg.norm((boxes[i][0] + boxes[i][1]) / 2 - ac))
        others = [dist(i) for i in same_class if i != cand]
        d = dist(cand)
        if name == "closest":
            return all(d + T.superlative_margin <= o for o in others)
        return all(d >= o + T.superlative_margin for o in others)
    if name == "next_to":
        gx = max(alo[0] - hi[0], lo[0] - ahi[0], 0.0)
        gy = max(alo[1] - hi[1], lo[1] - ahi[1], 0.0)
        return float(np.hypot(gx, gy)) <= T.next_to_gap and min(hi[2], ahi[2]) > max(lo[2], alo[2])
    if name in ("on", "supporting"):
        (ulo, uhi), (dlo, dhi) = ((lo, hi), (alo, ahi)) if name == "on" else ((alo, ahi), (lo, hi))
        area = lambda a, b: (b[0] - a[0]) * (b[1] - a[1])  # noqa: E731
        return (abs(ulo[2] - dhi[2]) <= T.support_gap and _in_fp((ulo + uhi) / 2, dlo, dhi)
                and area(dlo, dhi) > area(ulo, uhi) and uhi[2] > dhi[2])
    if name in ("above", "below"):
        (ulo, uhi), (dlo, dhi) = ((lo, hi), (alo, ahi)) if name == "above" else ((alo, ahi), (lo, hi))
        return ulo[2] >= dhi[2] + T.above_gap and (_in_fp((ulo + uhi) / 2, dlo, dhi) or _in_fp((dlo + dhi) / 2, ulo, uhi))
    if name == "between":
        blo, bhi = boxes[anchors[1]]
        corners = [(x, y) for (l, h) in ((alo, ahi), (blo, bhi)) for x in (l[0], h[0]) for y in (l[1], h[1])]
        level = min(hi[2], ahi[2]) > max(lo[2], alo[2]) or min(hi[2], bhi[2]) > max(lo[2], blo[2])
        return (_in_hull(c[:2], corners) and not _in_fp(c, alo, ahi) and not _in_fp(c, blo, bhi) and level)
    raise AssertionError(f"oracle does not know {name}")


def oracle_named(boxes, colors, labels, anchor, clause) -> bool:
    """Is the anchor singled out: unique class, the pair of a two-object class, or its own clause."""
    same = [i for i in labels if labels[i] == labels[anchor.object_id]]
    if anchor.clause is None:
        pair = {a.object_id for a in clause.anchors}
        return len(same) == 1 or (clause.relation == "between" and len(same) == 2 and set(same) == pair)
    sat = [i for i in same if oracle_holds(boxes, colors, anchor.clause, i, same)]
    return sat == [anchor.object_id] and all(oracle_named(boxes, colors, labels, a, anchor.clause)
                                             for a in anchor.clause.anchors)


@pytest.fixture(scope="module")
def generated():
    cfg = preset("demo")
    cfg.points_per_m2 = 60.0
    out = []
    for index in range(24):
        scene = generate_scene(cfg, index, with_language=False)
        out.append((scene, generate_language(scene, language_rng(7, scene.scene_id), cfg.language)))
    return out


def test_every_referral_is_satisfied_by_its_target_alone(generated):
    checked = 0
    for scene, lang in generated:
        boxes = {o.instance_id: _box(o) for o in scene.objects}
        labels = {o.instance_id: o.label for o in scene.objects}
        graph = build_scene_graph(scene)
        colors = {int(i): graph.colors[r] for r, i in enumerate(graph.ids)}
        texts = [t for t in lang.texts if t.kind == "referral"]
        assert len(texts) == len(lang.referrals)
        for text, ref in zip(texts, lang.referrals):
            same = [i for i in labels if labels[i] == ref.label]
            assert text.target_id == ref.target_id and labels[ref.target_id] == ref.label
            assert sorted(text.distractor_ids) == sorted(i for i in same if i != ref.target_id)
            assert len(text.distractor_ids) >= 1
            for clause in ref.clauses:
                assert oracle_holds(boxes, colors, clause, ref.target_id, same), (text.text, clause)
                for anchor in clause.anchors:
                    assert labels[anchor.object_id] != ref.label
                    assert oracle_named(boxes, colors, labels, anchor, clause), (text.text, anchor)
            for d in text.distractor_ids:
                assert not all(oracle_holds(boxes, colors, c, d, same) for c in ref.clauses), (text.text, d)
            assert any(n in text.text.lower() or plural(n) in text.text.lower() for n in NOUNS[ref.label]), text.text
            checked += 1
    assert checked > 100


def test_referrals_come_in_every_shape_and_double_needs_both(generated):
    shapes = {}
    for scene, lang in generated:
        for ref in lang.referrals:
            shapes[ref.shape] = shapes.get(ref.shape, 0) + 1
            if ref.shape == "chain":
                assert any(a.clause is not None and a.clause.anchors for c in ref.clauses for a in c.anchors)
            if ref.shape == "between":
                assert ref.clauses[0].relation == "between"
            if ref.shape == "double":
                assert len(ref.clauses) == 2
    assert set(shapes) == {"single", "double", "chain", "between"}, shapes
    assert all(n >= 10 for n in shapes.values()), shapes


def test_captions_for_every_object_and_scene(generated):
    for scene, lang in generated:
        captioned = {t.target_id for t in lang.texts if t.kind == "object_caption"}
        assert captioned == {o.instance_id for o in scene.objects}
        captions = [t for t in lang.texts if t.kind == "scene_caption"]
        assert len(captions) >= 1 and all(t.target_id == -1 for t in captions)
        for t in lang.texts:
            if t.kind == "object_caption":
                label = scene.object_by_id()[t.target_id].label
                assert any(n in t.text.lower() for n in NOUNS[label]), t.text


def test_texts_vary():
    scene = box_scene([("chair", (0, 0, 0), (0.5, 0.5, 0.9), GRAY), ("chair", (3, 0, 0), (3.5, 0.5, 0.9), GRAY),
                       ("table", (0.7, 0, 0), (1.7, 0.8, 0.75), BROWN)])
    graph = build_scene_graph(scene)
    ref = Referral(0, "chair", (anchored("closest", 2),), "single")
    assert check_referral(graph, ref).ok
    texts = {render_referral(graph, ref, np.random.default_rng(s)) for s in range(60)}
    assert len(texts) >= 15
    assert all("chair" in t.lower() and "table" in t.lower() for t in texts)


def test_scene_caption_names_room_and_counts():
    scene = box_scene([("toilet", (0, 0, 0), (0.4, 0.7, 0.8), WHITE), ("sink", (1, 0, 0), (1.5, 0.4, 0.9), WHITE),
                       ("bathtub", (2, 0, 0), (3.7, 0.8, 0.55), WHITE), ("cabinet", (0, 2, 0), (0.6, 2.5, 0.9), BROWN),
                       ("cabinet", (1, 2, 0), (1.6, 2.5, 0.9), BROWN)])
    lang = generate_language(scene, np.random.default_rng(0), LanguageConfig(scene_captions=3))
    captions = [t.text.lower() for t in lang.texts if t.kind == "scene_caption"]
    assert len(captions) == 3
    assert all("bathroom" in c for c in captions)
    assert all("two cabinets" in c or "two cupboards" in c for c in captions)


def test_annotate_scene_is_deterministic_and_keeps_texts(room):
    existing = SceneText("referral", "the chair by the table", 1, (2, 3))
    scene = Scene(room.scene_id, room.xyz, room.rgb, room.instance, room.semantic, room.objects, [existing])
    a, b = annotate_scene(scene, 5), annotate_scene(scene, 5)
    assert a.texts == b.texts and a.texts[0] == existing and len(a.texts) > 1
    assert annotate_scene(scene, 6).texts != a.texts
    assert existing not in annotate_scene(scene, 5, replace=True).texts
    assert scene.texts == [existing]


def test_unknown_labels_get_language_too():
    scene = box_scene([("kitchen_cabinet", (0, 0, 0), (0.6, 0.5, 0.9), BROWN),
                       ("kitchen_cabinet", (3, 0, 0), (3.6, 0.5, 0.9), BROWN),
                       ("lamp", (0.7, 0, 0), (1.0, 0.3, 1.5), WHITE)])
    lang = generate_language(scene, np.random.default_rng(1))
    refs = [t for t in lang.texts if t.kind == "referral"]
    assert refs and all("kitchen cabinet" in t.text.lower() for t in refs)


# ----------------------------------------------------------------------------------------- annotate CLI

def test_annotate_command_adds_texts_and_changes_nothing_else(tmp_path, room, capsys):
    plain = Scene("real_0001", room.xyz, room.rgb, room.instance, room.semantic, room.objects,
                  [SceneText("scene_caption", "a scanned room", -1)])
    other = box_scene([("chair", (0, 0, 0), (0.5, 0.5, 0.9), GRAY), ("chair", (2, 0, 0), (2.5, 0.5, 0.9), RED),
                       ("desk", (0.8, 0, 0), (1.8, 0.7, 0.75), BROWN)], scene_id="real_0002")
    vocab = list(SYNTH_VOCABULARY)
    write_scenes([plain, other], tmp_path, vocabulary=vocab, source="my-scans", compression="gzip", progress=False)
    index_before = (tmp_path / "index.json").read_text()
    before = [SceneStore(tmp_path)[i] for i in range(2)]

    assert cli_main(["annotate", str(tmp_path), "--seed", "3"]) == 0
    assert "annotated 2 scenes" in capsys.readouterr().out
    store = SceneStore(tmp_path, verify=True)
    after = [store[i] for i in range(2)]
    for b, a in zip(before, after):
        assert a.scene_id == b.scene_id and a.objects == b.objects
        for name in ("xyz", "rgb", "instance", "semantic"):
            got, want = getattr(a, name), getattr(b, name)
            assert got.dtype == want.dtype and got.tobytes() == want.tobytes()
        assert a.texts[:len(b.texts)] == b.texts
        kinds = {t.kind for t in a.texts[len(b.texts):]}
        assert {"object_caption", "scene_caption"} <= kinds
    assert any(t.kind == "referral" for t in after[1].texts)
    assert (tmp_path / "index.json").read_text() == index_before
    with h5py.File(tmp_path / "shard-00000.h5") as f:
        assert f.attrs["source"] == "my-scans" and f["points/xyz"].compression == "gzip"
        assert json.loads(f.attrs["label_vocabulary"]) == vocab
    assert not list(tmp_path.glob("*.tmp"))

    assert cli_main(["annotate", str(tmp_path / "shard-00000.h5"), "--seed", "3", "--replace"]) == 0
    replaced = SceneStore(tmp_path)[0]
    assert "a scanned room" not in [t.text for t in replaced.texts]
    assert replaced.texts == annotate_scene(plain, 3, replace=True).texts


def test_annotate_command_rejects_bad_settings(tmp_path, capsys):
    assert cli_main(["annotate", str(tmp_path), "--set", "shapes=[spiral]"]) == 2
    assert "spiral" in capsys.readouterr().err
    assert cli_main(["annotate", str(tmp_path / "missing")]) == 2


def test_phrasing_split_partitions_every_list_of_phrasings():
    from sparsegps.language import templates as T

    lists = [*T.NOUNS.values(), *T.REFERRAL_PHRASES.values(), *T.SUPERLATIVE_WORDS.values(), T.REFERRAL_FRAMES,
             T.PLURAL_FRAMES, ("that is ", "which is ", ""), (" and ", ", ")]
    for options in lists:
        seen, unseen = T.phrasing_split(options, "seen"), T.phrasing_split(options, "unseen")
        assert T.phrasing_split(options, "all") == options
        if len(options) < 2:
            assert seen == unseen == options
        else:
            assert set(seen) | set(unseen) == set(options) and not set(seen) & set(unseen) and seen and unseen
    assert T.phrasing_split(T.NOUNS["refrigerator"], "unseen") == ("fridge",)
    assert T.phrasing_split(T.REFERRAL_FRAMES, "unseen") == ("this is {np}.", "the target is {np}.", "point to {np}.")


def test_held_out_phrasings_never_reach_a_seen_store_and_make_the_unseen_one():
    """Rooms generated with `phrasings: seen` (training stores) never name a class by a held-out
    noun in any text nor frame a referral by a held-out frame; with `unseen`, referrals use only
    those (every class with several nouns is named by a held-out one)."""
    import re

    from sparsegps.language import templates as T

    held_nouns = {n: label for label, nouns in T.NOUNS.items() for n in T.phrasing_split(nouns, "unseen")
                  if len(nouns) > 1}
    held_frames = ("this is the ", "the target is ", "point to ", "among the ")
    word = {n: re.compile(rf"\b{re.escape(n)}(e?s)?\b") for n in held_nouns}
    texts = {}
    for split in ("seen", "unseen"):
        cfg = preset("demo")
        cfg.language.phrasings = split
        texts[split] = [t for i in range(25) for t in generate_scene(cfg, i).texts]
    seen_all = " | ".join(t.text.lower() for t in texts["seen"])
    assert [n for n in held_nouns if word[n].search(seen_all)] == []
    seen_referrals = [t.text.lower() for t in texts["seen"] if t.kind == "referral"]
    unseen_referrals = [t.text.lower() for t in texts["unseen"] if t.kind == "referral"]
    assert len(seen_referrals) > 100 and len(unseen_referrals) > 100
    assert not any(t.startswith(held_frames) for t in seen_referrals)
    assert all(t.startswith(held_frames) for t in unseen_referrals)
    named = [n for n in held_nouns if any(word[n].search(t) for t in unseen_referrals)]
    assert len(named) >= 6, named  # the held-out synonyms do occur in the unseen referrals
