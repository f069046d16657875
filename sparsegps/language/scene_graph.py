"""Scene graphs built from any instance-labelled scene: objects are nodes, relations are edges.

Nodes carry the axis-aligned box of each object (from `Scene.objects`, which pack and the
generator compute from points), its measured mean colour and colour name. Edges are the pairwise
relations of `relations.PAIRWISE` evaluated on those boxes.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from sparsegps.data.scene import Scene

from . import relations as rel
from .colors import color_names

# Labels that are part of the room rather than objects in it: never targets of a referral.
STRUCTURAL_LABELS = frozenset({"wall", "floor", "ceiling"})


@dataclass
class SceneGraph:
    """Objects of one scene as arrays (row i is object `ids[i]`) plus their pairwise relations."""

    scene_id: str
    ids: np.ndarray  # int64 [N]
    labels: list[str]
    lo: np.ndarray  # float64 [N, 3] box minimum
    hi: np.ndarray  # float64 [N, 3] box maximum
    colors: list[str | None]  # measured colour name (None: object without points)
    thresholds: rel.RelationThresholds
    row: dict[int, int] = field(default_factory=dict)
    _pairwise: dict[str, np.ndarray] = field(default_factory=dict, repr=False)
    _by_label: dict[str, list[int]] = field(default_factory=dict, repr=False)

    def __post_init__(self):
        self.row = {int(i): r for r, i in enumerate(self.ids)}

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def centers(self) -> np.ndarray:
        return (self.lo + self.hi) / 2

    @property
    def sizes(self) -> np.ndarray:
        return self.hi - self.lo

    @property
    def volumes(self) -> np.ndarray:
        return np.prod(np.maximum(self.sizes, 1e-3), axis=1)

    def label(self, object_id: int) -> str:
        return self.labels[self.row[object_id]]

    def is_structural(self, object_id: int) -> bool:
        return self.label(object_id) in STRUCTURAL_LABELS

    def ids_of_label(self, label: str) -> list[int]:
        """Ids of every object of class `label`, in graph order."""
        if not self._by_label:
            for i, lab in zip(self.ids.tolist(), self.labels):
                self._by_label.setdefault(lab, []).append(i)
        return list(self._by_label.get(label, ()))

    def label_counts(self) -> Counter:
        """Number of objects per class, structural labels excluded."""
        return Counter(lab for lab in self.labels if lab not in STRUCTURAL_LABELS)

    def pairwise(self, name: str) -> np.ndarray:
        """[N, N] truth of a pairwise relation between all objects (diagonal False), cached."""
        if name not in self._pairwise:
            m = rel.pairwise(name, self.lo, self.hi, self.lo, self.hi, self.thresholds)
            np.fill_diagonal(m, False)
            self._pairwise[name] = m
        return self._pairwise[name]

    def distances(self) -> np.ndarray:
        """[N, N] centre distances, cached."""
        if "distance" not in self._pairwise:
            self._pairwise["distance"] = rel.center_distance(self.lo, self.hi, self.lo, self.hi)
        return self._pairwise["distance"]

    def edges(self, names=rel.PAIRWISE) -> list[tuple[int, str, int]]:
        """Every (subject id, relation, object id) edge among non-structural objects."""
        out = []
        keep = np.array([lab not in STRUCTURAL_LABELS for lab in self.labels], dtype=bool)
        for name in names:
            m = self.pairwise(name) & keep[:, None] & keep[None, :]
            out += [(int(self.ids[a]), name, int(self.ids[b])) for a, b in zip(*np.nonzero(m))]
        return out

    def near_wall(self, object_id: int, gap: float = 0.15) -> bool:
        """Is the object's footprint within `gap` of a wall's box."""
        walls = [r for r, lab in enumerate(self.labels) if lab == "wall"]
        if not walls:
            return False
        r = self.row[object_id]
        g = rel.footprint_gap(self.lo[r:r + 1], self.hi[r:r + 1], self.lo[walls], self.hi[walls])
        return bool((g <= gap).any())


def build_scene_graph(scene: Scene, thresholds: rel.RelationThresholds | None = None) -> SceneGraph:
    """Scene graph of `scene`: boxes from its objects, mean colours from its points."""
    thresholds = thresholds or rel.RelationThresholds()
    objects = scene.objects
    ids = np.array([o.instance_id for o in objects], dtype=np.int64)
    centers = np.array([o.center for o in objects], dtype=np.float64).reshape(-1, 3)
    sizes = np.array([o.size for o in objects], dtype=np.float64).reshape(-1, 3)
    colors: list[str | None] = [None] * len(objects)
    if len(objects):
        instance = np.asarray(scene.instance, dtype=np.int64)
        valid = instance >= 0
        lookup = np.full(int(max(ids.max(), instance.max(initial=0))) + 1, -1, dtype=np.int64)
        lookup[ids] = np.arange(len(ids))
        rows = lookup[instance[valid]]
        known = rows >= 0
        rows = rows[known]
        rgb = np.asarray(scene.rgb, dtype=np.float64)[valid][known]
        counts = np.bincount(rows, minlength=len(ids))
        sums = np.stack([np.bincount(rows, weights=rgb[:, c], minlength=len(ids)) for c in range(3)], axis=1)
        has_points = counts > 0
        if has_points.any():
            names = color_names(sums[has_points] / counts[has_points, None])
            for r, name in zip(np.nonzero(has_points)[0], names):
                colors[r] = name
    return SceneGraph(scene.scene_id, ids, [o.label for o in objects], centers - sizes / 2, centers + sizes / 2,
                      colors, thresholds)


def guess_room_type(counts: Counter) -> str:
    """A room type guessed from class counts, strongest cue first (bathroom, bedroom, ...), or 'room'."""
    if counts["toilet"] or counts["bathtub"] or counts["shower curtain"]:
        return "bathroom"
    if counts["bed"]:
        return "bedroom"
    if counts["refrigerator"] or (counts["counter"] and counts["sink"]):
        return "kitchen"
    if counts["sofa"]:
        return "living room"
    if counts["table"] and counts["chair"] >= 6 and counts["desk"] == 0:
        return "conference room"
    if counts["desk"]:
        return "office"
    if counts["table"] and counts["chair"]:
        return "dining room"
    return "room"
