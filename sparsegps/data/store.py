"""HDF5 scene shards: many scenes per file in concatenated datasets with int64 offset indexes.

Layout of one shard (schema version `SCHEMA_VERSION`, documented in docs/FORMAT.md):

    /points/xyz        float32 [P, 3]     /objects/instance_id  int32   [O]
    /points/rgb        uint8   [P, 3]     /objects/label        utf-8   [O]
    /points/instance   int32   [P]        /objects/label_id     int16   [O]   (-1: not in vocabulary)
    /points/semantic   int16   [P]        /objects/center       float32 [O, 3]
    /scenes/id         utf-8   [S]        /objects/size         float32 [O, 3]
    /scenes/checksum   ascii   [S]        /texts/kind           uint8   [T]   (index into TEXT_KINDS)
    /scenes/point_offset  int64 [S+1]     /texts/text           utf-8   [T]
    /scenes/object_offset int64 [S+1]     /texts/target_id      int32   [T]
    /scenes/text_offset   int64 [S+1]     /texts/distractor_offset int64 [T+1]
                                          /texts/distractor_ids    int32 [D]

Scene s owns rows `offset[s]:offset[s+1]` of each table. Shards are written to `<name>.tmp`,
fsynced and renamed, so a final-named shard is always complete; `index.json` beside them lists the
shards, their scene ids and the label vocabulary.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

from .scene import TEXT_KINDS, Scene, SceneFormatError, SceneObject, SceneText
from sparsegps.files import atomic_write_text, fsync_dir

SCHEMA_VERSION = 1
FORMAT_NAME = "sparsegps-scenes"
INDEX_NAME = "index.json"
POINT_CHUNK = 1 << 16
ROW_CHUNK = 4096
_STR = h5py.string_dtype("utf-8")


class ShardError(SceneFormatError):
    """A shard that cannot be read: wrong schema, truncated, corrupted, or failing its checksums."""


def _tool_version() -> str:
    from sparsegps import __version__
    return __version__


# ----------------------------------------------------------------------------------------- writing

def _dataset(group: h5py.Group, name: str, data: np.ndarray, compression: str | None, chunk_rows: int):
    data = np.asarray(data)
    kwargs = {}
    if data.shape[0] > 0:
        kwargs = dict(chunks=(min(chunk_rows, data.shape[0]),) + data.shape[1:], compression=compression)
    group.create_dataset(name, data=data, **kwargs)


def _write_shard(path: Path, scenes: Sequence[Scene], vocabulary: Sequence[str], source: str,
                 compression: str | None, attrs: dict | None = None) -> None:
    """Write `scenes` into one shard at `path`, atomically."""
    label_index = {name: i for i, name in enumerate(vocabulary)}
    point_off = np.cumsum([0] + [s.num_points for s in scenes], dtype=np.int64)
    object_off = np.cumsum([0] + [len(s.objects) for s in scenes], dtype=np.int64)
    text_off = np.cumsum([0] + [len(s.texts) for s in scenes], dtype=np.int64)
    objects = [o for s in scenes for o in s.objects]
    texts = [t for s in scenes for t in s.texts]
    dist_off = np.cumsum([0] + [len(t.distractor_ids) for t in texts], dtype=np.int64)

    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w", libver="latest") as f:
        f.attrs.update({
            "format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "source": source,
            "tool": f"sparsegps {_tool_version()}", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "label_vocabulary": json.dumps(list(vocabulary)), "num_scenes": len(scenes),
        })
        if attrs:
            f.attrs.update(attrs)
        pts = f.create_group("points")
        cat = (lambda name: np.concatenate([getattr(s, name) for s in scenes])) if scenes else None
        _dataset(pts, "xyz", cat("xyz") if scenes else np.zeros((0, 3), np.float32), compression, POINT_CHUNK)
        _dataset(pts, "rgb", cat("rgb") if scenes else np.zeros((0, 3), np.uint8), compression, POINT_CHUNK)
        _dataset(pts, "instance", cat("instance") if scenes else np.zeros(0, np.int32), compression, POINT_CHUNK)
        _dataset(pts, "semantic", cat("semantic") if scenes else np.zeros(0, np.int16), compression, POINT_CHUNK)
        sc = f.create_group("scenes")
        sc.create_dataset("id", data=np.array([s.scene_id for s in scenes], dtype=object), dtype=_STR)
        sc.create_dataset("checksum", data=np.array([s.checksum() for s in scenes], dtype="S32"))
        sc.create_dataset("point_offset", data=point_off)
        sc.create_dataset("object_offset", data=object_off)
        sc.create_dataset("text_offset", data=text_off)
        ob = f.create_group("objects")
        _dataset(ob, "instance_id", np.array([o.instance_id for o in objects], np.int32), compression, ROW_CHUNK)
        ob.create_dataset("label", data=np.array([o.label for o in objects], dtype=object), dtype=_STR)
        _dataset(ob, "label_id", np.array([label_index.get(o.label, -1) for o in objects], np.int16),
                 compression, ROW_CHUNK)
        _dataset(ob, "center", np.array([o.center for o in objects], np.float32).reshape(-1, 3), compression,
                 ROW_CHUNK)
        _dataset(ob, "size", np.array([o.size for o in objects], np.float32).reshape(-1, 3), compression, ROW_CHUNK)
        tx = f.create_group("texts")
        _dataset(tx, "kind", np.array([TEXT_KINDS.index(t.kind) for t in texts], np.uint8), compression, ROW_CHUNK)
        tx.create_dataset("text", data=np.array([t.text for t in texts], dtype=object), dtype=_STR)
        _dataset(tx, "target_id", np.array([t.target_id for t in texts], np.int32), compression, ROW_CHUNK)
        tx.create_dataset("distractor_offset", data=dist_off)
        _dataset(tx, "distractor_ids", np.array([d for t in texts for d in t.distractor_ids], np.int32),
                 compression, ROW_CHUNK)
        f.flush()
        os.fsync(f.id.get_vfd_handle())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _shard_matches(path: Path, checksums: list[str], vocabulary: Sequence[str]) -> bool:
    """True when `path` is a complete, readable shard holding exactly these scenes."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("schema_version") != SCHEMA_VERSION:
                return False
            if json.loads(f.attrs["label_vocabulary"]) != list(vocabulary):
                return False
            return [c.decode() for c in f["scenes/checksum"][()]] == checksums
    except (OSError, KeyError, ValueError):
        return False


def write_scenes(scenes: Iterable[Scene], out_dir: str | os.PathLike, *, vocabulary: Sequence[str],
                 source: str = "", max_scenes_per_shard: int = 256, max_bytes_per_shard: int = 256 << 20,
                 compression: str | None = "lzf", prefix: str = "shard", progress: bool = True,
                 total: int | None = None) -> list[Path]:
    """Validate and write scenes into shards under `out_dir`; returns the shard paths.

    A shard is cut when it holds `max_scenes_per_shard` scenes or its raw arrays reach
    `max_bytes_per_shard`. Writing is atomic per shard and resumable: a final-named shard that
    already holds exactly the scenes it would receive is kept as it is. `compression` is an h5py
    filter name ("lzf", "gzip", or an hdf5plugin codec once hdf5plugin is imported) or None.
    The index (`index.json`) is written last.
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocabulary = list(vocabulary)
    paths: list[Path] = []
    index_shards = []
    seen_ids: set[str] = set()
    buffer: list[Scene] = []
    nbytes = 0
    kept = 0

    def flush():
        nonlocal buffer, nbytes, kept
        path = out / f"{prefix}-{len(paths):05d}.h5"
        checksums = [s.checksum() for s in buffer]
        if _shard_matches(path, checksums, vocabulary):
            kept += 1
        else:
            _write_shard(path, buffer, vocabulary, source, compression)
        paths.append(path)
        index_shards.append({"file": path.name, "scenes": [s.scene_id for s in buffer],
                             "points": int(sum(s.num_points for s in buffer))})
        buffer, nbytes = [], 0

    bar = tqdm(scenes, total=total, desc=f"writing {out}", unit="scene", disable=not progress)
    for scene in bar:
        scene.validate()
        if scene.scene_id in seen_ids:
            raise SceneFormatError("duplicate scene id", file=str(out), scene=scene.scene_id, field="scene_id")
        seen_ids.add(scene.scene_id)
        buffer.append(scene)
        nbytes += scene.num_points * (12 + 3 + 4 + 2)
        if len(buffer) >= max_scenes_per_shard or nbytes >= max_bytes_per_shard:
            flush()
    if buffer:
        flush()
    bar.close()
    for stale in out.glob(f"{prefix}-*.h5.tmp"):  # left by an earlier run that was killed
        stale.unlink()
    if not paths:
        raise SceneFormatError("no scenes to write", file=str(out))
    index = {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "source": source,
             "label_vocabulary": vocabulary, "num_scenes": len(seen_ids), "shards": index_shards,
             "shards_kept": kept}
    atomic_write_text(out / INDEX_NAME, json.dumps(index, indent=1))
    return paths


# ----------------------------------------------------------------------------------------- reading

def resolve_shards(paths: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """Expand directories (their `index.json`, else every `*.h5`) and files into shard paths."""
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    shards: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            index = p / INDEX_NAME
            if index.exists():
                shards += [p / s["file"] for s in json.loads(index.read_text())["shards"]]
            else:
                shards += sorted(p.glob("*.h5"))
        elif p.exists():
            shards.append(p)
        else:
            raise FileNotFoundError(f"no such shard or directory: {p}")
    if not shards:
        raise FileNotFoundError(f"no shards found in {[str(p) for p in paths]}")
    return shards


@dataclass
class ShardInfo:
    path: Path
    num_scenes: int
    vocabulary: list[str]
    source: str
    attrs: dict


def _open_shard(path: Path) -> h5py.File:
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ShardError(f"cannot open as HDF5 (truncated or corrupted?): {e}", file=str(path)) from None
    fmt = f.attrs.get("format")
    version = f.attrs.get("schema_version")
    if fmt != FORMAT_NAME:
        f.close()
        raise ShardError(f"not a {FORMAT_NAME} shard (format attribute {fmt!r})", file=str(path), field="format")
    if version != SCHEMA_VERSION:
        f.close()
        raise ShardError(f"schema version {version} is not supported (this sparsegps reads {SCHEMA_VERSION})",
                         file=str(path), field="schema_version")
    return f


def _decode(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


class SceneStore:
    """Random access to the scenes of one or more shards: `len(store)`, `store[i] -> Scene`.

    Files are opened lazily on first access in the calling process, so a store created before a
    DataLoader forks its workers is safe: each worker opens its own handles.
    """

    def __init__(self, paths, verify: bool = False):
        self.paths = resolve_shards(paths)
        self.verify = verify
        self.shards: list[ShardInfo] = []
        counts = []
        for p in self.paths:
            with _open_shard(p) as f:
                try:
                    n = int(f["scenes/id"].shape[0])
                    info = ShardInfo(p, n, json.loads(f.attrs["label_vocabulary"]), str(f.attrs.get("source", "")),
                                     dict(f.attrs))
                except (KeyError, OSError, ValueError) as e:
                    raise ShardError(f"missing or unreadable index ({e})", file=str(p)) from None
            self.shards.append(info)
            counts.append(n)
        vocabularies = {tuple(s.vocabulary) for s in self.shards}
        if len(vocabularies) > 1:
            raise ShardError("shards use different label vocabularies; pack them into one store",
                             file=str(self.paths[-1]), field="label_vocabulary")
        self.vocabulary: list[str] = list(self.shards[0].vocabulary)
        self._starts = np.cumsum([0] + counts)
        self._handles: dict[int, h5py.File] = {}
        self._offsets: dict[int, dict[str, np.ndarray]] = {}
        self._pid = None

    def __len__(self) -> int:
        return int(self._starts[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, scene number within the shard) of a global scene index."""
        if not -len(self) <= index < len(self):
            raise IndexError(f"scene index {index} out of range for {len(self)} scenes")
        index %= len(self)
        shard = int(np.searchsorted(self._starts, index, side="right") - 1)
        return shard, index - int(self._starts[shard])

    def _file(self, shard: int) -> h5py.File:
        if self._pid != os.getpid():  # opened before a fork: start afresh in this process
            self._handles, self._offsets, self._pid = {}, {}, os.getpid()
        if shard not in self._handles:
            f = _open_shard(self.paths[shard])
            self._handles[shard] = f
            self._offsets[shard] = {k: f[k][()] for k in ("scenes/point_offset", "scenes/object_offset",
                                                           "scenes/text_offset", "texts/distractor_offset")}
            self._offsets[shard]["ids"] = np.array(_decode(f["scenes/id"][()]), dtype=object)
            self._offsets[shard]["checksum"] = f["scenes/checksum"][()]
        return self._handles[shard]

    def scene_ids(self) -> list[str]:
        return [sid for shard in range(len(self.paths)) for sid in self._shard_ids(shard)]

    def _shard_ids(self, shard: int) -> list[str]:
        self._file(shard)
        return list(self._offsets[shard]["ids"])

    def __getitem__(self, index: int) -> Scene:
        shard, local = self.locate(index)
        f = self._file(shard)
        off = self._offsets[shard]
        path = str(self.paths[shard])
        scene_id = str(off["ids"][local])
        try:
            p0, p1 = off["scenes/point_offset"][local:local + 2]
            o0, o1 = off["scenes/object_offset"][local:local + 2]
            t0, t1 = off["scenes/text_offset"][local:local + 2]
            obj_ids = f["objects/instance_id"][o0:o1]
            labels = _decode(f["objects/label"][o0:o1])
            centers = f["objects/center"][o0:o1]
            sizes = f["objects/size"][o0:o1]
            kinds = f["texts/kind"][t0:t1]
            strings = _decode(f["texts/text"][t0:t1])
            targets = f["texts/target_id"][t0:t1]
            doff = off["texts/distractor_offset"][t0:t1 + 1]
            dist = f["texts/distractor_ids"][doff[0]:doff[-1]] if t1 > t0 else np.zeros(0, np.int32)
            scene = Scene(
                scene_id=scene_id,
                xyz=f["points/xyz"][p0:p1], rgb=f["points/rgb"][p0:p1],
                instance=f["points/instance"][p0:p1], semantic=f["points/semantic"][p0:p1],
                objects=[SceneObject(int(i), l, c, s) for i, l, c, s in zip(obj_ids, labels, centers, sizes)],
                texts=[SceneText(TEXT_KINDS[k], s, int(t), tuple(dist[a - doff[0]:b - doff[0]].tolist()))
                       for k, s, t, a, b in zip(kinds, strings, targets, doff[:-1], doff[1:])],
            )
        except (OSError, KeyError, ValueError, IndexError) as e:
            raise ShardError(f"cannot read scene ({e})", file=path, scene=scene_id) from None
        if self.verify and scene.checksum() != off["checksum"][local].decode():
            raise ShardError("checksum mismatch: the stored scene is corrupted", file=path, scene=scene_id,
                             field="scenes/checksum")
        return scene

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles, self._offsets = {}, {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_handles={}, _offsets={}, _pid=None)
        return state

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


# ---------------------------------------------------------------------------------------- inspect

@dataclass
class InspectReport:
    shards: int = 0
    scenes: int = 0
    points: int = 0
    objects: int = 0
    texts: Counter = None
    classes: Counter = None
    errors: list = None

    def to_dict(self) -> dict:
        return {"shards": self.shards, "scenes": self.scenes, "points": self.points, "objects": self.objects,
                "texts": dict(self.texts), "classes": dict(self.classes.most_common()), "errors": self.errors}


def inspect_store(paths, verify: bool = True, progress: bool = True) -> InspectReport:
    """Count scenes, points, objects, texts per kind and classes; verify every scene's checksum.

    Problems are collected (not raised) so one report lists every corrupted shard and scene.
    """
    from tqdm.auto import tqdm

    report = InspectReport(texts=Counter(), classes=Counter(), errors=[])
    shards = resolve_shards(paths)
    for path in tqdm(shards, desc="inspecting", unit="shard", disable=not progress):
        try:
            store = SceneStore([path], verify=False)
        except (SceneFormatError, OSError) as e:
            report.errors.append(str(e))
            continue
        report.shards += 1
        for i in range(len(store)):
            try:
                scene = store[i]
                scene.validate(file=str(path))
                if verify:
                    stored = store._offsets[0]["checksum"][i].decode()
                    if scene.checksum() != stored:
                        raise ShardError("checksum mismatch: the stored scene is corrupted", file=str(path),
                                         scene=scene.scene_id, field="scenes/checksum")
            except SceneFormatError as e:
                report.errors.append(str(e))
                continue
            report.scenes += 1
            report.points += scene.num_points
            report.objects += len(scene.objects)
            report.texts.update(t.kind for t in scene.texts)
            report.classes.update(o.label for o in scene.objects)
        store.close()
    return report
