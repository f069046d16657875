"""ScanNet v2 scans and their referral benchmarks (ScanRefer, Nr3D, Sr3D).

Files of one scan (ScanNet's documentation), in `<src>/scans/<scene>/` or `<src>/<scene>/`:

    <scene>_vh_clean_2.ply                  mesh vertices: x, y, z, red, green, blue (alpha)
    <scene>_vh_clean_2.0.010000.segs.json   "segIndices": one segment id per vertex
    <scene>.aggregation.json                "segGroups": [{"id", "objectId", "segments", "label"}]
    <scene>.txt                             "axisAlignment = m00 m01 ... m33" (row-major 4x4)

Points are the mesh vertices, moved by the axis alignment as ScanRefer and ReferIt3D do
(identity when the line is missing). An object's points are the vertices of its segments; where
groups overlap the later group wins. Instance ids are the aggregation `objectId`s (0-based), the
ids ScanRefer's `object_id` and ReferIt3D's `target_id` use. Object labels keep the raw category;
`semantic` maps it through the chosen label map. Scans without an aggregation file (the test
split) get no objects.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparsegps.data.labels import load_label_map
from sparsegps.data.scene import Scene, SceneFormatError

from .common import assemble_scene
from .language import read_referit3d_csv, read_scanrefer

FORMAT = "scannet"
MESH_SUFFIX = "_vh_clean_2.ply"
SEGS_SUFFIX = "_vh_clean_2.0.010000.segs.json"
AGGREGATION_SUFFIX = ".aggregation.json"


def scannet_split(split: str) -> set[str]:
    """Scene ids of ScanNet v2's official train, val or test split (package data)."""
    from importlib import resources

    if split not in ("train", "val", "test"):
        raise ValueError(f"unknown ScanNet split {split!r}; expected train, val or test")
    text = resources.files("sparsegps").joinpath("resources", "scannet", f"scannetv2_{split}.txt").read_text()
    return {line.strip() for line in text.splitlines() if line.strip()}


@dataclass
class ReferralFiles:
    """Benchmark language files to attach: ScanRefer JSON, Nr3D CSV and Sr3D CSV paths."""

    scanrefer: list[str] = field(default_factory=list)
    nr3d: list[str] = field(default_factory=list)
    sr3d: list[str] = field(default_factory=list)

    def paths(self) -> list[Path]:
        return [Path(p) for p in (*self.scanrefer, *self.nr3d, *self.sr3d)]

    def annotations(self, skipped):
        """Every item of the files (`Annotation`s and `Problem`s); ReferIt3D rows left out by
        `mentions_target_class` are counted in `skipped`."""
        for path in self.paths():
            if not path.is_file():
                raise FileNotFoundError(f"no such language file: {path}")
        for path in self.scanrefer:
            yield from read_scanrefer(path)
        for path in (*self.nr3d, *self.sr3d):
            yield from read_referit3d_csv(path, skipped)


@dataclass
class ScanNetSource:
    """ScanNet v2 scan folders under `root` (in `scans/`, `scans_test/` or `root` itself); `split`
    keeps the scans of ScanNet's official train, val or test list."""

    root: Path
    split: str | None = None
    language: ReferralFiles = field(default_factory=ReferralFiles)
    notes: list[str] = field(default_factory=list)

    format = FORMAT

    def __post_init__(self):
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"no such directory: {self.root}")

    def split_ids(self) -> set[str] | None:
        return scannet_split(self.split) if self.split else None

    def scenes(self) -> list[tuple[str, dict[str, str]]]:
        folders = [self.root / "scans", self.root / "scans_test", self.root]
        found: dict[str, Path] = {}
        for folder in folders:
            if folder.is_dir():
                for scene_dir in sorted(folder.iterdir()):
                    if (scene_dir / f"{scene_dir.name}{MESH_SUFFIX}").is_file():
                        found.setdefault(scene_dir.name, scene_dir)
        if not found:
            raise FileNotFoundError(f"no ScanNet scans in {self.root}: expected <scene>/<scene>{MESH_SUFFIX} in "
                                    f"{self.root}/scans or {self.root}")
        out = []
        for scene_id in sorted(found):
            d = found[scene_id]
            out.append((scene_id, {"mesh": str(d / f"{scene_id}{MESH_SUFFIX}"),
                                   "segments": str(d / f"{scene_id}{SEGS_SUFFIX}"),
                                   "aggregation": str(d / f"{scene_id}{AGGREGATION_SUFFIX}"),
                                   "meta": str(d / f"{scene_id}.txt")}))
        return out

    def language_paths(self) -> list[Path]:
        return self.language.paths()

    def annotations(self, skipped=None):
        return self.language.annotations(skipped)


def read_mesh_vertices(path: str, scene_id: str) -> tuple[np.ndarray, np.ndarray]:
    """xyz (float64 [N, 3]) and rgb (uint8 [N, 3]) of a PLY file's vertices.

    ScanNet meshes are triangles; telling plyfile so makes reading a mesh ~50x faster. Only the
    vertices are used, so a mesh with other faces is read again the general way if that fails.
    """
    from plyfile import PlyData, PlyParseError

    errors = (OSError, ValueError, KeyError, IndexError, EOFError, PlyParseError)
    try:
        try:
            vertex = PlyData.read(path, known_list_len={"face": {"vertex_indices": 3}})["vertex"].data
        except errors:
            vertex = PlyData.read(path)["vertex"].data
    except errors as e:
        raise SceneFormatError(f"cannot read PLY vertices ({e})", file=path, scene=scene_id, field="vertex") from None
    names = vertex.dtype.names or ()
    for prop in ("x", "y", "z", "red", "green", "blue"):
        if prop not in names:
            raise SceneFormatError(f"vertex has no {prop!r} property (has {list(names)})", file=path, scene=scene_id,
                                   field=f"vertex.{prop}")
    xyz = np.stack([vertex[c] for c in ("x", "y", "z")], axis=1).astype(np.float64)
    rgb = np.stack([vertex[c] for c in ("red", "green", "blue")], axis=1)
    return xyz, rgb


def read_axis_alignment(path: str, scene_id: str) -> np.ndarray:
    """The 4x4 `axisAlignment` matrix of a scan's `<scene>.txt` (identity if the file or line is missing)."""
    if not os.path.isfile(path):
        return np.eye(4)
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "axisAlignment":
            try:
                numbers = [float(v) for v in value.split()]
            except ValueError:
                numbers = []
            if len(numbers) != 16:
                raise SceneFormatError("axisAlignment must hold 16 numbers", file=path, scene=scene_id,
                                       field="axisAlignment")
            return np.array(numbers, dtype=np.float64).reshape(4, 4)
    return np.eye(4)


def _read_json(path: str, scene_id: str, fld: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise SceneFormatError(f"cannot read JSON ({e})", file=path, scene=scene_id, field=fld) from None
    if not isinstance(data, dict) or fld not in data:
        raise SceneFormatError(f"no {fld!r} entry", file=path, scene=scene_id, field=fld)
    return data


def read_instances(segs_path: str, aggregation_path: str, num_vertices: int, scene_id: str
                   ) -> tuple[np.ndarray, dict[int, str]]:
    """Per-vertex objectId (-1 for none) and {objectId: raw category} from the segmentation and
    aggregation files."""
    seg_indices = np.asarray(_read_json(segs_path, scene_id, "segIndices")["segIndices"])
    if seg_indices.shape != (num_vertices,) or not np.issubdtype(seg_indices.dtype, np.integer):
        raise SceneFormatError(f"expected {num_vertices} integer segment ids (one per vertex), got "
                               f"{seg_indices.shape[0] if seg_indices.ndim == 1 else list(seg_indices.shape)}",
                               file=segs_path, scene=scene_id, field="segIndices")
    groups = _read_json(aggregation_path, scene_id, "segGroups")["segGroups"]
    object_of_segment: dict[int, int] = {}
    labels: dict[int, str] = {}
    for k, group in enumerate(groups):
        try:
            object_id = int(group["objectId"] if "objectId" in group else group["id"])
            label = str(group["label"])
            segments = [int(s) for s in group["segments"]]
        except (KeyError, TypeError, ValueError) as e:
            raise SceneFormatError(f"segGroups[{k}] lacks a valid objectId, label or segments ({e!r})",
                                   file=aggregation_path, scene=scene_id, field="segGroups") from None
        if object_id in labels or object_id < 0:
            raise SceneFormatError(f"segGroups[{k}] has {'a repeated' if object_id >= 0 else 'a negative'} "
                                   f"objectId {object_id}", file=aggregation_path, scene=scene_id, field="segGroups")
        labels[object_id] = label
        for s in segments:  # a later group takes over the segments it shares with an earlier one
            object_of_segment[s] = object_id
    segment_ids, inverse = np.unique(seg_indices, return_inverse=True)
    object_per_segment = np.array([object_of_segment.get(int(s), -1) for s in segment_ids], dtype=np.int64)
    return object_per_segment[inverse], labels


def load_scene(scene_id: str, files: dict[str, str], label_map: str) -> Scene:
    """One ScanNet v2 scan as an axis-aligned `Scene` (no texts yet)."""
    xyz, rgb = read_mesh_vertices(files["mesh"], scene_id)
    alignment = read_axis_alignment(files["meta"], scene_id)
    xyz = xyz @ alignment[:3, :3].T + alignment[:3, 3]
    if os.path.isfile(files["aggregation"]):
        instance, labels = read_instances(files["segments"], files["aggregation"], len(xyz), scene_id)
    else:
        instance, labels = np.full(len(xyz), -1, dtype=np.int64), {}
    return assemble_scene(scene_id, xyz.astype(np.float32), rgb, instance, labels, load_label_map(label_map),
                          files["mesh"])
