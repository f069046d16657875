"""Label maps: benchmark vocabularies and raw-category lookups checked against ScanNet's table."""
from __future__ import annotations

import json
from importlib import resources

import numpy as np
import pytest

from sparsegps.data.labels import (LABEL_MAPS, category_table, load_label_map, normalize_category, raw_categories,
                                   scanrefer_class)

SCANNET20 = ["wall", "floor", "cabinet", "bed", "chair", "sofa", "table", "door", "window", "bookshelf", "picture",
             "counter", "desk", "curtain", "refrigerator", "shower curtain", "toilet", "sink", "bathtub",
             "otherfurniture"]


def test_vocabularies():
    assert load_label_map("scannet20").names == SCANNET20
    assert load_label_map("synthetic").names == SCANNET20
    table = resources.files("sparsegps").joinpath("resources", "scannet", "benchmark_classes.json")
    benchmark = json.loads(table.read_text())
    s200 = load_label_map("scannet200")
    assert s200.names == benchmark["scannet200"]["names"] and len(s200) == 200 and s200.id_column == "id"
    nyu40 = load_label_map("nyu40")
    assert len(nyu40) == 40 and nyu40.ids == list(range(1, 41))
    assert nyu40.names[:5] == ["wall", "floor", "cabinet", "bed", "chair"] and nyu40.names[-1] == "otherprop"
    assert nyu40.names[23] == "refridgerator"  # the table's spelling, kept
    for name in LABEL_MAPS:  # every class name maps onto itself
        m = load_label_map(name)
        assert [m.index(n) for n in m.names] == list(range(len(m)))
    with pytest.raises(ValueError, match="scannet20"):
        load_label_map("scannet21")


# raw category -> (scannet20 class, scannet200 class, nyu40 index), read off scannetv2-labels.combined.tsv
@pytest.mark.parametrize("raw, s20, s200, nyu40", [
    ("office chair", "chair", "office chair", 4),          # id 10, nyu40id 5
    ("coffee table", "table", "coffee table", 6),          # id 24, nyu40id 7
    ("kitchen cabinets", "cabinet", "kitchen cabinet", 2),  # id 29 (shared with "kitchen cabinet"), nyu40id 3
    ("ceiling", None, "ceiling", 21),                      # nyu40id 22 is not a ScanNet20 class
    ("sofa", "sofa", None, 5),                             # id 1313 is not a ScanNet200 class
    ("refrigerator", "refrigerator", "refrigerator", 23),  # nyu40id 24, spelled "refridgerator" there
    ("otherfurniture", "otherfurniture", None, 38),        # a benchmark name, not a raw category
    ("no such thing", None, None, -1),
])
def test_raw_category_lookup(raw, s20, s200, nyu40):
    m20, m200 = load_label_map("scannet20"), load_label_map("scannet200")
    assert m20.index(raw) == (SCANNET20.index(s20) if s20 else -1)
    assert m200.index(raw) == (m200.names.index(s200) if s200 else -1)
    assert load_label_map("nyu40").index(raw) == nyu40


def test_names_are_normalized():
    m = load_label_map("scannet200")
    assert normalize_category("  Coffee_Table ") == "coffee table"
    assert m.index("coffee_table") == m.index("Coffee  Table") == m.names.index("coffee table")
    got = m.indices(["chair", "unknown", "wall"])
    assert got.dtype == np.int16 and got.tolist() == [m.names.index("chair"), -1, m.names.index("wall")]


def test_every_raw_category_follows_its_id_column():
    ids20 = load_label_map("scannet20").ids
    ids200 = load_label_map("scannet200").ids
    first = {}
    for row in category_table():
        first.setdefault(row["raw_category"], row)
    assert len(raw_categories()) == len(first) == 606  # 607 rows, "object" listed twice
    for raw, row in first.items():
        nyu, sid = int(row["nyu40id"]), int(row["id"])
        assert load_label_map("scannet20").index(raw) == (ids20.index(nyu) if nyu in ids20 else -1), raw
        assert load_label_map("scannet200").index(raw) == (ids200.index(sid) if sid in ids200 else -1), raw


def test_scanrefer_classes():
    assert scanrefer_class("office chair") == "chair"
    assert scanrefer_class("coffee_table") == "table"
    assert scanrefer_class("kitchen cabinets") == "cabinet"
    assert scanrefer_class("wall") == scanrefer_class("otherfurniture") == scanrefer_class("nonsense") == "others"
    assert scanrefer_class("refrigerator") == "others"  # as in ScanRefer: the table spells it "refridgerator"
