"""HDF5 scene shards: many scenes per file in concatenated tables with int64 offset indexes.

Layout of one shard (schema version `SCHEMA_VERSION`, documented in docs/FORMAT.md):

    /points/xyz        float32 [P, 3]     /objects/instance_id  int32   [O]
    /points/rgb        uint8   [P, 3]     /objects/label        uint8   [bytes]  utf-8, split by label_offset
    /points/instance   int32   [P]        /objects/label_offset int64   [O+1]
    /points/semantic   int16   [P]        /objects/label_id     int16   [O]   (-1: not in vocabulary)
    /scenes/id         utf-8   [S]        /objects/center       float32 [O, 3]
    /scenes/checksum   ascii   [S]        /objects/size         float32 [O, 3]
    /scenes/point_offset  int64 [S+1]     /texts/kind           uint8   [T]   (index into TEXT_KINDS)
    /scenes/object_offset int64 [S+1]     /texts/text, /texts/text_offset          utf-8 bytes, int64 [T+1]
    /scenes/text_offset   int64 [S+1]     /texts/target_id      int32   [T]
                                          /texts/distractor_offset int64 [T+1]
                                          /texts/distractor_ids    int32 [D]
                                          /texts/source         uint16  [T]   (index into attr text_sources)
                                          /texts/shape          uint8   [T]   (index into attr text_shapes)
                                          /texts/relation       uint16  [T]   (index into attr text_relations)
                                          /texts/item_id, /texts/item_id_offset    utf-8 bytes, int64 [T+1]

Scene s owns rows `offset[s]:offset[s+1]` of each table. Strings are one utf-8 byte table per
column with an offset table, so a scene's strings are one read, not one object per row.

Reading is built for throughput: uncompressed tables (the default) are stored contiguously and read
with one `preadv` per table and scene straight into the result array, past HDF5's per-call
overhead; compressed tables go through h5py. Every offset table of a shard is read once per process.

Shards are written to `<name>.tmp`, fsynced and renamed, so a final-named shard is always complete;
`index.json` beside them lists the shards, their scene ids and the label vocabulary. Version-1
shards (strings as HDF5 variable-length strings, no source/item id/shape) still read, with those
fields empty; version-2 shards (no relation) read with an empty relation; `upgrade_shards` rewrites
both as the current version.
"""
from __future__ import annotations

import json
import os
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import h5py
import numpy as np

from sparsegps import __version__
from sparsegps.files import atomic_write_text, fsync_dir

from .scene import TEXT_KINDS, Scene, SceneFormatError, SceneObject, SceneText

SCHEMA_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
FORMAT_NAME = "sparsegps-scenes"
INDEX_NAME = "index.json"
POINT_CHUNK = 1 << 16
ROW_CHUNK = 4096
DEFAULT_COMPRESSION: str | None = None
_STR = h5py.string_dtype("utf-8")
# Per-row tables a scene read touches, and which offset table (by scene or by text) indexes them.
_POINT_TABLES = ("points/xyz", "points/rgb", "points/instance", "points/semantic")
_OBJECT_TABLES = ("objects/instance_id", "objects/label_id", "objects/center", "objects/size")
_TEXT_TABLES = ("texts/kind", "texts/target_id", "texts/source", "texts/shape", "texts/relation")
_TEXT_STRINGS = ("texts/text", "texts/item_id")
# Attributes the writer sets itself; rewriting a shard carries any others over.
WRITER_ATTRS = {"format", "schema_version", "source", "tool", "created", "label_vocabulary", "num_scenes",
                "text_sources", "text_shapes", "text_relations", "compression"}


class ShardError(SceneFormatError):
    """A shard that cannot be read: wrong schema, truncated, corrupted, or failing its checksums."""


# ----------------------------------------------------------------------------------------- writing

# Codecs of the hdf5plugin package, by the name `write_scenes` takes (byte-shuffled Blosc-LZ4 for blosc).
PLUGIN_CODECS = ("lz4", "blosc")


def _use_plugins(compression: str | None) -> None:
    """Import hdf5plugin (which registers its codecs with HDF5) when `compression` needs it."""
    if compression in PLUGIN_CODECS:
        try:
            import hdf5plugin  # noqa: F401
        except ImportError:
            raise SceneFormatError(f"compression {compression!r} needs the hdf5plugin package "
                                   "(pip install hdf5plugin)", field="compression") from None


def _filter(compression: str | None) -> dict:
    """h5py dataset keywords of a compression name."""
    if compression is None:
        return {}
    if compression in PLUGIN_CODECS:
        _use_plugins(compression)
        import hdf5plugin

        return dict(hdf5plugin.LZ4() if compression == "lz4" else hdf5plugin.Blosc(cname="lz4", clevel=5))
    return {"compression": compression}


def _dataset(group: h5py.Group, name: str, data: np.ndarray, compression: str | None, chunk_rows: int):
    """A per-row table: contiguous when uncompressed (one read per scene), chunked when compressed."""
    data = np.asarray(data)
    kwargs = {}
    if data.shape[0] > 0 and compression is not None:
        kwargs = dict(chunks=(min(chunk_rows, data.shape[0]),) + data.shape[1:], **_filter(compression))
    group.create_dataset(name, data=data, **kwargs)


def _string_table(group: h5py.Group, name: str, values: Sequence[str], compression: str | None) -> None:
    """Strings as one utf-8 byte table `name` and an int64 offset table `name_offset` [len+1]."""
    encoded = [v.encode("utf-8") for v in values]
    offsets = np.cumsum([0] + [len(b) for b in encoded], dtype=np.int64)
    _dataset(group, name, np.frombuffer(b"".join(encoded), dtype=np.uint8), compression, 1 << 16)
    group.create_dataset(f"{name}_offset", data=offsets)


def _vocabulary_index(values: Sequence[str]) -> tuple[list[str], np.ndarray]:
    """The distinct values ("" first) and each value's index among them."""
    names = [""] + sorted(set(values) - {""})
    index = {v: i for i, v in enumerate(names)}
    return names, np.array([index[v] for v in values], dtype=np.int64)


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
    sources, source_index = _vocabulary_index([t.source for t in texts])
    shapes, shape_index = _vocabulary_index([t.shape for t in texts])
    relations, relation_index = _vocabulary_index([t.relation for t in texts])
    if len(sources) > 1 << 16 or len(shapes) > 1 << 8 or len(relations) > 1 << 16:
        raise SceneFormatError(f"too many distinct text sources ({len(sources)}), shapes ({len(shapes)}) or "
                               f"relations ({len(relations)})", file=str(path), field="texts")

    _use_plugins(compression)
    tmp = path.with_name(path.name + ".tmp")
    with h5py.File(tmp, "w", libver="latest") as f:
        f.attrs.update({
            "format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "source": source,
            "tool": f"sparsegps {__version__}", "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "label_vocabulary": json.dumps(list(vocabulary)), "num_scenes": len(scenes),
            "text_sources": json.dumps(sources), "text_shapes": json.dumps(shapes),
            "text_relations": json.dumps(relations),
            "compression": compression or "none",
        })
        if attrs:
            f.attrs.update({k: v for k, v in attrs.items() if k not in WRITER_ATTRS})
        pts = f.create_group("points")
        for name, dtype, width in (("xyz", np.float32, 3), ("rgb", np.uint8, 3), ("instance", np.int32, 0),
                                   ("semantic", np.int16, 0)):
            empty = np.zeros((0, width) if width else 0, dtype)
            _dataset(pts, name, np.concatenate([getattr(s, name) for s in scenes]) if scenes else empty,
                     compression, POINT_CHUNK)
        sc = f.create_group("scenes")
        sc.create_dataset("id", data=np.array([s.scene_id for s in scenes], dtype=object), dtype=_STR)
        sc.create_dataset("checksum", data=np.array([s.checksum() for s in scenes], dtype="S32"))
        sc.create_dataset("point_offset", data=point_off)
        sc.create_dataset("object_offset", data=object_off)
        sc.create_dataset("text_offset", data=text_off)
        ob = f.create_group("objects")
        _dataset(ob, "instance_id", np.array([o.instance_id for o in objects], np.int32), compression, ROW_CHUNK)
        _string_table(ob, "label", [o.label for o in objects], compression)
        _dataset(ob, "label_id", np.array([label_index.get(o.label, -1) for o in objects], np.int16),
                 compression, ROW_CHUNK)
        _dataset(ob, "center", np.array([o.center for o in objects], np.float32).reshape(-1, 3), compression,
                 ROW_CHUNK)
        _dataset(ob, "size", np.array([o.size for o in objects], np.float32).reshape(-1, 3), compression, ROW_CHUNK)
        tx = f.create_group("texts")
        _dataset(tx, "kind", np.array([TEXT_KINDS.index(t.kind) for t in texts], np.uint8), compression, ROW_CHUNK)
        _string_table(tx, "text", [t.text for t in texts], compression)
        _dataset(tx, "target_id", np.array([t.target_id for t in texts], np.int32), compression, ROW_CHUNK)
        tx.create_dataset("distractor_offset", data=dist_off)
        _dataset(tx, "distractor_ids", np.array([d for t in texts for d in t.distractor_ids], np.int32),
                 compression, ROW_CHUNK)
        _dataset(tx, "source", source_index.astype(np.uint16), compression, ROW_CHUNK)
        _dataset(tx, "shape", shape_index.astype(np.uint8), compression, ROW_CHUNK)
        _dataset(tx, "relation", relation_index.astype(np.uint16), compression, ROW_CHUNK)
        _string_table(tx, "item_id", [t.item_id for t in texts], compression)
        f.flush()
        os.fsync(f.id.get_vfd_handle())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def _shard_matches(path: Path, checksums: list[str], vocabulary: Sequence[str], compression: str | None) -> bool:
    """True when `path` is a complete, readable current-version shard holding exactly these scenes,
    compressed as asked."""
    try:
        with h5py.File(path, "r") as f:
            if f.attrs.get("schema_version") != SCHEMA_VERSION:
                return False
            if json.loads(f.attrs["label_vocabulary"]) != list(vocabulary):
                return False
            if f.attrs.get("compression") != (compression or "none"):
                return False
            return [c.decode() for c in f["scenes/checksum"][()]] == checksums
    except (OSError, KeyError, ValueError):
        return False


def write_scenes(scenes: Iterable[Scene], out_dir: str | os.PathLike, *, vocabulary: Sequence[str],
                 source: str = "", max_scenes_per_shard: int = 256, max_bytes_per_shard: int = 256 << 20,
                 compression: str | None = DEFAULT_COMPRESSION, prefix: str = "shard", progress: bool = True,
                 total: int | None = None) -> list[Path]:
    """Validate and write scenes into shards under `out_dir`; returns the shard paths.

    A shard is cut when it holds `max_scenes_per_shard` scenes or its raw arrays reach
    `max_bytes_per_shard`. Writing is atomic per shard and resumable: a final-named shard that
    already holds exactly the scenes it would receive is kept as it is. `compression` is None (the
    default: contiguous tables, the fastest reads; see benchmarks/RESULTS.md), an h5py filter name
    ("lzf", "gzip"), or an hdf5plugin codec ("lz4", "blosc"; needs hdf5plugin). The index
    (`index.json`) is written last.
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
        if _shard_matches(path, checksums, vocabulary, compression):
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
    _write_index(out, vocabulary, source, index_shards, kept)
    return paths


def _write_index(out: Path, vocabulary: Sequence[str], source: str, shards: list[dict], kept: int = 0) -> None:
    index = {"format": FORMAT_NAME, "schema_version": SCHEMA_VERSION, "source": source,
             "label_vocabulary": list(vocabulary), "num_scenes": sum(len(s["scenes"]) for s in shards),
             "shards": shards, "shards_kept": kept}
    atomic_write_text(out / INDEX_NAME, json.dumps(index, indent=1))


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
    """What a store knows of one shard before opening it: from `index.json`, or from the file."""

    path: Path
    num_scenes: int
    vocabulary: list[str]
    source: str
    scene_ids: list[str] | None = None  # from index.json; None: read from the file when asked
    _attrs: dict | None = None

    @property
    def attrs(self) -> dict:
        """The shard's file attributes (read from the file on first use when the index gave the rest)."""
        if self._attrs is None:
            with _open_shard(self.path) as f:
                self._attrs = dict(f.attrs)
        return self._attrs

    @property
    def schema_version(self) -> int:
        """The shard's own schema version (a folder's shards may differ while an upgrade runs)."""
        return int(self.attrs["schema_version"])

    @classmethod
    def from_file(cls, path: Path) -> ShardInfo:
        with _open_shard(path) as f:
            try:
                return cls(path, int(f["scenes/id"].shape[0]), json.loads(f.attrs["label_vocabulary"]),
                           str(f.attrs.get("source", "")), _attrs=dict(f.attrs))
            except (KeyError, OSError, ValueError) as e:
                raise ShardError(f"missing or unreadable index ({e})", file=str(path)) from None


def _shards_from_index(folder: Path) -> list[ShardInfo] | None:
    """The shards `folder/index.json` lists, without opening them; None when the index lacks what a
    store needs (an index of an older writer), so the shards are opened instead."""
    index_path = folder / INDEX_NAME
    try:
        index = json.loads(index_path.read_text())
        vocabulary = list(index["label_vocabulary"])
        shards = [ShardInfo(folder / entry["file"], len(entry["scenes"]), vocabulary, str(index.get("source", "")),
                            [str(i) for i in entry["scenes"]]) for entry in index["shards"]]
    except (KeyError, TypeError, ValueError) as e:
        if isinstance(e, json.JSONDecodeError):
            raise ShardError(f"unreadable index ({e})", file=str(index_path)) from None
        return None
    for shard in shards:
        if not shard.path.is_file():
            raise ShardError("listed in index.json but missing: re-pack the folder, or delete index.json to read "
                             "the shards present", file=str(shard.path))
    return shards


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
    if version not in READABLE_VERSIONS:
        f.close()
        raise ShardError(f"schema version {version} is not supported (this sparsegps reads versions "
                         f"{', '.join(map(str, READABLE_VERSIONS))})", file=str(path), field="schema_version")
    return f


def _decode(values) -> list[str]:
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in values]


_HAS_PREADV = hasattr(os, "preadv")


class _Table:
    """One per-row table of an open shard: rows `a:b` as a fresh, writable numpy array.

    A contiguous (uncompressed) table is read with one `os.preadv` into the result; a chunked one,
    or any table where the OS has no `preadv` (macOS, Windows), through h5py."""

    def __init__(self, dataset: h5py.Dataset, fd: int):
        self.dataset, self.fd = dataset, fd
        self.dtype, self.row_shape = dataset.dtype, dataset.shape[1:]
        self.row_bytes = self.dtype.itemsize * int(np.prod(self.row_shape, dtype=np.int64))
        offset = None
        if dataset.chunks is None and dataset.dtype.kind in "biuf" and dataset.shape[0] > 0 and _HAS_PREADV:
            offset = dataset.id.get_offset()
        self.offset = offset

    def read(self, a: int, b: int) -> np.ndarray:
        a, b = int(a), int(b)
        if self.offset is None:
            return self.dataset[a:b]
        out = np.empty((b - a,) + self.row_shape, dtype=self.dtype)
        want = out.nbytes
        got = os.preadv(self.fd, [out], self.offset + a * self.row_bytes) if want else 0
        if got != want:
            raise OSError(f"short read of {self.dataset.name} ({got} of {want} bytes): truncated file?")
        return out


class _OpenShard:
    """What a process keeps per open shard: the h5py file, a raw descriptor, the tables and every
    offset table, read once."""

    def __init__(self, path: Path):
        self.file = _open_shard(path)
        _use_plugins(self.file.attrs.get("compression"))
        self.version = int(self.file.attrs["schema_version"])
        self.fd = os.open(path, os.O_RDONLY)
        f = self.file
        self.offsets = {k: f[k][()] for k in ("scenes/point_offset", "scenes/object_offset",
                                              "scenes/text_offset", "texts/distractor_offset")}
        self.ids = np.array(_decode(f["scenes/id"][()]), dtype=object)
        self.checksum = f["scenes/checksum"][()]
        names = _POINT_TABLES + _OBJECT_TABLES + ("texts/kind", "texts/target_id", "texts/distractor_ids")
        if self.version >= 2:
            names += ("texts/source", "texts/shape", "objects/label") + _TEXT_STRINGS
            for name in ("objects/label",) + _TEXT_STRINGS:
                self.offsets[f"{name}_offset"] = f[f"{name}_offset"][()]
            self.sources = json.loads(f.attrs["text_sources"])
            self.shapes = json.loads(f.attrs["text_shapes"])
        if self.version >= 3:
            names += ("texts/relation",)
            self.relations = json.loads(f.attrs["text_relations"])
        self.tables = {name: _Table(f[name], self.fd) for name in names}

    def strings(self, name: str, a: int, b: int) -> list[str]:
        """Rows a:b of a string column."""
        if self.version < 2:
            return _decode(self.file[name][a:b])
        off = self.offsets[f"{name}_offset"][a:b + 1]
        blob = self.tables[name].read(off[0], off[-1]).tobytes()
        base = int(off[0])
        return [blob[int(i) - base:int(j) - base].decode("utf-8") for i, j in zip(off[:-1], off[1:])]

    def close(self) -> None:
        self.file.close()
        os.close(self.fd)


def raise_open_file_limit() -> tuple[int, int]:
    """Raise this process's soft limit on open files to its hard limit (DataLoader workers inherit
    it): every worker keeps up to `SceneStore.max_open` shards open, each with two descriptors, on top
    of the sockets and shared-memory segments of the process group. Returns (soft, hard)."""
    try:
        import resource
    except ImportError:  # not on this OS
        return -1, -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):  # some systems cap below the reported hard limit
            pass
    return soft, hard


DEFAULT_MAX_OPEN = 64


class SceneStore:
    """Random access to the scenes of one or more shards: `len(store)`, `store[i] -> Scene`.

    Setup reads a folder's `index.json` (shards, scene ids, vocabulary) without opening a shard;
    folders without one and shard files given by name are opened to read their counts. Files are
    opened lazily on first access in the calling process, so a store created before a DataLoader
    forks its workers is safe: each worker opens its own handles. A process keeps at most `max_open`
    shards open (two descriptors each), closing the least recently used. Inside a DataLoader
    worker, arrays handed back to the main process travel through shared memory
    (`sparsegps.data.sharing`), not through a pipe.

    Every scene read is checked against the checksum its shard recorded when it was written
    (`verify`, on by default; `bench data` measures its cost): a damaged scene raises `ShardError`
    naming the file, the scene and, where the damage broke one, the field. Coordinates are checked
    finite either way, so damage never reaches training as a NaN loss that names no file.
    """

    def __init__(self, paths, verify: bool = True, max_open: int = DEFAULT_MAX_OPEN):
        self.verify = verify
        self.max_open = max_open
        self.shards: list[ShardInfo] = []
        for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
            p = Path(p)
            listed = _shards_from_index(p) if p.is_dir() and (p / INDEX_NAME).exists() else None
            self.shards += listed if listed is not None else [ShardInfo.from_file(f) for f in resolve_shards([p])]
        if not self.shards:
            raise FileNotFoundError(f"no shards found in {paths}")
        self.paths = [s.path for s in self.shards]
        vocabularies = {tuple(s.vocabulary) for s in self.shards}
        if len(vocabularies) > 1:
            raise ShardError("shards use different label vocabularies; pack them into one store",
                             file=str(self.paths[-1]), field="label_vocabulary")
        self.vocabulary: list[str] = list(self.shards[0].vocabulary)
        self._starts = np.cumsum([0] + [s.num_scenes for s in self.shards])
        self._open: OrderedDict[int, _OpenShard] = OrderedDict()
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

    def _shard(self, shard: int) -> _OpenShard:
        if self._pid != os.getpid():  # opened before a fork: start afresh in this process
            self._open, self._pid = OrderedDict(), os.getpid()
            from .sharing import share_arrays_from_workers
            share_arrays_from_workers()
        if shard in self._open:
            self._open.move_to_end(shard)
            return self._open[shard]
        while self._open and len(self._open) >= max(1, self.max_open):
            self._open.popitem(last=False)[1].close()
        info = self.shards[shard]
        try:
            opened = _OpenShard(info.path)
        except ShardError:
            raise
        except (KeyError, OSError, ValueError) as e:
            raise ShardError(f"missing or unreadable index ({e})", file=str(info.path)) from None
        stale = None
        if len(opened.ids) != info.num_scenes:
            stale = f"holds {len(opened.ids)} scenes where index.json lists {info.num_scenes}"
        elif json.loads(opened.file.attrs["label_vocabulary"]) != info.vocabulary:
            stale = "has another label vocabulary than index.json"
        if stale:
            opened.close()
            raise ShardError(f"{stale}: the index is stale; re-pack the folder, or delete index.json",
                             file=str(info.path))
        self._open[shard] = opened
        return opened

    def scene_ids(self) -> list[str]:
        return [sid for shard, info in enumerate(self.shards)
                for sid in (info.scene_ids if info.scene_ids is not None else self._shard(shard).ids)]

    def texts(self) -> list[str]:
        """Every text of every scene (captions and referrals), in stored order, read column by column
        without the points."""
        out: list[str] = []
        for shard, info in enumerate(self.shards):
            sh = self._shard(shard)
            try:
                out += sh.strings("texts/text", 0, int(sh.offsets["scenes/text_offset"][-1]))
            except (OSError, KeyError, ValueError) as e:
                raise ShardError(f"cannot read the texts ({e})", file=str(info.path), field="texts/text") from None
        return out

    def stored_checksum(self, index: int) -> str:
        """The checksum the shard records for scene `index`."""
        shard, local = self.locate(index)
        return self._shard(shard).checksum[local].decode()

    def __getitem__(self, index: int) -> Scene:
        shard, local = self.locate(index)
        sh = self._shard(shard)
        off, tables = sh.offsets, sh.tables
        path = str(self.paths[shard])
        scene_id = str(sh.ids[local])
        try:
            p0, p1 = off["scenes/point_offset"][local:local + 2]
            o0, o1 = off["scenes/object_offset"][local:local + 2]
            t0, t1 = off["scenes/text_offset"][local:local + 2]
            points = {name.split("/")[1]: tables[name].read(p0, p1) for name in _POINT_TABLES}
            obj_ids, _, centers, sizes = (tables[name].read(o0, o1) for name in _OBJECT_TABLES)
            labels = sh.strings("objects/label", o0, o1)
            kinds = tables["texts/kind"].read(t0, t1)
            targets = tables["texts/target_id"].read(t0, t1)
            strings = sh.strings("texts/text", t0, t1)
            doff = off["texts/distractor_offset"][t0:t1 + 1]
            dist = tables["texts/distractor_ids"].read(doff[0], doff[-1]) if t1 > t0 else np.zeros(0, np.int32)
            if sh.version >= 2:
                sources = [sh.sources[i] for i in tables["texts/source"].read(t0, t1)]
                shapes = [sh.shapes[i] for i in tables["texts/shape"].read(t0, t1)]
                item_ids = sh.strings("texts/item_id", t0, t1)
            else:
                sources = shapes = item_ids = [""] * int(t1 - t0)
            if sh.version >= 3:
                relations = [sh.relations[i] for i in tables["texts/relation"].read(t0, t1)]
            else:
                relations = [""] * int(t1 - t0)
            dist_lists = np.split(dist, (doff[1:-1] - doff[0]).astype(np.int64)) if t1 > t0 else []
            scene = Scene(
                scene_id=scene_id, **points,
                objects=[SceneObject(i, l, c, s) for i, l, c, s in zip(obj_ids.tolist(), labels, centers, sizes)],
                texts=[SceneText(TEXT_KINDS[k], s, t, tuple(d.tolist()), src, item, shape, relation)
                       for k, s, t, d, src, item, shape, relation in zip(
                           kinds.tolist(), strings, targets.tolist(), dist_lists, sources, item_ids, shapes,
                           relations)],
            )
        except (OSError, KeyError, ValueError, IndexError) as e:
            raise ShardError(f"cannot read scene ({e})", file=path, scene=scene_id) from None
        if self.verify and scene.checksum() != sh.checksum[local].decode():
            scene.validate(path)  # names the field when the damage broke one (a NaN coordinate, a bad id)
            raise ShardError("checksum mismatch: the stored scene is corrupted (its points, objects or texts differ "
                             "from what was written)", file=path, scene=scene_id, field="scenes/checksum")
        if not np.isfinite(scene.xyz).all():  # unverified reads: a NaN loss would name no file
            scene.validate(path)
        return scene

    def close(self) -> None:
        for sh in self._open.values():
            sh.close()
        self._open = OrderedDict()

    def __getstate__(self):
        state = dict(self.__dict__)
        state.update(_open=OrderedDict(), _pid=None)
        return state

    def __del__(self):
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


def upgrade_shards(paths, compression: str | None = DEFAULT_COMPRESSION, progress: bool = True) -> list[Path]:
    """Rewrite every shard at `paths` (files or directories) that is not of the current schema
    version, in place and atomically (temp file, fsync, rename); returns the rewritten shards.

    Scenes come back with their new text fields empty, so every scene's checksum is unchanged
    (checked before each shard is replaced). A directory's `index.json` is rewritten last.
    """
    from tqdm.auto import tqdm

    rewritten = []
    shards = resolve_shards(paths)
    for path in tqdm(shards, desc="upgrading", unit="shard", disable=not progress):
        store = SceneStore([path])
        info = store.shards[0]
        if info.schema_version == SCHEMA_VERSION:
            store.close()
            continue
        scenes = [store[i] for i in range(len(store))]
        for i, scene in enumerate(scenes):
            if scene.checksum() != store.stored_checksum(i):
                raise ShardError("checksum mismatch: the stored scene is corrupted; not upgraded", file=str(path),
                                 scene=scene.scene_id, field="scenes/checksum")
        store.close()
        _write_shard(path, scenes, info.vocabulary, info.source, compression, info.attrs)
        rewritten.append(path)
    for folder in {Path(p) for p in ([paths] if isinstance(paths, (str, os.PathLike)) else paths)}:
        index_path = folder / INDEX_NAME
        if folder.is_dir() and index_path.exists():
            index = json.loads(index_path.read_text())
            if index.get("schema_version") != SCHEMA_VERSION:
                index["schema_version"] = SCHEMA_VERSION
                atomic_write_text(index_path, json.dumps(index, indent=1))
    return rewritten


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
    sources: Counter = None  # texts per source (benchmark or file; "" for none recorded)
    shapes: Counter = None  # referrals per shape ("" for none recorded)
    schema_versions: Counter = None  # shards per schema version

    def to_dict(self) -> dict:
        return {"shards": self.shards, "scenes": self.scenes, "points": self.points, "objects": self.objects,
                "texts": dict(self.texts), "texts_per_source": dict(self.sources.most_common()),
                "referrals_per_shape": dict(self.shapes.most_common()),
                "schema_versions": {str(k): v for k, v in sorted(self.schema_versions.items())},
                "classes": dict(self.classes.most_common()), "errors": self.errors}


def inspect_store(paths, verify: bool = True, progress: bool = True) -> InspectReport:
    """Count scenes, points, objects, texts per kind and per source, referrals per shape, and classes;
    verify every scene's checksum.

    Problems are collected (not raised) so one report lists every corrupted shard and scene.
    """
    from tqdm.auto import tqdm

    report = InspectReport(texts=Counter(), classes=Counter(), errors=[], sources=Counter(), shapes=Counter(),
                           schema_versions=Counter())
    shards = resolve_shards(paths)
    for path in tqdm(shards, desc="inspecting", unit="shard", disable=not progress):
        try:
            store = SceneStore([path], verify=False)
        except (SceneFormatError, OSError) as e:
            report.errors.append(str(e))
            continue
        report.shards += 1
        report.schema_versions[store.shards[0].schema_version] += 1
        for i in range(len(store)):
            try:
                scene = store[i]
                scene.validate(file=str(path))
                if verify:
                    if scene.checksum() != store.stored_checksum(i):
                        raise ShardError("checksum mismatch: the stored scene is corrupted", file=str(path),
                                         scene=scene.scene_id, field="scenes/checksum")
            except SceneFormatError as e:
                report.errors.append(str(e))
                continue
            report.scenes += 1
            report.points += scene.num_points
            report.objects += len(scene.objects)
            report.texts.update(t.kind for t in scene.texts)
            report.sources.update(t.source for t in scene.texts)
            report.shapes.update(t.shape for t in scene.texts if t.kind == "referral")
            report.classes.update(o.label for o in scene.objects)
        store.close()
    return report
