"""Words for scene-graph facts: class nouns with synonyms, relation phrases, sentence frames.

Rendering only turns already-checked structures into text. Each relation has several phrasings
and every frame is drawn at random, so a model cannot learn a fixed string; the target's class
and every anchor's class are always named.
"""
from __future__ import annotations

from collections import Counter
from typing import Literal, Sequence

import numpy as np

from .checker import Anchor, Clause, Referral
from .scene_graph import STRUCTURAL_LABELS, SceneGraph

NOUNS: dict[str, tuple[str, ...]] = {
    "wall": ("wall",),
    "floor": ("floor",),
    "cabinet": ("cabinet", "cupboard"),
    "bed": ("bed",),
    "chair": ("chair",),
    "sofa": ("sofa", "couch"),
    "table": ("table",),
    "door": ("door",),
    "window": ("window",),
    "bookshelf": ("bookshelf", "bookcase", "shelf"),
    "picture": ("picture", "painting", "framed picture"),
    "counter": ("counter", "countertop"),
    "desk": ("desk",),
    "curtain": ("curtain", "drape"),
    "refrigerator": ("refrigerator", "fridge"),
    "shower curtain": ("shower curtain",),
    "toilet": ("toilet",),
    "sink": ("sink", "basin"),
    "bathtub": ("bathtub", "tub", "bath"),
    "otherfurniture": ("piece of furniture", "furniture item", "furnishing"),
}

# Typical full extents (w, d, h) in metres per class: the reference for "large" and "small".
TYPICAL_SIZE: dict[str, tuple[float, float, float]] = {
    "cabinet": (0.8, 0.5, 0.9), "bed": (1.4, 2.0, 0.9), "chair": (0.5, 0.5, 0.9), "sofa": (2.0, 0.9, 0.85),
    "table": (1.2, 0.8, 0.7), "door": (0.9, 0.05, 2.0), "window": (1.2, 0.1, 1.2), "bookshelf": (0.9, 0.35, 1.6),
    "picture": (0.6, 0.05, 0.5), "counter": (2.0, 0.6, 0.9), "desk": (1.3, 0.7, 0.75),
    "curtain": (0.7, 0.1, 1.8), "refrigerator": (0.75, 0.7, 1.8), "shower curtain": (1.3, 0.06, 1.6),
    "toilet": (0.4, 0.68, 0.78), "sink": (0.55, 0.45, 0.3), "bathtub": (1.6, 0.78, 0.55),
    "otherfurniture": (0.5, 0.5, 0.6),
}

REFERRAL_PHRASES: dict[str, tuple[str, ...]] = {
    "closest": ("closest to {a}", "nearest to {a}", "that is closest to {a}", "nearest {a}",
                "that is nearest to {a}"),
    "farthest": ("farthest from {a}", "furthest from {a}", "that is farthest from {a}", "most distant from {a}",
                 "that is furthest away from {a}"),
    "next_to": ("next to {a}", "beside {a}", "by {a}", "that is next to {a}", "adjacent to {a}",
                "right next to {a}", "alongside {a}"),
    "on": ("on {a}", "on top of {a}", "sitting on {a}", "resting on {a}", "that is on {a}", "placed on {a}",
           "supported by {a}"),
    "supporting": ("with {a} on it", "supporting {a}", "that {a} is on", "with {a} on top", "holding {a}",
                   "that {a} sits on"),
    "above": ("above {a}", "over {a}", "that is above {a}", "located above {a}", "higher up than {a}"),
    "below": ("below {a}", "under {a}", "beneath {a}", "underneath {a}", "that is below {a}"),
    "between": ("between {a} and {b}", "in between {a} and {b}", "that is between {a} and {b}",
                "located between {a} and {b}"),
    "color": ("that is {c}", "in {c}", "colored {c}"),
}
SUPERLATIVE_WORDS = {"largest": ("largest", "biggest"), "smallest": ("smallest", "tiniest"),
                     "tallest": ("tallest",), "shortest": ("shortest",)}
REFERRAL_FRAMES = ("{np}", "{np}.", "find {np}.", "select {np}.", "pick {np}.", "look for {np}.", "it is {np}.",
                   "this is {np}.", "the target is {np}.", "point to {np}.")
PLURAL_FRAMES = ("there are several {plural} in the room. choose the {adj}one {mods}.",
                 "of the {count} {plural}, pick the {adj}one {mods}.",
                 "among the {plural}, it is the {adj}one {mods}.")

CAPTION_PHRASES: dict[str, tuple[str, ...]] = {
    "on": ("on {a}", "sitting on {a}", "placed on {a}", "standing on {a}"),
    "supporting": ("with {a} on it", "with {a} on top", "holding {a}"),
    "above": ("above {a}", "over {a}", "hanging above {a}"),
    "below": ("below {a}", "under {a}", "beneath {a}"),
    "next_to": ("next to {a}", "beside {a}", "near {a}", "by {a}"),
    "near": ("near {a}", "close to {a}", "not far from {a}"),
    "wall": ("against the wall", "by the wall", "along the wall"),
    "room": ("in the room", "in the middle of the room"),
}
CAPTION_FRAMES = ("{A} {rel}.", "there is {a} {rel}.", "this is {a}. it is {rel}.", "{A}, {rel}.",
                  "{A} that is {rel}.", "you can see {a} {rel}.")
SIZE_WORDS = {"large": ("large", "big"), "small": ("small", "little")}

ROOM_INTROS = ("this is a {room}.", "a {room}.", "the scene shows a {room}.", "this looks like a {room}.",
               "this room is a {room}.")
ROOM_SIZES = ("it is about {w} by {d} meters.", "the room measures roughly {w} by {d} meters.",
              "it is roughly {w} m by {d} m.")
CONTENT_FRAMES = ("it has {items}.", "there are {items} in the room.", "in it you can see {items}.",
                  "the room contains {items}.", "it is furnished with {items}.")
RELATION_SENTENCES: dict[str, tuple[str, ...]] = {
    "on": ("{A} is on {b}.", "there is {a} on {b}.", "{A} sits on {b}."),
    "above": ("{A} is above {b}.", "{A} hangs above {b}.", "above {b} there is {a}."),
    "next_to": ("{A} is next to {b}.", "{A} stands beside {b}.", "next to {b} there is {a}."),
    "group": ("{N} {plural} are next to {b}.", "{N} {plural} stand beside {b}.", "{b} has {n} {plural} beside it."),
    "around": ("{N} {plural} stand around {b}.", "{b} is surrounded by {n} {plural}.",
               "there are {n} {plural} around {b}."),
}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven",
                "twelve")


# Which phrasings a text may use. all: every one. seen / unseen: the generalisation split: of every
# list of two or more phrasings of one thing (a class's nouns, a relation's phrases, the referral
# frames, superlatives, connectives) the last third, at least one, is held out of "seen" (what
# training stores use) and is all "unseen" (a test store of phrasings never trained on) draws from.
# Chosen once, by position, so the split is the same in every version that keeps the lists' order.
Phrasings = Literal["all", "seen", "unseen"]


def phrasing_split(options: Sequence, phrasings: Phrasings) -> Sequence:
    """The phrasings of `options` that the split `phrasings` draws from (see `Phrasings`)."""
    if phrasings == "all" or len(options) < 2:
        return options
    held = max(1, len(options) // 3)
    return options[:-held] if phrasings == "seen" else options[-held:]


def _pick(rng: np.random.Generator, options):
    return options[int(rng.integers(len(options)))]


def _phrase(rng: np.random.Generator, options, phrasings: Phrasings):
    """One phrasing of `options`, drawn within the split `phrasings`."""
    return _pick(rng, phrasing_split(options, phrasings))


def noun(label: str, rng: np.random.Generator, phrasings: Phrasings = "all") -> str:
    """A noun for class `label`: one of its synonyms, or the label itself for unknown classes."""
    return _phrase(rng, NOUNS.get(label, (label.replace("_", " "),)), phrasings)


def plural(word: str) -> str:
    """English plural of a noun phrase from `NOUNS` (and of most plain nouns)."""
    if word.startswith("piece of "):
        return "pieces of " + word[len("piece of "):]
    if word.endswith("shelf"):
        return word[:-1] + "ves"
    if word.endswith(("s", "sh", "ch", "x")):
        return word + "es"
    if word.endswith("y") and word[-2:-1] not in "aeiou":
        return word[:-1] + "ies"
    return word + "s"


def article(phrase: str) -> str:
    return f"an {phrase}" if phrase[:1].lower() in "aeiou" else f"a {phrase}"


def number_word(n: int) -> str:
    return NUMBER_WORDS[n] if 0 <= n < len(NUMBER_WORDS) else str(n)


def sentence(text: str, rng: np.random.Generator) -> str:
    """Capitalise the first letter of each sentence most of the time; annotators do not always."""
    if rng.random() < 0.8:
        parts = text.split(". ")
        text = ". ".join(p[:1].upper() + p[1:] for p in parts)
    return text


def join_list(items: list[str], rng: np.random.Generator) -> str:
    if len(items) <= 1:
        return "".join(items)
    last = _pick(rng, (" and ", ", and ")) if len(items) > 2 else " and "
    return ", ".join(items[:-1]) + last + items[-1]


# ----------------------------------------------------------------------------------------- referrals

def anchor_phrase(graph: SceneGraph, anchor: Anchor, rng: np.random.Generator, phrasings: Phrasings = "all") -> str:
    """Definite noun phrase for an anchor: its class, plus the clause that singles it out."""
    label = graph.label(anchor.object_id)
    name = noun(label, rng, phrasings)
    clause = anchor.clause
    if clause is None:
        return f"the {name}"
    if clause.relation == "color":
        return f"the {clause.value} {name}"
    if clause.relation in SUPERLATIVE_WORDS:
        return f"the {_phrase(rng, SUPERLATIVE_WORDS[clause.relation], phrasings)} {name}"
    return (f"the {name} {_phrase(rng, ('that is ', 'which is ', ''), phrasings)}"
            f"{_bare(clause_phrase(graph, clause, rng, phrasings))}")


def _bare(phrase: str) -> str:
    return phrase[len("that is "):] if phrase.startswith("that is ") else phrase


def clause_phrase(graph: SceneGraph, clause: Clause, rng: np.random.Generator, phrasings: Phrasings = "all") -> str:
    """Post-modifier for a relation clause, e.g. 'closest to the door', 'between the bed and the desk'."""
    if clause.relation == "between":
        a, b = clause.anchors
        if graph.label(a.object_id) == graph.label(b.object_id) and a.clause is None and b.clause is None:
            return f"between the two {plural(noun(graph.label(a.object_id), rng, phrasings))}"
        first, second = (a, b) if rng.random() < 0.5 else (b, a)
        return _phrase(rng, REFERRAL_PHRASES["between"], phrasings).format(
            a=anchor_phrase(graph, first, rng, phrasings), b=anchor_phrase(graph, second, rng, phrasings))
    if clause.relation == "color":
        return _phrase(rng, REFERRAL_PHRASES["color"], phrasings).format(c=clause.value)
    if clause.relation in SUPERLATIVE_WORDS:
        return f"that is the {_phrase(rng, SUPERLATIVE_WORDS[clause.relation], phrasings)} one"
    return _phrase(rng, REFERRAL_PHRASES[clause.relation], phrasings).format(
        a=anchor_phrase(graph, clause.anchors[0], rng, phrasings))


def render_referral(graph: SceneGraph, referral: Referral, rng: np.random.Generator,
                    phrasings: Phrasings = "all") -> str:
    """A referring expression for a checked referral, in the phrasings of split `phrasings`."""
    adjectives, modifiers = [], []
    for clause in referral.clauses:
        if clause.relation in SUPERLATIVE_WORDS and rng.random() < 0.8:
            adjectives.insert(0, _phrase(rng, SUPERLATIVE_WORDS[clause.relation], phrasings))
        elif clause.relation == "color" and rng.random() < 0.7:
            adjectives.append(clause.value)
        else:
            modifiers.append(clause_phrase(graph, clause, rng, phrasings))
    mods = modifiers[0] if len(modifiers) == 1 else _phrase(rng, (" and ", ", "), phrasings).join(modifiers)
    adj = "".join(a + " " for a in adjectives)
    name = noun(referral.label, rng, phrasings)
    count = len(graph.ids_of_label(referral.label))
    if mods and count > 1 and rng.random() < 0.2:
        text = _phrase(rng, PLURAL_FRAMES, phrasings).format(plural=plural(name), adj=adj, mods=mods,
                                                             count=number_word(count))
    else:
        np_ = f"the {adj}{name} {mods}".strip()
        text = _phrase(rng, REFERRAL_FRAMES, phrasings).format(np=np_)
    return sentence(text, rng)


# ----------------------------------------------------------------------------------------- captions

def size_word(graph: SceneGraph, object_id: int) -> str | None:
    """'large' or 'small' when the object's volume is far from its class's typical volume."""
    typical = TYPICAL_SIZE.get(graph.label(object_id))
    if typical is None:
        return None
    r = graph.row[object_id]
    volume = float(np.prod(np.maximum(graph.sizes[r], 0.05)))
    ratio = volume / float(np.prod(np.maximum(typical, 0.05)))
    if ratio > 1.8:
        return "large"
    if ratio < 0.5:
        return "small"
    return None


def _mention(graph: SceneGraph, object_id: int, rng: np.random.Generator, phrasings: Phrasings = "all") -> str:
    """'the X' for a class unique in the scene, 'a X' otherwise."""
    label = graph.label(object_id)
    name = noun(label, rng, phrasings)
    return f"the {name}" if len(graph.ids_of_label(label)) == 1 else article(name)


def caption_relation(graph: SceneGraph, object_id: int, rng: np.random.Generator) -> tuple[str, int | None]:
    """The most salient relation of an object for its caption: (relation, other object or None)."""
    r = graph.row[object_id]
    others = np.array([lab not in STRUCTURAL_LABELS for lab in graph.labels], dtype=bool)
    others[r] = False
    for names in (("on", "supporting", "above", "below"), ("next_to",)):
        options = [(name, int(graph.ids[c])) for name in names
                   for c in np.nonzero(graph.pairwise(name)[r] & others)[0]]
        if options and rng.random() < 0.85:
            return _pick(rng, options)
    if graph.near_wall(object_id) and rng.random() < 0.5:
        return "wall", None
    if others.any():
        d = np.where(others, graph.distances()[r], np.inf)
        return "near", int(graph.ids[int(d.argmin())])
    return "room", None


def render_object_caption(graph: SceneGraph, object_id: int, rng: np.random.Generator,
                          phrasings: Phrasings = "all") -> str:
    """A caption such as 'A large brown table next to the window.' (class nouns of split `phrasings`)."""
    r = graph.row[object_id]
    words = []
    size = size_word(graph, object_id)
    if size and rng.random() < 0.8:
        words.append(_pick(rng, SIZE_WORDS[size]))
    if graph.colors[r] and rng.random() < 0.85:
        words.append(graph.colors[r])
    words.append(noun(graph.labels[r], rng, phrasings))
    phrase = " ".join(words)
    relation, other = caption_relation(graph, object_id, rng)
    rel_text = _pick(rng, CAPTION_PHRASES[relation])
    if other is not None:
        rel_text = rel_text.format(a=_mention(graph, other, rng, phrasings))
    a = article(phrase)
    text = _pick(rng, CAPTION_FRAMES).format(A=a, a=a, rel=rel_text)
    return sentence(text, rng)


def _room_extent(graph: SceneGraph) -> tuple[float, float]:
    rows = [r for r, lab in enumerate(graph.labels) if lab in ("floor", "wall")] or list(range(len(graph)))
    span = graph.hi[rows].max(axis=0) - graph.lo[rows].min(axis=0)
    return float(span[0]), float(span[1])


def render_scene_caption(graph: SceneGraph, room_type: str, rng: np.random.Generator,
                         max_relations: int = 3, phrasings: Phrasings = "all") -> str:
    """A paragraph: room type guess, approximate size, object counts and a few salient relations
    (class nouns of split `phrasings`)."""
    parts = [_pick(rng, ROOM_INTROS).format(room=room_type)]
    if len(graph) and rng.random() < 0.6:
        w, d = _room_extent(graph)
        parts.append(_pick(rng, ROOM_SIZES).format(w=f"{w:.0f}" if w >= 2 else f"{w:.1f}",
                                                   d=f"{d:.0f}" if d >= 2 else f"{d:.1f}"))
    counts = graph.label_counts()
    if counts:
        items = []
        for label, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:8]:
            name = noun(label, rng, phrasings)
            items.append(article(name) if n == 1 else f"{number_word(n)} {plural(name)}")
        if len(counts) > 8:
            items.append("some other furniture")
        parts.append(_pick(rng, CONTENT_FRAMES).format(items=join_list(items, rng)))
    parts += _relation_sentences(graph, counts, rng, max_relations, phrasings)
    return " ".join(sentence(p, rng) for p in parts)


def _relation_sentences(graph: SceneGraph, counts: Counter, rng: np.random.Generator, limit: int,
                        phrasings: Phrasings = "all") -> list[str]:
    """Up to `limit` sentences about support, vertical and grouping relations among objects."""
    edges = graph.edges(("on", "above", "next_to"))
    rng.shuffle(edges)
    out, used = [], set()
    # groups: several objects of one class next to the same object ("four chairs around the table")
    groups = Counter((graph.label(s), o) for s, name, o in edges if name == "next_to")
    for (label, anchor), n in groups.items():
        if n >= 2 and len(out) < limit and graph.label(anchor) != label and anchor not in used:
            used.add(anchor)
            name = plural(noun(label, rng, phrasings))
            kind = "around" if graph.label(anchor) in ("table", "desk") else "group"
            out.append(_pick(rng, RELATION_SENTENCES[kind]).format(
                N=number_word(n), n=number_word(n), plural=name, b=_mention(graph, anchor, rng, phrasings)))
    for subject, name, obj in edges:
        if len(out) >= limit:
            break
        if subject in used or graph.label(subject) == graph.label(obj):
            continue
        used.add(subject)
        a = _mention(graph, subject, rng, phrasings)
        out.append(_pick(rng, RELATION_SENTENCES[name]).format(A=a, a=a, b=_mention(graph, obj, rng, phrasings)))
    return out


def class_words(label: str) -> list[str]:
    """Every word our templates may name class `label` by: its nouns (synonyms) and their plurals,
    and the label itself (for classes without nouns here, as real data names them)."""
    nouns = set(NOUNS.get(label, ())) | {label.replace("_", " ")}
    return sorted(nouns | {plural(n) for n in nouns})
