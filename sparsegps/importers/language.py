"""Readers for the published language files: ScanRefer JSON, ReferIt3D Nr3D/Sr3D CSV, and
SceneVerse's referral, object-caption and scene-caption files (JSON arrays and JSON Lines).

Each reader yields `Annotation`s, and a `Problem` for each item it cannot read. Ids become ints
(ScanRefer and SceneVerse may store them as strings). An item without its own `item_id` is named
`<file stem>_<row:06d>` after its 0-based row, as vil3dref names Nr3D/Sr3D/ScanRefer items.
"""
from __future__ import annotations

import csv
import json
import os
from collections import Counter
from pathlib import Path
from typing import Iterable, Iterator

from sparsegps.data.scene import NO_INSTANCE

from .common import Annotation, Problem

# ReferIt3D CSV values that mean false (pandas writes "False").
_FALSE = {"false", "0", "no"}
# The shape of a referral a person wrote freely (ScanRefer, Nr3D, SceneVerse's anno.json).
FREE_FORM = "free"
# SceneVerse's generated referral files are ssg_ref_<shape>_<template|gpt>.
SCENEVERSE_SHAPES = ("rel2", "relm", "star", "chain")


def benchmark_name(stem: str) -> str:
    """The `SceneText.source` of a language file: the benchmark for ScanRefer / Nr3D / Sr3D / Sr3D+
    files (whatever their file names), otherwise the file name without extension."""
    low = stem.lower()
    for name in ("scanrefer", "nr3d", "sr3d+", "sr3d"):
        if low.startswith(name) or (name == "scanrefer" and "scanrefer" in low):
            return name
    return stem


def referral_shape(source: str, item: dict) -> str:
    """A referral's shape: SceneVerse's generated shapes from the file name, Sr3D's coarse reference
    type (allocentric, vertical, horizontal, support, between), "free" for human-written ones."""
    for shape in SCENEVERSE_SHAPES:
        if source.startswith(f"ssg_ref_{shape}"):
            return shape
    if source in ("sr3d", "sr3d+"):
        return str(item.get("coarse_reference_type") or "")
    if source in ("scanrefer", "nr3d") or source.startswith("anno"):
        return FREE_FORM
    return ""


def referral_relation(source: str, item: dict) -> str:
    """The relation a referral uses where its benchmark records it: Sr3D's `reference_type`
    (closest, farthest, between, above, below, supported-by, supporting, ...); "" elsewhere."""
    if source in ("sr3d", "sr3d+"):
        return str(item.get("reference_type") or "")
    return ""


def _int_id(value) -> int:
    """An integer id from an int, a whole float or a decimal string; ValueError otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"not an id: {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value.strip())
    raise ValueError(f"not an integer id: {value!r}")


def read_json_items(path: str | os.PathLike) -> list:
    """The items of a JSON array file, or of a JSON Lines file (one object per line)."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        if path.suffix == ".jsonl":
            return [json.loads(line) for line in f if line.strip()]
        return json.load(f)


def _object_rows(path: Path) -> Iterator[tuple[int, dict | Problem]]:
    """(row, item) for each object of a JSON array / JSON Lines file; a Problem in place of an item
    that is not an object, or one Problem when the file holds no array."""
    items = read_json_items(path)
    if not isinstance(items, list):
        yield -1, Problem("bad_annotation", "expected a JSON array of items", file=str(path))
        return
    for row, item in enumerate(items):
        yield row, item if isinstance(item, dict) else Problem("bad_annotation", f"row {row} is not an object",
                                                                 file=str(path))


def _make(kind: str, path: Path, row: int, item: dict, *, scan_key: str, target_key: str, text_key: str,
          type_key: str, grouping: str, item_id: str | None = None, record_id: str | None = None,
          source: str | None = None) -> Annotation | Problem:
    item_id = item_id or str(item.get("item_id") or f"{path.stem}_{row:06d}")
    source = source or benchmark_name(path.stem)
    if record_id is None:  # ScanRefer's submission format names a description by (object, ann_id)
        record_id = str(item["ann_id"]) if source == "scanrefer" and item.get("ann_id") is not None else item_id
    scan_id = item.get(scan_key)
    if not isinstance(scan_id, str) or not scan_id.strip():
        return Problem("bad_annotation", f"missing {scan_key!r}", item_id=item_id, file=str(path))
    scan_id = scan_id.strip()
    text = item.get(text_key)
    if not isinstance(text, str) or not text.strip():
        return Problem("bad_annotation", f"missing or empty {text_key!r}", scan_id=scan_id, item_id=item_id,
                       file=str(path))
    try:
        target = _int_id(item.get(target_key))
    except ValueError as e:
        return Problem("bad_annotation", f"field {target_key!r}: {e}", scan_id=scan_id, item_id=item_id,
                       file=str(path))
    instance_type = item.get(type_key) or ""
    return Annotation(kind, scan_id, text.strip(), target, item_id, str(path),
                      str(instance_type).replace("_", " "), grouping, source, record_id,
                      referral_shape(source, item) if kind == "referral" else "",
                      referral_relation(source, item) if kind == "referral" else "")


def read_sceneverse_items(path: str | os.PathLike, kind: str, grouping: str = "raw"
                          ) -> Iterator[Annotation | Problem]:
    """SceneVerse referrals or object captions: items with `scan_id`, `target_id`, `utterance`,
    `instance_type` and `item_id` (also ScanNet's `refer/{scanrefer,nr3d,sr3d}.jsonl`)."""
    path = Path(path)
    for row, item in _object_rows(path):
        if isinstance(item, Problem):
            yield item
        else:
            yield _make(kind, path, row, item, scan_key="scan_id", target_key="target_id", text_key="utterance",
                        type_key="instance_type", grouping=grouping)


def read_scene_captions(path: str | os.PathLike) -> Iterator[Annotation | Problem]:
    """SceneVerse scene captions: `{scan_id: {"captions": [...]}}` (as its loaders read them), also
    `{scan_id: [...]}` / `{scan_id: "..."}`, or a list of `{"scan_id"|"scene_id", "captions"|"answers"}`."""
    path = Path(path)
    data = read_json_items(path)
    if isinstance(data, dict):
        entries = list(data.items())
    elif isinstance(data, list):
        entries = []
        for row, item in enumerate(data):
            scan = item.get("scan_id", item.get("scene_id")) if isinstance(item, dict) else None
            if not isinstance(scan, str):
                yield Problem("bad_annotation", f"row {row} has no scan_id", file=str(path))
                continue
            entries.append((scan, item))
    else:
        yield Problem("bad_annotation", "expected a JSON object or array", file=str(path))
        return
    for scan_id, value in entries:
        if isinstance(value, dict):
            value = value.get("captions", value.get("answers", value.get("utterance")))
        captions = [value] if isinstance(value, str) else value
        if not isinstance(captions, list):
            yield Problem("bad_annotation", "no captions", scan_id=scan_id, file=str(path))
            continue
        for k, caption in enumerate(captions):
            item_id = f"{path.stem}_{scan_id}_{k}"
            if not isinstance(caption, str) or not caption.strip():
                yield Problem("bad_annotation", "empty caption", scan_id=scan_id, item_id=item_id, file=str(path))
                continue
            yield Annotation("scene_caption", scan_id, caption.strip(), NO_INSTANCE, item_id, str(path),
                             source=path.stem, record_id=item_id)


def read_scanrefer(path: str | os.PathLike) -> Iterator[Annotation | Problem]:
    """ScanRefer (`ScanRefer_filtered_{train,val}.json`): `scene_id`, `object_id` (ScanNet objectId),
    `object_name` (underscores for spaces), `ann_id`, `description`."""
    path = Path(path)
    for row, item in _object_rows(path):
        if isinstance(item, Problem):
            yield item
        else:
            yield _make("referral", path, row, item, scan_key="scene_id", target_key="object_id",
                        text_key="description", type_key="object_name", grouping="scanrefer",
                        item_id=f"{path.stem}_{row:06d}")


def read_referit3d_csv(path: str | os.PathLike, skipped: Counter | None = None) -> Iterator[Annotation | Problem]:
    """ReferIt3D Nr3D / Sr3D / Sr3D+ CSV: `scan_id`, `target_id`, `utterance`, `instance_type`,
    `stimulus_id`, ... . Rows whose `mentions_target_class` is false are skipped (counted in
    `skipped`), as ReferIt3D does by default; scan and target come from `stimulus_id` where their
    columns are missing. A row's id is `<nr3d|sr3d>_<row:06d>` after its 0-based CSV row, as
    vil3dref names them."""
    path = Path(path)
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        for row, item in enumerate(reader):
            mentions = item.get("mentions_target_class")
            if mentions is not None and mentions.strip().lower() in _FALSE:
                if skipped is not None:
                    skipped[f"{path.name}: mentions_target_class is false"] += 1
                continue
            stimulus = item.get("stimulus_id") or ""
            if (not item.get("scan_id") or not item.get("target_id")) and stimulus.count("-") >= 3:
                scan_id, instance_type, _, target = stimulus.split("-", maxsplit=4)[:4]
                item = {"scan_id": scan_id, "target_id": target,
                        "instance_type": instance_type.replace("_", " "), **{k: v for k, v in item.items() if v}}
            source = str(item.get("dataset") or "").strip().lower() or benchmark_name(path.stem)
            yield _make("referral", path, row, item, scan_key="scan_id", target_key="target_id",
                        text_key="utterance", type_key="instance_type", grouping="raw",
                        item_id=f"{path.stem}_{row:06d}", record_id=f"{source}_{row:06d}", source=source)


def split_annotations(items: Iterable[Annotation | Problem], problems: list[Problem]) -> list[Annotation]:
    """The annotations of `items`; its problems go to `problems`."""
    out = []
    for item in items:
        (out if isinstance(item, Annotation) else problems).append(item)
    return out
