"""Spatial relations between axis-aligned object boxes, in the spirit of SceneVerse and Sr3D.

Every relation is a geometric predicate on boxes (z is up): it is evaluated on numbers, never on
words. Relations are view-independent (no left/right), so a referral holds whatever the viewpoint.

    closest / farthest   superlative over the target's class: centre distance to the anchor is
                         smaller (larger) than every other same-class object's by a margin
    next_to              footprints within `next_to_gap` horizontally and heights overlapping
    on / supporting      resting on the anchor's top (centre inside its larger footprint) / the
                         inverse
    above / below        clear of the anchor vertically with overlapping footprints / the inverse
    between              centre inside the convex hull of two anchors' footprints, outside both
    largest / smallest   volume beats every other same-class object by a ratio
    tallest / shortest   height beats every other same-class object by a margin
    color                the object's measured colour name
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Relations with one anchor, evaluated pairwise.
PAIRWISE = ("next_to", "on", "supporting", "above", "below")
# Relations with one anchor whose truth depends on the other same-class objects.
ANCHORED_SUPERLATIVES = ("closest", "farthest")
# Relations with no anchor whose truth depends on the other same-class objects.
SIZE_SUPERLATIVES = ("largest", "smallest", "tallest", "shortest")
TERNARY = ("between",)
ATTRIBUTES = ("color",)
ANCHORED = PAIRWISE + ANCHORED_SUPERLATIVES
ALL_RELATIONS = PAIRWISE + ANCHORED_SUPERLATIVES + SIZE_SUPERLATIVES + TERNARY + ATTRIBUTES


@dataclass
class RelationThresholds:
    """Distances (metres) and ratios that decide when a relation holds clearly enough to say."""

    next_to_gap: float = 0.35  # largest horizontal gap between footprints of neighbours
    support_gap: float = 0.06  # largest |bottom of upper - top of lower| for 'on'
    above_gap: float = 0.05  # smallest vertical clearance for 'above' / 'below'
    superlative_margin: float = 0.15  # closest/farthest must win by this distance
    size_ratio: float = 1.3  # largest/smallest must win by this volume ratio
    height_margin: float = 0.1  # tallest/shortest must win by this height


def _xy_inside(points: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """[N, M]: is the xy of point n inside the footprint of box m."""
    p = points[:, None, :2]
    return ((p >= lo[None, :, :2]) & (p <= hi[None, :, :2])).all(-1)


def footprint_gap(lo_a, hi_a, lo_b, hi_b) -> np.ndarray:
    """[N, M] horizontal distance between footprints (0 where they overlap)."""
    gap = np.maximum(lo_b[None, :, :2] - hi_a[:, None, :2], lo_a[:, None, :2] - hi_b[None, :, :2])
    return np.sqrt((np.maximum(gap, 0.0) ** 2).sum(-1))


def height_overlap(lo_a, hi_a, lo_b, hi_b) -> np.ndarray:
    """[N, M] length of the overlap of the z intervals (negative: a vertical gap)."""
    return np.minimum(hi_a[:, None, 2], hi_b[None, :, 2]) - np.maximum(lo_a[:, None, 2], lo_b[None, :, 2])


def center_distance(lo_a, hi_a, lo_b, hi_b) -> np.ndarray:
    """[N, M] Euclidean distance between box centres."""
    ca, cb = (lo_a + hi_a) / 2, (lo_b + hi_b) / 2
    return np.sqrt(((ca[:, None, :] - cb[None, :, :]) ** 2).sum(-1))


def footprint_area(lo, hi) -> np.ndarray:
    return np.prod(np.maximum(hi[:, :2] - lo[:, :2], 0.0), axis=-1)


def pairwise(name: str, lo_a, hi_a, lo_b, hi_b, t: RelationThresholds) -> np.ndarray:
    """[N, M] truth of relation `name`(a_n, b_m) for a pairwise relation (see `PAIRWISE`)."""
    if name == "next_to":
        return (footprint_gap(lo_a, hi_a, lo_b, hi_b) <= t.next_to_gap) & (height_overlap(lo_a, hi_a, lo_b, hi_b) > 0)
    if name == "on":
        resting = np.abs(lo_a[:, None, 2] - hi_b[None, :, 2]) <= t.support_gap
        centered = _xy_inside((lo_a + hi_a) / 2, lo_b, hi_b)
        larger = footprint_area(lo_b, hi_b)[None, :] > footprint_area(lo_a, hi_a)[:, None]
        return resting & centered & larger & (hi_a[:, None, 2] > hi_b[None, :, 2])
    if name == "supporting":
        return pairwise("on", lo_b, hi_b, lo_a, hi_a, t).T
    if name == "above":
        clear = lo_a[:, None, 2] >= hi_b[None, :, 2] + t.above_gap
        ca, cb = (lo_a + hi_a) / 2, (lo_b + hi_b) / 2
        overlapping = _xy_inside(ca, lo_b, hi_b) | _xy_inside(cb, lo_a, hi_a).T
        return clear & overlapping
    if name == "below":
        return pairwise("above", lo_b, hi_b, lo_a, hi_a, t).T
    raise KeyError(f"{name!r} is not a pairwise relation (expected one of {PAIRWISE})")


def superlative_winner(values: np.ndarray, largest: bool, margin: float = 0.0, ratio: float = 1.0) -> int | None:
    """Index of the value that beats every other by `margin` (additive) and `ratio`, or None.

    With a single value it wins trivially: a superlative over one object is that object.
    """
    values = np.asarray(values, dtype=np.float64)
    if len(values) == 1:
        return 0
    order = np.argsort(-values if largest else values, kind="stable")
    best, second = values[order[0]], values[order[1]]
    if largest:
        wins = best >= second + margin and best >= second * ratio
    else:
        wins = best + margin <= second and best * ratio <= second
    return int(order[0]) if wins else None


def convex_hull(points: np.ndarray) -> np.ndarray:
    """Counter-clockwise convex hull of 2D points (monotone chain), without repeated end point."""
    pts = sorted(set(map(tuple, np.asarray(points, dtype=np.float64).tolist())))
    if len(pts) <= 2:
        return np.array(pts).reshape(-1, 2)

    def cross(o, a, b):
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    lower, upper = [], []
    for p in pts:
        while len(lower) >= 2 and cross(lower[-2], lower[-1], p) <= 0:
            lower.pop()
        lower.append(p)
    for p in reversed(pts):
        while len(upper) >= 2 and cross(upper[-2], upper[-1], p) <= 0:
            upper.pop()
        upper.append(p)
    return np.array(lower[:-1] + upper[:-1])


def inside_convex(points: np.ndarray, hull: np.ndarray) -> np.ndarray:
    """[N]: is each 2D point inside (or on) the counter-clockwise convex polygon `hull`."""
    points = np.asarray(points, dtype=np.float64).reshape(-1, 2)
    if len(hull) < 3:
        return np.zeros(len(points), dtype=bool)
    a, b = hull, np.roll(hull, -1, axis=0)
    cross = ((b[None, :, 0] - a[None, :, 0]) * (points[:, None, 1] - a[None, :, 1])
             - (b[None, :, 1] - a[None, :, 1]) * (points[:, None, 0] - a[None, :, 0]))
    return (cross >= -1e-9).all(axis=1)


def footprint_corners(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """[4, 2] corners of one box's footprint."""
    return np.array([[lo[0], lo[1]], [hi[0], lo[1]], [hi[0], hi[1]], [lo[0], hi[1]]])


def between(lo, hi, anchor_a: tuple[np.ndarray, np.ndarray], anchor_b: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """[N]: is each box's centre inside the hull of the two anchor footprints, outside both, and
    at a height overlapping at least one anchor."""
    (la, ha), (lb, hb) = anchor_a, anchor_b
    hull = convex_hull(np.concatenate([footprint_corners(la, ha), footprint_corners(lb, hb)]))
    centers = (lo + hi) / 2
    inside = inside_convex(centers[:, :2], hull)
    anchors_lo, anchors_hi = np.stack([la, lb]), np.stack([ha, hb])
    in_anchor = _xy_inside(centers, anchors_lo, anchors_hi).any(axis=1)
    level = (height_overlap(lo, hi, anchors_lo, anchors_hi) > 0).any(axis=1)
    return inside & ~in_anchor & level
