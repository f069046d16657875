"""Label maps: from a raw class name (ScanNet's 607 raw categories, SceneVerse's names) to a
benchmark class index.

A `LabelMap` has an ordered list of class `names` (the vocabulary a store's `Scene.semantic`
indexes) and maps raw category names onto it. The maps are built from ScanNet v2's
`scannetv2-labels.combined.tsv` and the benchmark class lists in `benchmark_classes.json`
(package data under `sparsegps/resources/scannet/`):

- ``scannet20``: the 20 ScanNet benchmark classes; a raw category maps through the table's
  `nyu40id` column.
- ``scannet200``: the 200 ScanNet200 benchmark classes; a raw category maps through the table's
  `id` column.
- ``nyu40``: the 40 NYU classes in `nyu40id` order (names as the table spells them, including
  "refridgerator").
- ``synthetic``: the vocabulary of the synthetic generator, the scannet20 names in the same order.

Index -1 means ignore: the name is unknown or its class is not part of the benchmark.
"""
from __future__ import annotations

import csv
import functools
import io
import json
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import Iterable

import numpy as np

from .scene import IGNORE_LABEL

LABEL_MAPS = ("scannet20", "scannet200", "nyu40", "synthetic")

# ScanRefer's 18 classes for its unique/multiple split (ScanRefer lib/dataset.py, SceneVerse
# LabelConverter): the ScanNet20 classes without wall, floor and otherfurniture, plus "others".
SCANREFER_CLASSES = ("cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture",
                     "counter", "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink", "bathtub",
                     "others")

_SPACES = re.compile(r"[\s_]+")


def normalize_category(name: str) -> str:
    """The lookup form of a class name: lower case, underscores as spaces, single spaces.

    ScanRefer writes "coffee_table" where the ScanNet table and ReferIt3D write "coffee table".
    """
    return _SPACES.sub(" ", str(name)).strip().lower()


def _resource_text(name: str) -> str:
    return resources.files("sparsegps").joinpath("resources", "scannet", name).read_text(encoding="utf-8")


@functools.lru_cache(maxsize=None)
def category_table() -> tuple[dict[str, str], ...]:
    """The rows of ScanNet v2's `scannetv2-labels.combined.tsv`, in file order, as dicts keyed by
    the header (`id`, `raw_category`, `category`, `nyu40id`, `nyu40class`, ...)."""
    rows = csv.DictReader(io.StringIO(_resource_text("scannetv2-labels.combined.tsv")), delimiter="\t")
    return tuple(dict(r) for r in rows)


def _first_by(column: str) -> dict[str, dict[str, str]]:
    """Rows keyed by a normalized column value; the first row wins where a value repeats
    ("object" is listed twice)."""
    out: dict[str, dict[str, str]] = {}
    for row in category_table():
        out.setdefault(normalize_category(row[column]), row)
    return out


@functools.lru_cache(maxsize=None)
def raw_categories() -> tuple[str, ...]:
    """ScanNet's raw category names (the "ScanNet-607" vocabulary SceneVerse labels objects with),
    without repeats, in table order."""
    return tuple(dict.fromkeys(r["raw_category"] for r in category_table()))


@dataclass
class LabelMap:
    """An ordered class vocabulary and the lookup from raw category names into it.

    `index(raw)` looks a name up, after `normalize_category`, as (1) a ScanNet raw category,
    (2) one of this map's own class names, (3) a ScanNet `category` (the table's cleaned-up name);
    it returns -1 when none matches or the class is outside the benchmark.
    """

    name: str
    names: list[str]
    ids: list[int]  # the benchmark id of each class (value of `id_column`)
    id_column: str  # the table column the ids come from: "nyu40id" or "id"
    raw_to_index: dict[str, int] = field(default_factory=dict, repr=False)

    def __len__(self) -> int:
        return len(self.names)

    def index(self, raw_category: str) -> int:
        """Class index of a raw category name, or -1 (ignore)."""
        return self.raw_to_index.get(normalize_category(raw_category), IGNORE_LABEL)

    def indices(self, raw_categories: Iterable[str]) -> np.ndarray:
        """`index` of each name, as int16 (the dtype of `Scene.semantic`)."""
        return np.array([self.index(c) for c in raw_categories], dtype=np.int16).reshape(-1)


def _build(name: str, names: list[str], ids: list[int], id_column: str) -> LabelMap:
    position = {benchmark_id: i for i, benchmark_id in enumerate(ids)}

    def class_of(row: dict[str, str]) -> int:
        value = row[id_column].strip()
        return position.get(int(value), IGNORE_LABEL) if value else IGNORE_LABEL

    lookup = {key: class_of(row) for key, row in _first_by("raw_category").items()}
    for i, class_name in enumerate(names):
        lookup.setdefault(normalize_category(class_name), i)
    for key, row in _first_by("category").items():
        lookup.setdefault(key, class_of(row))
    return LabelMap(name=name, names=list(names), ids=list(ids), id_column=id_column, raw_to_index=lookup)


@functools.lru_cache(maxsize=None)
def _load(name: str) -> LabelMap:
    if name == "nyu40":
        by_id: dict[int, str] = {}
        for row in category_table():
            if row["nyu40id"].strip():
                by_id.setdefault(int(row["nyu40id"]), row["nyu40class"])
        ids = list(range(1, 41))
        missing = [i for i in ids if i not in by_id]
        if missing:
            raise ValueError(f"scannetv2-labels.combined.tsv lacks nyu40 ids {missing}")
        return _build("nyu40", [by_id[i] for i in ids], ids, "nyu40id")
    benchmarks = json.loads(_resource_text("benchmark_classes.json"))
    spec = benchmarks["scannet20" if name == "synthetic" else name]
    return _build(name, spec["names"], spec["ids"], spec["id_column"])


def load_label_map(name: str) -> LabelMap:
    """The label map called `name` (one of `LABEL_MAPS`). Maps are built once per process and
    shared: treat them as read-only."""
    if name not in LABEL_MAPS:
        raise ValueError(f"unknown label map {name!r}; expected one of {', '.join(LABEL_MAPS)}")
    return _load(name)


@functools.lru_cache(maxsize=None)
def _scanrefer_lookup() -> dict[str, str]:
    wanted = set(SCANREFER_CLASSES)
    return {key: (row["nyu40class"] if row["nyu40class"] in wanted else "others")
            for key, row in _first_by("raw_category").items()}


def scanrefer_class(raw_category: str) -> str:
    """ScanRefer's class of a raw category: the table's `nyu40class` when it is one of
    `SCANREFER_CLASSES`, else "others" (also for unknown names).

    As in ScanRefer, the table's spelling "refridgerator" does not match, so refrigerators count
    as "others".
    """
    return _scanrefer_lookup().get(normalize_category(raw_category), "others")
