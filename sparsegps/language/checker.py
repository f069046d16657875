"""Structured referrals and the checker that accepts only unambiguous ones.

A referral is data, not text: a target, its class, and clauses (a relation plus the anchors it
relates to). Anchors are named either by a class that is unique in the scene, as one of the two
objects of a class that has exactly two ("between the two windows"), or by a clause of their own
(a chain: "the table that is closest to the door"). The checker evaluates every clause on the
boxes of the scene graph and accepts a referral only when its target is the one object of its
class that satisfies all clauses and every anchor is named uniquely. Templates never enter here.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import relations as rel
from .scene_graph import STRUCTURAL_LABELS, SceneGraph

REFERRAL_SHAPES = ("single", "double", "chain", "between")


@dataclass(frozen=True)
class Anchor:
    """An object a clause relates to; `clause` (if any) is how that object is picked out of its class."""

    object_id: int
    clause: "Clause | None" = None


@dataclass(frozen=True)
class Clause:
    """One relation of a referral: `relation` from `relations.ALL_RELATIONS`, its anchors (one for
    anchored relations, two for 'between', none for size superlatives and 'color') and, for
    'color', the colour name in `value`."""

    relation: str
    anchors: tuple[Anchor, ...] = ()
    value: str | None = None


@dataclass(frozen=True)
class Referral:
    """The object of class `label` with id `target_id` that satisfies all `clauses`."""

    target_id: int
    label: str
    clauses: tuple[Clause, ...]
    shape: str


@dataclass(frozen=True)
class CheckResult:
    ok: bool
    reason: str
    satisfying: tuple[int, ...]  # objects of the target's class that satisfy every clause


_ANCHOR_COUNT = {**{r: 1 for r in rel.ANCHORED}, **{r: 0 for r in rel.SIZE_SUPERLATIVES + rel.ATTRIBUTES},
                 "between": 2}


def clause_truth(graph: SceneGraph, clause: Clause, candidates: list[int]) -> np.ndarray:
    """[len(candidates)] truth of `clause` for each candidate; superlatives compare the candidates."""
    rows = [graph.row[c] for c in candidates]
    lo, hi = graph.lo[rows], graph.hi[rows]
    t = graph.thresholds
    name = clause.relation
    anchor_rows = [graph.row[a.object_id] for a in clause.anchors]
    not_anchor = np.array([c not in {a.object_id for a in clause.anchors} for c in candidates], dtype=bool)
    if name in rel.PAIRWISE:
        a = anchor_rows[0]
        return rel.pairwise(name, lo, hi, graph.lo[a:a + 1], graph.hi[a:a + 1], t)[:, 0] & not_anchor
    if name in rel.ANCHORED_SUPERLATIVES:
        a = anchor_rows[0]
        d = rel.center_distance(lo, hi, graph.lo[a:a + 1], graph.hi[a:a + 1])[:, 0]
        winner = rel.superlative_winner(d, largest=name == "farthest", margin=t.superlative_margin)
        return _one_hot(winner, len(candidates)) & not_anchor
    if name in ("largest", "smallest"):
        volumes = np.prod(np.maximum(hi - lo, 1e-3), axis=1)
        return _one_hot(rel.superlative_winner(volumes, largest=name == "largest", ratio=t.size_ratio),
                        len(candidates))
    if name in ("tallest", "shortest"):
        heights = hi[:, 2] - lo[:, 2]
        return _one_hot(rel.superlative_winner(heights, largest=name == "tallest", margin=t.height_margin),
                        len(candidates))
    if name == "between":
        a, b = anchor_rows
        return rel.between(lo, hi, (graph.lo[a], graph.hi[a]), (graph.lo[b], graph.hi[b])) & not_anchor
    if name == "color":
        return np.array([graph.colors[r] == clause.value for r in rows], dtype=bool)
    raise KeyError(f"unknown relation {name!r} (expected one of {rel.ALL_RELATIONS})")


def _one_hot(index: int | None, n: int) -> np.ndarray:
    out = np.zeros(n, dtype=bool)
    if index is not None:
        out[index] = True
    return out


def satisfying(graph: SceneGraph, label: str, clauses: tuple[Clause, ...]) -> tuple[int, ...]:
    """Ids of the objects of class `label` that satisfy every clause."""
    candidates = graph.ids_of_label(label)
    if not candidates:
        return ()
    truth = np.ones(len(candidates), dtype=bool)
    for clause in clauses:
        truth &= clause_truth(graph, clause, candidates)
    return tuple(c for c, ok in zip(candidates, truth) if ok)


def _anchor_problem(graph: SceneGraph, anchor: Anchor, clause: Clause) -> str | None:
    """Why `anchor` of `clause` is not named uniquely, or None when it is."""
    if anchor.object_id not in graph.row:
        return f"anchor {anchor.object_id} is not an object of the scene"
    label = graph.label(anchor.object_id)
    same_class = graph.ids_of_label(label)
    if anchor.clause is None:
        if len(same_class) == 1:
            return None
        named_together = {a.object_id for a in clause.anchors if graph.label(a.object_id) == label}
        if clause.relation == "between" and len(same_class) == 2 and named_together == set(same_class):
            return None
        return f"anchor {anchor.object_id} is one of {len(same_class)} objects of class {label!r}"
    problem = _clause_problem(graph, anchor.clause, own_label=label, own_id=anchor.object_id)
    if problem:
        return f"anchor {anchor.object_id}: {problem}"
    if satisfying(graph, label, (anchor.clause,)) != (anchor.object_id,):
        return f"anchor {anchor.object_id} is not the only {label!r} that is {anchor.clause.relation}"
    return None


def _clause_problem(graph: SceneGraph, clause: Clause, own_label: str, own_id: int) -> str | None:
    """Why `clause` about an object of `own_label` is malformed or names anchors ambiguously."""
    if clause.relation not in _ANCHOR_COUNT:
        return f"unknown relation {clause.relation!r}"
    if len(clause.anchors) != _ANCHOR_COUNT[clause.relation]:
        return f"{clause.relation} takes {_ANCHOR_COUNT[clause.relation]} anchor(s), got {len(clause.anchors)}"
    if clause.relation == "color" and not clause.value:
        return "color clause without a colour name"
    if len({a.object_id for a in clause.anchors}) != len(clause.anchors):
        return "the same anchor is named twice"
    for anchor in clause.anchors:
        if anchor.object_id == own_id:
            return "an object is its own anchor"
        if anchor.object_id in graph.row and graph.label(anchor.object_id) == own_label:
            return f"anchor {anchor.object_id} has the same class as the object it locates"
        problem = _anchor_problem(graph, anchor, clause)
        if problem:
            return problem
    return None


def check_referral(graph: SceneGraph, referral: Referral) -> CheckResult:
    """Evaluate `referral` on the scene geometry; ok only if it picks out its target alone."""
    def result(ok: bool, reason: str, sat: tuple[int, ...] = ()) -> CheckResult:
        return CheckResult(ok, reason, sat)

    if referral.target_id not in graph.row:
        return result(False, f"target {referral.target_id} is not an object of the scene")
    if graph.label(referral.target_id) != referral.label:
        return result(False, f"target {referral.target_id} has class {graph.label(referral.target_id)!r}, "
                             f"not {referral.label!r}")
    if referral.label in STRUCTURAL_LABELS:
        return result(False, f"{referral.label!r} is part of the room, not an object to refer to")
    if not referral.clauses:
        return result(False, "a referral needs at least one clause")
    for clause in referral.clauses:
        problem = _clause_problem(graph, clause, referral.label, referral.target_id)
        if problem:
            return result(False, problem)
    sat = satisfying(graph, referral.label, referral.clauses)
    if sat != (referral.target_id,):
        if referral.target_id not in sat:
            return result(False, "the target does not satisfy every clause", sat)
        return result(False, f"ambiguous: {len(sat)} objects of class {referral.label!r} satisfy it", sat)
    return result(True, "unique", sat)


def distractors(graph: SceneGraph, referral: Referral) -> tuple[int, ...]:
    """The other objects of the target's class: those the referral must tell it apart from."""
    return tuple(i for i in graph.ids_of_label(referral.label) if i != referral.target_id)
