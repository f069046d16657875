"""The one in-memory form of a scene: points with labels, objects, and the language about them.

Importers, the synthetic generator, the shard writer and the shard reader all speak `Scene`.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

TEXT_KINDS = ("object_caption", "scene_caption", "referral")
NO_INSTANCE = -1
IGNORE_LABEL = -1


class SceneFormatError(ValueError):
    """Bad scene data. Names the file, the scene and the field at fault."""

    def __init__(self, message: str, *, file: str | None = None, scene: str | None = None,
                 field: str | None = None):
        self.file, self.scene, self.field, self.reason = file, scene, field, message
        where = ", ".join(f"{k} {v!r}" for k, v in (("file", file), ("scene", scene), ("field", field)) if v)
        super().__init__(f"{where}: {message}" if where else message)

    def located(self, *, file: str | None = None, scene: str | None = None) -> "SceneFormatError":
        """The same error with a file (or scene) filled in where it was unknown."""
        return SceneFormatError(self.reason, file=self.file or file, scene=self.scene or scene, field=self.field)


@dataclass
class SceneObject:
    """One object instance: its id in `Scene.instance`, class name, and axis-aligned box."""

    instance_id: int
    label: str
    center: np.ndarray  # float32 [3]
    size: np.ndarray  # float32 [3], full extents

    def __post_init__(self):
        self.instance_id = int(self.instance_id)
        self.center = np.asarray(self.center, dtype=np.float32).reshape(3)
        self.size = np.asarray(self.size, dtype=np.float32).reshape(3)

    def __eq__(self, other):
        return (isinstance(other, SceneObject) and self.instance_id == other.instance_id
                and self.label == other.label and np.array_equal(self.center, other.center)
                and np.array_equal(self.size, other.size))


@dataclass
class SceneText:
    """A text about a scene. `target_id` is the instance described (-1 for scene captions);
    `distractor_ids` are same-class instances a referral must be told apart from.

    Where the text comes from, for benchmarks and statistics ("" where unknown): `source` is the
    benchmark or file it was read from (`scanrefer`, `nr3d`, `sr3d`, a SceneVerse file name such as
    `ssg_ref_chain_gpt`, `synth`); `item_id` is its id there (ScanRefer's `ann_id`, the Nr3D/Sr3D
    CSV row, SceneVerse's `item_id`); `shape` is a referral's shape and `relation` the spatial
    relations it uses, joined by "+" (`closest`, `color+next_to`; Sr3D's `reference_type`; see
    docs/FORMAT.md).
    """

    kind: str
    text: str
    target_id: int = NO_INSTANCE
    distractor_ids: tuple[int, ...] = ()
    source: str = ""
    item_id: str = ""
    shape: str = ""
    relation: str = ""

    def __post_init__(self):
        self.target_id = int(self.target_id)
        self.distractor_ids = tuple(int(i) for i in self.distractor_ids)
        self.source, self.item_id, self.shape = str(self.source), str(self.item_id), str(self.shape)
        self.relation = str(self.relation)


@dataclass
class Scene:
    """A point-cloud scene with per-point instance and semantic labels, objects and texts.

    `semantic` indexes the label vocabulary of the store the scene lives in (-1 = ignore);
    `instance` is -1 where a point belongs to no object.
    """

    scene_id: str
    xyz: np.ndarray  # float32 [N, 3]
    rgb: np.ndarray  # uint8 [N, 3]
    instance: np.ndarray  # int32 [N]
    semantic: np.ndarray  # int16 [N]
    objects: list[SceneObject] = field(default_factory=list)
    texts: list[SceneText] = field(default_factory=list)

    @property
    def num_points(self) -> int:
        return int(self.xyz.shape[0])

    def object_by_id(self) -> dict[int, SceneObject]:
        return {o.instance_id: o for o in self.objects}

    def validate(self, file: str | None = None) -> "Scene":
        """Check shapes, dtypes, finiteness and that every text names an instance of this scene.

        Arrays of a safely convertible dtype are converted in place; anything else raises
        `SceneFormatError` naming the file, the scene and the field.
        """
        def fail(fld: str, msg: str):
            raise SceneFormatError(msg, file=file, scene=self.scene_id, field=fld)

        if not isinstance(self.scene_id, str) or not self.scene_id:
            fail("scene_id", "must be a non-empty string")
        xyz = np.asarray(self.xyz)
        if xyz.ndim != 2 or xyz.shape[1] != 3:
            fail("xyz", f"expected shape [N, 3], got {list(xyz.shape)}")
        n = xyz.shape[0]
        if n == 0:
            fail("xyz", "scene has no points")
        if not np.issubdtype(xyz.dtype, np.floating):
            fail("xyz", f"expected floating point coordinates, got {xyz.dtype}")
        self.xyz = xyz.astype(np.float32, copy=False)
        bad = ~np.isfinite(self.xyz).all(axis=1)
        if bad.any():
            fail("xyz", f"{int(bad.sum())} points have NaN or Inf coordinates (first at point {int(np.argmax(bad))})")
        for name, dtype, shape in (("rgb", np.uint8, (n, 3)), ("instance", np.int32, (n,)),
                                   ("semantic", np.int16, (n,))):
            arr = np.asarray(getattr(self, name))
            if arr.shape != shape:
                fail(name, f"expected shape {list(shape)} to match {n} points, got {list(arr.shape)}")
            if arr.dtype != dtype:
                if not np.issubdtype(arr.dtype, np.integer):
                    fail(name, f"expected {np.dtype(dtype).name}, got {arr.dtype}")
                info = np.iinfo(dtype)
                if arr.size and (arr.min() < info.min or arr.max() > info.max):
                    fail(name, f"values outside the range of {np.dtype(dtype).name}")
                arr = arr.astype(dtype)
            setattr(self, name, arr)
        if (self.instance < NO_INSTANCE).any():
            fail("instance", "instance ids must be >= 0, or -1 for no object")
        if (self.semantic < IGNORE_LABEL).any():
            fail("semantic", "semantic labels must be >= 0, or -1 for ignore")

        ids = [o.instance_id for o in self.objects]
        if len(set(ids)) != len(ids):
            fail("objects", "duplicate instance ids")
        for o in self.objects:
            if o.instance_id < 0:
                fail("objects", f"object instance id {o.instance_id} must be >= 0")
            if not np.isfinite(o.center).all() or not np.isfinite(o.size).all() or (o.size < 0).any():
                fail("objects", f"object {o.instance_id} has a non-finite or negative box")
        known = set(ids)
        present = set(np.unique(self.instance).tolist()) - {NO_INSTANCE}
        missing = sorted(present - known)
        if missing:
            fail("instance", f"points carry instance ids with no object entry: {missing[:10]}")
        for t_idx, t in enumerate(self.texts):
            if t.kind not in TEXT_KINDS:
                fail("texts", f"text {t_idx} has unknown kind {t.kind!r} (expected one of {TEXT_KINDS})")
            if t.kind != "scene_caption" and t.target_id not in known:
                fail("texts", f"text {t_idx} ({t.kind}) targets instance {t.target_id}, "
                              f"which is not an object of this scene")
            bad_d = [d for d in t.distractor_ids if d not in known]
            if bad_d:
                fail("texts", f"text {t_idx} names distractors {bad_d} that are not objects of this scene")
        return self

    def checksum(self) -> str:
        """Content hash of points, objects and texts (hex, 128 bit)."""
        h = hashlib.blake2b(digest_size=16)
        h.update(self.scene_id.encode())
        for arr in (self.xyz, self.rgb, self.instance, self.semantic):
            h.update(np.ascontiguousarray(arr).tobytes())
        for o in self.objects:
            h.update(f"{o.instance_id}|{o.label}|".encode())
            h.update(o.center.tobytes())
            h.update(o.size.tobytes())
        for t in self.texts:
            h.update(f"{t.kind}|{t.target_id}|{t.distractor_ids}|{t.text}".encode())
            if t.source or t.item_id or t.shape:  # texts without them hash as before these fields existed
                h.update(f"|{t.source}|{t.item_id}|{t.shape}".encode())
            if t.relation:  # texts without one hash as before the field existed
                h.update(f"|relation={t.relation}".encode())
        return h.hexdigest()

    def __eq__(self, other):
        if not isinstance(other, Scene):
            return NotImplemented
        return (self.scene_id == other.scene_id and self.objects == other.objects and self.texts == other.texts
                and all(np.array_equal(getattr(self, a), getattr(other, a)) and
                        getattr(self, a).dtype == getattr(other, a).dtype
                        for a in ("xyz", "rgb", "instance", "semantic")))


def boxes_from_points(xyz: np.ndarray, instance: np.ndarray, labels: dict[int, str]) -> list[SceneObject]:
    """Axis-aligned boxes (center, full size) of every labelled instance with points, sorted by id."""
    wanted = np.array(sorted(labels), dtype=np.int64)
    keep = np.isin(instance, wanted)
    if not keep.any():
        return []
    inst, pts = instance[keep], xyz[keep]
    order = np.argsort(inst, kind="stable")
    inst, pts = inst[order], pts[order]
    ids, starts = np.unique(inst, return_index=True)
    lo, hi = np.minimum.reduceat(pts, starts, axis=0), np.maximum.reduceat(pts, starts, axis=0)
    return [SceneObject(int(i), labels[int(i)], (a + b) / 2, b - a) for i, a, b in zip(ids, lo, hi)]
