"""Generate object captions, scene captions and checked referrals for any instance-labelled scene.

Referrals come in four shapes (`REFERRAL_SHAPES`):

    single    one relation to an anchor whose class is unique      "the chair closest to the door"
    double    two clauses, at least one anchored, each ambiguous   "the blue chair next to the desk"
              alone where possible
    chain     one relation to an anchor that is itself picked out  "the chair next to the table that
              by a relation                                        is closest to the window"
    between   between two anchors                                  "the chair between the bed and the desk"

Candidates are proposed from the scene graph's relation matrices and each is then evaluated by
the independent checker (`checker.check_referral`); only referrals whose target is the one
object of its class satisfying every clause are kept.
"""
from __future__ import annotations

import dataclasses
import hashlib
from collections import Counter
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from sparsegps.data.scene import NO_INSTANCE, Scene, SceneText

from . import relations as rel
from .checker import REFERRAL_SHAPES, Anchor, Clause, Referral, check_referral, distractors
from .scene_graph import STRUCTURAL_LABELS, SceneGraph, build_scene_graph, guess_room_type
from .templates import (Phrasings, _pick, article, noun, render_object_caption, render_referral,
                        render_scene_caption, sentence)


# The `SceneText.source` of every generated text.
TEXT_SOURCE = "generated"


@dataclass
class LanguageConfig:
    """What to generate per scene, and the geometry thresholds of the relations."""

    referrals_per_scene: int = 12
    scene_captions: int = 2
    object_captions_per_object: int = 1
    min_distractors: int = 1  # referral targets need this many same-class objects to tell apart
    shapes: list[str] = field(default_factory=lambda: list(REFERRAL_SHAPES))
    caption_relations: int = 3  # salient relations per scene caption
    # all: every phrasing; seen / unseen: the generalisation split of `templates.Phrasings` (training
    # stores "seen", a test store "unseen": referrals whose nouns, phrases and frames never occur
    # in training)
    phrasings: Phrasings = "all"
    relations: rel.RelationThresholds = field(default_factory=rel.RelationThresholds)

    def __post_init__(self):
        unknown = sorted(set(self.shapes) - set(REFERRAL_SHAPES))
        if unknown:
            raise ValueError(f"shapes: unknown referral shape(s) {unknown}; known: {list(REFERRAL_SHAPES)}")
        for name in ("referrals_per_scene", "scene_captions", "object_captions_per_object", "min_distractors"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")


@dataclass
class GeneratedLanguage:
    """Texts for one scene; `referrals[i]` is the checked structure of the i-th referral text."""

    texts: list[SceneText]
    referrals: list[Referral]
    rejected: int = 0  # proposals the checker refused

    def shape_counts(self) -> Counter:
        return Counter(r.shape for r in self.referrals)


def language_rng(seed: int, scene_id: str) -> np.random.Generator:
    """The generator for a scene's texts: a function of the seed and the scene id alone."""
    digest = hashlib.blake2b(scene_id.encode(), digest_size=16).digest()
    words = [int.from_bytes(digest[i:i + 4], "little") for i in range(0, 16, 4)]
    return np.random.default_rng(np.random.SeedSequence([int(seed), *words]))


# ----------------------------------------------------------------------------------------- proposals

@dataclass
class _Option:
    clause: Clause
    truth: np.ndarray  # over the members of the class being described
    anchored: bool


class _Proposer:
    """Enumerates clauses true of an object, with their truth over the object's class."""

    def __init__(self, graph: SceneGraph):
        self.graph = graph
        counts = graph.label_counts()
        self.movable = [int(i) for i, lab in zip(graph.ids, graph.labels) if lab not in STRUCTURAL_LABELS]
        self.unique = [i for i in self.movable if counts[graph.label(i)] == 1]
        self.counts = counts
        self._options: dict[str, list[_Option]] = {}
        self._anchored: dict[tuple[str, str, int], np.ndarray] = {}
        self._between: dict[str, list[_Option]] = {}

    def members(self, label: str) -> list[int]:
        return self.graph.ids_of_label(label)

    def anchored_truth(self, label: str, relation: str, anchor: int) -> np.ndarray:
        """Truth of `relation`(member, anchor) over the members of class `label` (cached)."""
        key = (label, relation, anchor)
        if key not in self._anchored:
            self._anchored[key] = self._anchored_truth(label, relation, anchor)
        return self._anchored[key]

    def _anchored_truth(self, label: str, relation: str, anchor: int) -> np.ndarray:
        g = self.graph
        rows = [g.row[m] for m in self.members(label)]
        a = g.row[anchor]
        if relation in rel.PAIRWISE:
            return g.pairwise(relation)[rows, a]
        d = g.distances()[rows, a]
        winner = rel.superlative_winner(d, largest=relation == "farthest", margin=g.thresholds.superlative_margin)
        out = np.zeros(len(rows), dtype=bool)
        if winner is not None:
            out[winner] = True
        return out

    def options(self, label: str) -> list[_Option]:
        """Clauses about objects of `label` naming only unique-class anchors, with their truth."""
        if label in self._options:
            return self._options[label]
        g = self.graph
        members = self.members(label)
        rows = [g.row[m] for m in members]
        out = []
        for anchor in self.unique:
            if g.label(anchor) == label:
                continue
            for relation in rel.ANCHORED:
                truth = self.anchored_truth(label, relation, anchor)
                if truth.any():
                    out.append(_Option(Clause(relation, (Anchor(anchor),)), truth, True))
        for color in sorted({g.colors[r] for r in rows if g.colors[r]}):
            truth = np.array([g.colors[r] == color for r in rows])
            out.append(_Option(Clause("color", value=color), truth, False))
        t = g.thresholds
        volumes, heights = g.volumes[rows], g.sizes[rows, 2]
        for name, values, largest, margin, ratio in (
                ("largest", volumes, True, 0.0, t.size_ratio), ("smallest", volumes, False, 0.0, t.size_ratio),
                ("tallest", heights, True, t.height_margin, 1.0), ("shortest", heights, False, t.height_margin, 1.0)):
            winner = rel.superlative_winner(values, largest, margin, ratio)
            if winner is not None and len(members) > 1:
                truth = np.zeros(len(members), dtype=bool)
                truth[winner] = True
                out.append(_Option(Clause(name), truth, False))
        self._options[label] = out
        return out

    def between_options(self, label: str) -> list[_Option]:
        """'between' clauses about objects of `label`, anchors named by class (cached)."""
        if label not in self._between:
            self._between[label] = self._between_options(label)
        return self._between[label]

    def _between_options(self, label: str) -> list[_Option]:
        g = self.graph
        rows = [g.row[m] for m in self.members(label)]
        pairs = [(a, b) for a, b in combinations(self.unique, 2) if label not in (g.label(a), g.label(b))]
        pairs += [tuple(self.members(other)) for other, n in self.counts.items() if n == 2 and other != label]
        out = []
        for a, b in pairs:
            ra, rb = g.row[a], g.row[b]
            truth = rel.between(g.lo[rows], g.hi[rows], (g.lo[ra], g.hi[ra]), (g.lo[rb], g.hi[rb]))
            if truth.any():
                out.append(_Option(Clause("between", (Anchor(a), Anchor(b))), truth, True))
        return out

    def propose(self, target: int, shape: str, rng: np.random.Generator) -> list[tuple[Clause, ...]]:
        """Every clause tuple of `shape` that the proposer believes picks out `target` alone."""
        g = self.graph
        label = g.label(target)
        k = self.members(label).index(target)

        def alone(truth):
            return truth[k] and truth.sum() == 1

        if shape == "single":
            return [(o.clause,) for o in self.options(label) if o.anchored and alone(o.truth)]
        if shape == "between":
            return [(o.clause,) for o in self.between_options(label) if alone(o.truth)]
        if shape == "double":
            true = [o for o in self.options(label) if o.truth[k]]
            strict, loose = [], []
            for a, b in combinations(true, 2):
                if not (a.anchored or b.anchored) or not alone(a.truth & b.truth):
                    continue
                if a.anchored and b.anchored and a.clause.anchors == b.clause.anchors:
                    continue
                ambiguous = (a.truth.sum() > 1) + (b.truth.sum() > 1)
                if ambiguous == 2:
                    strict.append((a.clause, b.clause))
                elif ambiguous == 1:
                    loose.append((a.clause, b.clause))
            return strict or loose
        if shape == "chain":
            out = []
            for anchor in self.movable:
                anchor_label = g.label(anchor)
                if anchor_label == label or self.counts[anchor_label] < 2:
                    continue
                a_index = self.members(anchor_label).index(anchor)
                naming = [o.clause for o in self.options(anchor_label)
                          if o.anchored and o.truth[a_index] and o.truth.sum() == 1]
                if not naming:
                    continue
                for relation in rel.ANCHORED:
                    if alone(self.anchored_truth(label, relation, anchor)):
                        sub = _pick(rng, naming)
                        out.append((Clause(relation, (Anchor(anchor, sub),)),))
            return out
        raise KeyError(f"unknown referral shape {shape!r}")


def generate_referrals(graph: SceneGraph, rng: np.random.Generator, cfg: LanguageConfig
                       ) -> tuple[list[Referral], int]:
    """Up to `cfg.referrals_per_scene` checked referrals, taking the configured shapes in turn and,
    within a shape, targets in random order (each at most twice), so referrals spread over the
    scene. Proposals are made only for the targets visited. Returns the referrals and the number
    of proposals the checker rejected."""
    proposer = _Proposer(graph)
    targets = [i for i in proposer.movable if proposer.counts[graph.label(i)] >= 1 + cfg.min_distractors]
    if not targets or not cfg.shapes or cfg.referrals_per_scene == 0:
        return [], 0
    queues = {}
    for shape in cfg.shapes:
        first, second = list(targets), list(targets)
        rng.shuffle(first)
        rng.shuffle(second)
        queues[shape] = second + first  # popped from the end: every target once before any twice
    proposals: dict[tuple[str, int], list[tuple[Clause, ...]]] = {}
    chosen: list[Referral] = []
    rejected = 0
    shape_order = list(cfg.shapes)
    rng.shuffle(shape_order)
    while len(chosen) < cfg.referrals_per_scene and any(queues.values()):
        for shape in shape_order:
            queue = queues[shape]
            while queue and len(chosen) < cfg.referrals_per_scene:
                target = queue.pop()
                if (shape, target) not in proposals:
                    options = proposer.propose(target, shape, rng)
                    rng.shuffle(options)
                    proposals[shape, target] = options
                if not proposals[shape, target]:
                    continue
                referral = Referral(target, graph.label(target), proposals[shape, target].pop(), shape)
                if check_referral(graph, referral).ok:
                    chosen.append(referral)
                    break
                rejected += 1
    return chosen, rejected


# ----------------------------------------------------------------------------------------- texts

STRUCTURE_CAPTIONS = ("{a_np}.", "the {noun} is {color}.", "{a_np} of the {room}.", "this is {a_np}.")


def _structure_caption(graph: SceneGraph, object_id: int, room: str, rng: np.random.Generator,
                       phrasings: Phrasings = "all") -> str:
    """Caption of a wall or floor: its colour and the room it bounds."""
    color = graph.colors[graph.row[object_id]] or "plain"
    name = noun(graph.label(object_id), rng, phrasings)
    text = _pick(rng, STRUCTURE_CAPTIONS).format(a_np=article(f"{color} {name}"), color=color, noun=name, room=room)
    return sentence(text, rng)


def referral_relation(referral: Referral) -> str:
    """The relations a referral's clauses use, joined by "+" in clause order ("closest",
    "color+next_to"); a chain's anchor is named by a clause of its own, which is not counted."""
    return "+".join(clause.relation for clause in referral.clauses)


def generate_language(scene: Scene, rng: np.random.Generator, cfg: LanguageConfig | None = None
                      ) -> GeneratedLanguage:
    """Object captions for every object, scene captions and checked referrals for `scene`."""
    cfg = cfg or LanguageConfig()
    graph = build_scene_graph(scene, cfg.relations)
    room = guess_room_type(graph.label_counts())
    texts: list[SceneText] = []
    for object_id in graph.ids.tolist():
        for _ in range(cfg.object_captions_per_object):
            if graph.is_structural(object_id):
                text = _structure_caption(graph, object_id, room, rng, cfg.phrasings)
            else:
                text = render_object_caption(graph, object_id, rng, cfg.phrasings)
            texts.append(SceneText("object_caption", text, object_id, source=TEXT_SOURCE))
    for _ in range(cfg.scene_captions):
        texts.append(SceneText("scene_caption", render_scene_caption(graph, room, rng, cfg.caption_relations,
                                                                     cfg.phrasings),
                               NO_INSTANCE, source=TEXT_SOURCE))
    referrals, rejected = generate_referrals(graph, rng, cfg)
    for referral in referrals:
        texts.append(SceneText("referral", render_referral(graph, referral, rng, cfg.phrasings), referral.target_id,
                               distractors(graph, referral), source=TEXT_SOURCE, shape=referral.shape,
                               relation=referral_relation(referral)))
    return GeneratedLanguage(texts, referrals, rejected)


def annotate_scene(scene: Scene, seed: int | np.random.Generator = 0, cfg: LanguageConfig | None = None,
                   replace: bool = False) -> Scene:
    """A new scene with generated texts added to (or, with `replace`, instead of) its texts.

    With an integer seed the texts depend only on the seed and the scene id. Points and objects
    are shared with `scene`, not copied.
    """
    rng = seed if isinstance(seed, np.random.Generator) else language_rng(seed, scene.scene_id)
    generated = generate_language(scene, rng, cfg)
    kept = [] if replace else list(scene.texts)
    return dataclasses.replace(scene, texts=kept + generated.texts)
