"""Grounding metrics as the literature reports them.

ReferIt3D (Nr3D, Sr3D): accuracy of picking the target among the scene's objects, overall and
split into easy / hard (hard when the scene holds more than two objects of the target's class,
i.e. at least two same-class distractors) and view-dependent / view-independent (the utterance
uses one of ReferIt3D's words `VIEW_DEPENDENT_WORDS`).

ScanRefer: Acc@k, the share of descriptions whose predicted box overlaps the target's box with
IoU >= k (k = 0.25, 0.5; axis-aligned boxes), overall and split into unique / multiple (unique
when no other object of the target's class is in the scene). With ground-truth boxes the
predicted box is the chosen object's box; with detector proposals it is the chosen proposal's box
(`load_proposal_boxes`).

Both take plain records (dicts), so they work the same on model outputs and on hand-built cases:

    evaluate_referit3d([{"target_id": 3, "predicted_id": 3, "num_distractors": 2,
                         "utterance": "the chair on the left"}, ...])
    evaluate_scanrefer([{"target_box": [cx, cy, cz, sx, sy, sz], "predicted_box": [...],
                         "num_distractors": 0}, ...])

Reports are dicts of fractions and counts; `format_table` renders one as markdown and
`save_report` writes both.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

# ReferIt3D analysis/utterances.py: an utterance that uses one of these words depends on the viewpoint.
VIEW_DEPENDENT_WORDS = frozenset({"front", "behind", "back", "right", "left", "facing", "leftmost", "rightmost",
                                  "looking", "across"})
SCANREFER_THRESHOLDS = (0.25, 0.5)
REFERIT3D_SPLITS = ("overall", "easy", "hard", "view_dependent", "view_independent")
SCANREFER_SPLITS = ("unique", "multiple", "overall")
_WORD = re.compile(r"[a-z]+")


def tokenize(utterance: str) -> list[str]:
    """Lower-case words of an utterance. Punctuation and hyphens separate words, as in ReferIt3D's
    preprocessing ("left." and "left-most" both contain "left")."""
    return _WORD.findall(utterance.lower())


def is_view_dependent(utterance: str | Sequence[str]) -> bool:
    """True when the utterance (a string, or its tokens) uses a view-dependent word."""
    tokens = tokenize(utterance) if isinstance(utterance, str) else utterance
    return not VIEW_DEPENDENT_WORDS.isdisjoint(tokens)


def is_hard(num_distractors: int) -> bool:
    """ReferIt3D's hard referral: more than two objects of the target's class (target included)."""
    return num_distractors + 1 > 2


def box_iou(boxes_a, boxes_b) -> np.ndarray:
    """IoU of axis-aligned boxes given as [..., 6] = (center xyz, full size xyz); broadcasts.

    Boxes with no volume have IoU 0 with everything.
    """
    a = np.asarray(boxes_a, dtype=np.float64)
    b = np.asarray(boxes_b, dtype=np.float64)
    if a.shape[-1] != 6 or b.shape[-1] != 6:
        raise ValueError(f"boxes must have 6 values (center, size), got shapes {a.shape} and {b.shape}")
    if (a[..., 3:] < 0).any() or (b[..., 3:] < 0).any():
        raise ValueError("box sizes must not be negative")
    lo_a, hi_a = a[..., :3] - a[..., 3:] / 2, a[..., :3] + a[..., 3:] / 2
    lo_b, hi_b = b[..., :3] - b[..., 3:] / 2, b[..., :3] + b[..., 3:] / 2
    overlap = np.clip(np.minimum(hi_a, hi_b) - np.maximum(lo_a, lo_b), 0, None).prod(axis=-1)
    union = a[..., 3:].prod(axis=-1) + b[..., 3:].prod(axis=-1) - overlap
    return np.divide(overlap, union, out=np.zeros_like(overlap), where=union > 0)


def box_from_corners(corners) -> np.ndarray:
    """(center, size) box enclosing points such as the 8 corners of a box: [..., K, 3] -> [..., 6]."""
    corners = np.asarray(corners, dtype=np.float64)
    lo, hi = corners.min(axis=-2), corners.max(axis=-2)
    return np.concatenate([(lo + hi) / 2, hi - lo], axis=-1)


def _split_entry(hits: np.ndarray, mask: np.ndarray) -> dict:
    total = int(mask.sum())
    correct = int(hits[mask].sum())
    return {"accuracy": correct / total if total else None, "correct": correct, "total": total}


def _require(record: Mapping, key: str, index: int):
    if key not in record:
        raise KeyError(f"record {index} has no {key!r} (has {sorted(record)})")
    return record[key]


def evaluate_referit3d(records: Iterable[Mapping]) -> dict:
    """Nr3D / Sr3D accuracy, overall and per split.

    Each record holds `target_id`, `predicted_id`, `num_distractors` (same-class objects besides the
    target) and `utterance` (or its `tokens`). Returns {"benchmark": "referit3d", "splits": {split:
    {"accuracy", "correct", "total"}}} with accuracy a fraction (None for an empty split).
    """
    records = list(records)
    hits, hard, view = [], [], []
    for i, r in enumerate(records):
        hits.append(int(_require(r, "predicted_id", i)) == int(_require(r, "target_id", i)))
        hard.append(is_hard(int(_require(r, "num_distractors", i))))
        view.append(is_view_dependent(r["tokens"] if "tokens" in r else _require(r, "utterance", i)))
    hits, hard, view = (np.array(x, dtype=bool) for x in (hits, hard, view))
    masks = {"overall": np.ones(len(records), dtype=bool), "easy": ~hard, "hard": hard, "view_dependent": view,
             "view_independent": ~view}
    return {"benchmark": "referit3d", "splits": {name: _split_entry(hits, masks[name]) for name in REFERIT3D_SPLITS}}


def evaluate_scanrefer(records: Iterable[Mapping], thresholds: Sequence[float] = SCANREFER_THRESHOLDS,
                       box_source: str = "ground_truth") -> dict:
    """ScanRefer Acc@k, overall and unique / multiple.

    Each record holds `target_box` and `predicted_box` ([6] center + size; `predicted_box` may be
    None for no prediction, IoU 0) and `num_distractors` (unique when 0). `box_source` says where
    the predicted boxes came from ("ground_truth" or a proposal file) and is kept in the report.
    Returns {"benchmark": "scanrefer", "thresholds", "box_source", "splits": {split: {"acc@k",
    "correct@k", "total", "mean_iou"}}}.
    """
    records = list(records)
    ious, unique = [], []
    for i, r in enumerate(records):
        predicted = _require(r, "predicted_box", i)
        target = _require(r, "target_box", i)
        ious.append(0.0 if predicted is None else float(box_iou(predicted, target)))
        unique.append(int(_require(r, "num_distractors", i)) == 0)
    ious, unique = np.array(ious, dtype=np.float64), np.array(unique, dtype=bool)
    masks = {"unique": unique, "multiple": ~unique, "overall": np.ones(len(records), dtype=bool)}
    splits = {}
    for name in SCANREFER_SPLITS:
        mask = masks[name]
        entry = {"total": int(mask.sum()), "mean_iou": float(ious[mask].mean()) if mask.any() else None}
        for k in thresholds:
            hits = ious >= k
            split = _split_entry(hits, mask)
            entry[f"acc@{k:g}"] = split["accuracy"]
            entry[f"correct@{k:g}"] = split["correct"]
        splits[name] = entry
    return {"benchmark": "scanrefer", "thresholds": [float(k) for k in thresholds], "box_source": box_source,
            "splits": splits}


def load_proposal_boxes(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Detector proposals per scan: {scan id: float [P, 6] (center, size)}.

    Reads JSON `{scan_id: [[cx, cy, cz, sx, sy, sz], ...]}` or `.npz` with one [P, 6] array per
    scan id (no pickles). A proposal's index is what a grounding model predicts.
    """
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            boxes = {key: np.asarray(data[key], dtype=np.float64) for key in data.files}
    else:
        boxes = {key: np.asarray(value, dtype=np.float64)
                 for key, value in json.loads(path.read_text(encoding="utf-8")).items()}
    for scan_id, b in boxes.items():
        if b.size == 0:
            boxes[scan_id] = b = b.reshape(0, 6)
        if b.ndim != 2 or b.shape[1] != 6 or not np.isfinite(b).all() or (b[:, 3:] < 0).any():
            raise ValueError(f"{path}: scan {scan_id!r}: proposals must be finite [P, 6] boxes (center, size >= 0), "
                             f"got shape {list(b.shape)}")
    return boxes


def referral_record(scene, text_index: int, predicted_id: int, proposals: np.ndarray | None = None) -> dict:
    """The record of one stored referral and a model's choice, for either benchmark.

    Everything comes from the store: the target's box, the distractor count (easy/hard,
    unique/multiple) and the utterance (view dependence). `predicted_id` is an instance id of the
    scene, or with `proposals` ([P, 6] boxes of this scan) a proposal index; an id with no box gives
    `predicted_box` None.
    """
    text = scene.texts[text_index]
    if text.kind != "referral":
        raise ValueError(f"scene {scene.scene_id!r}: text {text_index} is a {text.kind}, not a referral")
    objects = scene.object_by_id()
    target = objects[text.target_id]
    if proposals is not None:
        predicted_box = proposals[predicted_id] if 0 <= predicted_id < len(proposals) else None
    else:
        chosen = objects.get(predicted_id)
        predicted_box = None if chosen is None else np.concatenate([chosen.center, chosen.size])
    return {"scan_id": scene.scene_id, "target_id": text.target_id, "predicted_id": int(predicted_id),
            "num_distractors": len(text.distractor_ids), "utterance": text.text,
            "target_box": np.concatenate([target.center, target.size]), "predicted_box": predicted_box,
            "source": text.source, "item_id": text.item_id, "shape": text.shape}


# ------------------------------------------------------------------------------------ submissions

SUBMISSION_FILES = {"scanrefer": "scanrefer_submission.json", "nr3d": "nr3d_predictions.csv",
                    "sr3d": "sr3d_predictions.csv"}
REFERIT3D_COLUMNS = ("item_id", "scan_id", "target_id", "predicted_id", "correct")


def box_corners(box) -> list[list[float]]:
    """The 8 corners of an axis-aligned [cx, cy, cz, sx, sy, sz] box (ScanRefer's `bbox`), with the
    sign pattern of ScanRefer's `get_3d_box`; its server scores the box by its min/max corners."""
    c, half = np.asarray(box[:3], np.float64), np.asarray(box[3:6], np.float64) / 2
    signs = [(1, 1, 1), (1, 1, -1), (-1, 1, -1), (-1, 1, 1), (1, -1, 1), (1, -1, -1), (-1, -1, -1), (-1, -1, 1)]
    return [[float(v) for v in c + half * np.array(sign)] for sign in signs]


def submission_rows(records: Sequence[Mapping], benchmark: str) -> list[dict]:
    """The rows of `benchmark`'s submission file, one per record, in record order.

    ScanRefer: `scene_id`, `object_id` (the described object, a string), `ann_id` (the
    description's id), `bbox` (8 corners of the predicted box; empty when the choice has no box)
    and `unique_multiple` (0 unique, 1 multiple), as ScanRefer's benchmark server reads them.
    Nr3D / Sr3D: `item_id` (the CSV row, `nr3d_000123`), `scan_id`, `target_id`, `predicted_id`,
    `correct`. Raises ValueError when a record has no item id (shards packed before texts kept
    them: re-pack, or `sparsegps pack --upgrade` does not invent them)."""
    missing = [i for i, r in enumerate(records) if not r.get("item_id")]
    if missing:
        r = records[missing[0]]
        raise ValueError(f"{len(missing)} referrals have no item id (first: scan {r['scan_id']!r}, "
                         f"target {r['target_id']}); re-pack the split with this sparsegps to record them")
    if benchmark == "scanrefer":
        return [{"scene_id": r["scan_id"], "object_id": str(r["target_id"]), "ann_id": str(r["item_id"]),
                 "bbox": [] if r["predicted_box"] is None else box_corners(r["predicted_box"]),
                 "unique_multiple": int(r["num_distractors"] > 0)} for r in records]
    if benchmark in ("nr3d", "sr3d"):
        return [{"item_id": r["item_id"], "scan_id": r["scan_id"], "target_id": int(r["target_id"]),
                 "predicted_id": int(r["predicted_id"]), "correct": int(r["predicted_id"] == r["target_id"])}
                for r in records]
    raise ValueError(f"no submission format for benchmark {benchmark!r}")


def write_submission(records: Sequence[Mapping], benchmark: str, out_dir: str | os.PathLike) -> Path:
    """Write `benchmark`'s submission file into `out_dir` (atomically); returns its path.
    ScanRefer: a JSON list; Nr3D / Sr3D: a CSV with a header row."""
    import csv
    import io

    from sparsegps.files import atomic_write_text

    rows = submission_rows(records, benchmark)
    path = Path(out_dir) / SUBMISSION_FILES[benchmark]
    if benchmark == "scanrefer":
        atomic_write_text(path, json.dumps(rows))
    else:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=REFERIT3D_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, buffer.getvalue())
    return path


def _percent(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def format_table(report: Mapping) -> str:
    """A markdown table of a report from `evaluate_referit3d` or `evaluate_scanrefer`."""
    splits = report["splits"]
    if report["benchmark"] == "referit3d":
        titles = {"overall": "Overall", "easy": "Easy", "hard": "Hard", "view_dependent": "View-dep.",
                  "view_independent": "View-indep."}
        rows = [["Accuracy (%)"] + [_percent(splits[s]["accuracy"]) for s in REFERIT3D_SPLITS],
                ["Referrals"] + [str(splits[s]["total"]) for s in REFERIT3D_SPLITS]]
        header = [""] + [titles[s] for s in REFERIT3D_SPLITS]
    elif report["benchmark"] == "scanrefer":
        header = [""] + [s.capitalize() for s in SCANREFER_SPLITS]
        rows = [[f"Acc@{k:g} (%)"] + [_percent(splits[s][f"acc@{k:g}"]) for s in SCANREFER_SPLITS]
                for k in report["thresholds"]]
        rows.append(["Descriptions"] + [str(splits[s]["total"]) for s in SCANREFER_SPLITS])
    else:
        raise ValueError(f"unknown benchmark {report['benchmark']!r}")
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] + ["---:"] * (len(header) - 1)) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    if report.get("box_source"):
        lines.append(f"\nPredicted boxes: {report['box_source']}.")
    return "\n".join(lines) + "\n"


def save_report(report: Mapping, path: str | os.PathLike) -> tuple[Path, Path]:
    """Write `report` as JSON at `path` and its table as markdown beside it (`.md`), atomically."""
    from sparsegps.files import atomic_write_text

    json_path = Path(path)
    md_path = json_path.with_suffix(".md")
    atomic_write_text(json_path, json.dumps(report, indent=1))
    atomic_write_text(md_path, format_table(report))
    return json_path, md_path
