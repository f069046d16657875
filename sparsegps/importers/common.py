"""What every importer shares: problems found in the input, language items before they meet their
scene, turning points + instance labels into a `Scene`, and attaching texts to it."""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from sparsegps.data.labels import LabelMap, normalize_category, scanrefer_class
from sparsegps.data.scene import NO_INSTANCE, Scene, SceneFormatError, SceneText, boxes_from_points

# Kinds of problem an import reports. Texts and scenes with a problem are left out of the store,
# except for "label_mismatch", which only warns.
PROBLEM_KINDS = {
    "target_missing": "an annotation's target id is not an object of its scene (text left out)",
    "scene_missing": "an annotation names a scene the source does not have (text left out)",
    "bad_annotation": "a malformed language item: missing field, non-integer id, empty text (left out)",
    "label_mismatch": "an annotation's class name differs from its target object's label (text kept)",
    "unsafe_file": "a pickle that would run code; refused unread (scene left out)",
    "bad_scene": "a scene file that cannot be read or fails validation (scene left out)",
}

# How a referral's same-class distractors are found: by the objects' raw class names (ReferIt3D,
# SceneVerse), or by ScanRefer's 18 classes (for ScanRefer's unique/multiple split).
CLASS_GROUPINGS = ("raw", "scanrefer")


@dataclass
class Problem:
    """One problem in the input, located by file, scan id and item id where known."""

    kind: str
    message: str
    scan_id: str | None = None
    item_id: str | None = None
    file: str | None = None

    def to_dict(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    def __str__(self) -> str:
        where = ", ".join(f"{k} {v}" for k, v in (("scan", self.scan_id), ("item", self.item_id),
                                                  ("file", self.file)) if v)
        return f"[{self.kind}] {where}: {self.message}" if where else f"[{self.kind}] {self.message}"


@dataclass(slots=True)
class Annotation:
    """A language item as read from its file, not yet checked against its scene.

    `target_id` is the instance id it describes (-1 for scene captions); `instance_type` is the
    class name the file gives the target ("" if none); `grouping` says how same-class distractors
    of a referral are found (one of `CLASS_GROUPINGS`). `item_id` locates the item in reports;
    `source`, `record_id`, `shape` and `relation` become the stored text's `source`, `item_id`,
    `shape` and `relation` (the benchmark, the id its submission files use, a referral's shape and
    the spatial relation it uses where the benchmark records one).
    """

    kind: str
    scan_id: str
    text: str
    target_id: int
    item_id: str
    file: str
    instance_type: str = ""
    grouping: str = "raw"
    source: str = ""
    record_id: str = ""
    shape: str = ""
    relation: str = ""


def assemble_scene(scene_id: str, xyz, rgb, instance, labels: dict[int, str], label_map: LabelMap,
                   file: str, semantic: np.ndarray | None = None) -> Scene:
    """A validated `Scene` from points, per-point instance ids and an instance -> class name table.

    Only non-negative ids listed in `labels` are objects; every other id becomes -1 (no object), as
    SceneVerse's loaders do (its datasets mark unassigned points with -100, -1 or 0). Object labels
    keep the raw class name; `semantic` is each point's object class in `label_map` (-1 elsewhere)
    unless per-point classes are given.
    """
    xyz = np.asarray(xyz)
    if xyz.ndim != 2 or xyz.shape[1] != 3:
        raise SceneFormatError(f"expected points of shape [N, 3], got {list(xyz.shape)}", file=file,
                               scene=scene_id, field="xyz")
    if not np.issubdtype(xyz.dtype, np.floating):
        raise SceneFormatError(f"expected floating point coordinates, got {xyz.dtype}", file=file,
                               scene=scene_id, field="xyz")
    xyz = xyz.astype(np.float32, copy=False)
    rgb = colors_to_uint8(rgb, scene_id, file)
    instance = instance_ids(instance, scene_id, file)
    if rgb.shape != xyz.shape or instance.shape != (xyz.shape[0],):
        raise SceneFormatError(f"{xyz.shape[0]} points but colours of shape {list(rgb.shape)} and instance ids "
                               f"of shape {list(instance.shape)}", file=file, scene=scene_id, field="instance")
    ids, inverse = np.unique(instance, return_inverse=True)
    if ids.size and ids[-1] > np.iinfo(np.int32).max:
        raise SceneFormatError(f"instance id {ids[-1]} does not fit int32", file=file, scene=scene_id,
                               field="instance")
    known = np.array([i >= 0 and int(i) in labels for i in ids], dtype=bool)
    instance = np.where(known[inverse], instance, NO_INSTANCE).astype(np.int32)
    objects = boxes_from_points(xyz, instance, {int(i): labels[int(i)] for i in ids[known]})
    if semantic is None:
        class_of_id = np.array([label_map.index(labels[int(i)]) if k else -1 for i, k in zip(ids, known)],
                               dtype=np.int16)
        semantic = class_of_id[inverse]
    return Scene(scene_id, xyz, rgb, instance, semantic, objects).validate(file=file)


def colors_to_uint8(rgb, scene_id: str, file: str) -> np.ndarray:
    """Colours 0-255 (integer or float, as the published files store them) as uint8."""
    rgb = np.asarray(rgb)
    if rgb.size and (not np.isfinite(rgb).all() or rgb.min() < 0 or rgb.max() > 255.5):
        raise SceneFormatError("colours must lie in 0..255", file=file, scene=scene_id, field="rgb")
    if np.issubdtype(rgb.dtype, np.floating):
        rgb = np.rint(rgb)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def instance_ids(values, scene_id: str, file: str) -> np.ndarray:
    """Per-point instance ids as int64; float arrays (MultiScan, ARKitScenes, Structured3D) must hold
    whole numbers."""
    values = np.asarray(values).reshape(-1)
    if np.issubdtype(values.dtype, np.floating):
        if not np.isfinite(values).all() or (values != np.rint(values)).any():
            raise SceneFormatError("instance ids are not whole numbers", file=file, scene=scene_id,
                                   field="instance")
    elif not np.issubdtype(values.dtype, np.integer):
        raise SceneFormatError(f"instance ids must be numbers, got {values.dtype}", file=file, scene=scene_id,
                               field="instance")
    return values.astype(np.int64)


def attach_texts(scene: Scene, annotations: list[Annotation], problems: list[Problem]) -> Scene:
    """Add each annotation to `scene` as a `SceneText`; record a problem for each one that cannot be.

    A referral's distractors are the other objects of its target's class (see `CLASS_GROUPINGS`).
    """
    objects = scene.object_by_id()
    groups: dict[str, dict[str, list[int]]] = {}

    def class_key(label: str, grouping: str) -> str:
        return scanrefer_class(label) if grouping == "scanrefer" else normalize_category(label)

    def same_class(grouping: str) -> dict[str, list[int]]:
        if grouping not in groups:
            table: dict[str, list[int]] = {}
            for o in scene.objects:
                table.setdefault(class_key(o.label, grouping), []).append(o.instance_id)
            groups[grouping] = table
        return groups[grouping]

    for a in annotations:
        if a.kind == "scene_caption":
            scene.texts.append(SceneText("scene_caption", a.text, source=a.source, item_id=a.record_id))
            continue
        target = objects.get(a.target_id)
        if target is None:
            problems.append(Problem("target_missing", f"target id {a.target_id} is not an object of this scene",
                                    scan_id=a.scan_id, item_id=a.item_id, file=a.file))
            continue
        if a.instance_type and normalize_category(a.instance_type) != normalize_category(target.label):
            problems.append(Problem("label_mismatch", f"annotation says {a.instance_type!r}, object "
                                    f"{a.target_id} is {target.label!r}", scan_id=a.scan_id, item_id=a.item_id,
                                    file=a.file))
        distractors: tuple[int, ...] = ()
        if a.kind == "referral":
            members = same_class(a.grouping)[class_key(target.label, a.grouping)]
            distractors = tuple(i for i in members if i != a.target_id)
        scene.texts.append(SceneText(a.kind, a.text, a.target_id, distractors, source=a.source,
                                     item_id=a.record_id, shape=a.shape if a.kind == "referral" else "",
                                     relation=a.relation if a.kind == "referral" else ""))
    return scene
