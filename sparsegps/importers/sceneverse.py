"""The SceneVerse release: ScanNet, 3RScan, MultiScan, ARKitScenes, HM3D, Structured3D, ProcThor.

Layout of one dataset folder (SceneVerse DATA.md):

    <Dataset>/scan_data/pcd_with_global_alignment/<scan_id>.pth   torch.save((xyz, rgb 0-255, ..., instance))
    <Dataset>/scan_data/instance_id_to_label/<scan_id>.pth        torch.save({instance id: class name})
    <Dataset>/annotations/splits/{train,val}_split.txt            (ScanNet: scannetv2_{train,val,test}.txt)
    <Dataset>/annotations/<language>.json                         (ScanNet: annotations/refer/)

`--src` is either one such folder or a folder holding several. Per scan, the point cloud tuple's
first item is xyz, the second the colours, the last the per-point instance id; an id is an object
only if `instance_id_to_label` lists it (SceneVerse's own rule: unassigned points carry -100, -1 or
0 depending on the dataset). Object labels keep SceneVerse's class names (ScanNet raw categories);
`semantic` maps them through the chosen label map.

Language files are found by name: `scene_cap*` -> scene captions; `*obj_caption*` / `ssg_caption*`
-> object captions; `ssg_ref_*`, `anno*`, `scanrefer*`, `nr3d*`, `sr3d*` -> referrals (ScanRefer's
with ScanRefer's class grouping for its unique/multiple split). Other files (e.g. question
answering) are listed as ignored.
"""
from __future__ import annotations

import fnmatch
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparsegps.data.labels import load_label_map
from sparsegps.data.scene import Scene, SceneFormatError

from .common import assemble_scene
from .language import read_scene_captions, read_sceneverse_items
from .safe_load import load_pth

FORMAT = "sceneverse"
# The release's datasets in the order they are packed; folders with other names follow, sorted.
DATASET_ORDER = ("ScanNet", "3RScan", "MultiScan", "ARKitScenes", "HM3D", "Structured3D", "ProcThor")
# Language files left out unless asked for: Sr3D+ repeats Sr3D (SceneVerse uses it only as
# optional augmentation).
DEFAULT_LANGUAGE_EXCLUDE = ("sr3d+",)
PCD_DIR = ("scan_data", "pcd_with_global_alignment")
LABEL_DIR = ("scan_data", "instance_id_to_label")


def language_kind(stem: str) -> tuple[str, str] | None:
    """(text kind, class grouping) of a SceneVerse language file, from its name; None if the file
    holds no language `pack` stores."""
    if stem.startswith("scene_cap"):
        return "scene_caption", "raw"
    if "obj_caption" in stem or stem.startswith("ssg_caption"):
        return "object_caption", "raw"
    if stem.startswith("scanrefer"):
        return "referral", "scanrefer"
    if stem.startswith(("ssg_ref", "anno", "nr3d", "sr3d")):
        return "referral", "raw"
    return None


@dataclass
class SceneVerseSource:
    """Scans and language of a SceneVerse download.

    `datasets` picks dataset folders by name; `split` ("train", "val", "test") keeps the scans its
    split files list; `language` picks language files by name (shell patterns on the file stem,
    e.g. "ssg_ref_*", "scanrefer"); by default all except `DEFAULT_LANGUAGE_EXCLUDE`.
    """

    root: Path
    datasets: list[str] | None = None
    split: str | None = None
    language: list[str] | None = None
    notes: list[str] = field(default_factory=list)

    format = FORMAT

    def __post_init__(self):
        self.root = Path(self.root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"no such directory: {self.root}")
        if self.root.joinpath(*PCD_DIR).is_dir():
            found = {self.root.name: self.root}
        else:
            found = {p.name: p for p in self.root.iterdir() if p.joinpath(*PCD_DIR).is_dir()}
        if not found:
            raise FileNotFoundError(f"{self.root} holds no SceneVerse dataset (no {'/'.join(PCD_DIR)} folder in it "
                                    "or in its subfolders)")
        if self.datasets:
            unknown = sorted(set(self.datasets) - set(found))
            if unknown:
                raise FileNotFoundError(f"datasets {unknown} not found in {self.root}; found {sorted(found)}")
            found = {k: v for k, v in found.items() if k in self.datasets}
        rank = {name: i for i, name in enumerate(DATASET_ORDER)}
        self.dataset_dirs = dict(sorted(found.items(), key=lambda kv: (rank.get(kv[0], len(rank)), kv[0])))
        self._language: list[tuple[Path, str, str]] | None = None

    def split_ids(self) -> set[str] | None:
        """Scan ids of the chosen split (None: no split chosen)."""
        if self.split is None:
            return None
        return set().union(*(self._split_ids(name, d) for name, d in self.dataset_dirs.items()))

    def _split_ids(self, name: str, directory: Path) -> set[str]:
        candidates = [directory / "annotations" / "splits" / f"{self.split}_split.txt",
                      directory / "annotations" / "splits" / f"scannetv2_{self.split}.txt"]
        for path in candidates:
            if path.is_file():
                return {line.strip() for line in path.read_text().splitlines() if line.strip()}
        self.notes.append(f"{name}: no {self.split} split file ({candidates[0].name}); no scans taken")
        return set()

    def scenes(self) -> list[tuple[str, dict[str, str]]]:
        """(scan id, {"points": path, "labels": path}) of every scan, in packing order."""
        return [(pcd.stem, {"points": str(pcd), "labels": str(directory.joinpath(*LABEL_DIR, pcd.name))})
                for directory in self.dataset_dirs.values()
                for pcd in sorted(directory.joinpath(*PCD_DIR).glob("*.pth"))]

    def language_files(self) -> list[tuple[Path, str, str]]:
        """(path, text kind, class grouping) of every selected language file."""
        if self._language is None:
            self._language = self._find_language()
        return self._language

    def language_paths(self) -> list[Path]:
        return [path for path, _, _ in self.language_files()]

    def _find_language(self) -> list[tuple[Path, str, str]]:
        out = []
        for name, directory in self.dataset_dirs.items():
            annotations = directory / "annotations"
            candidates = sorted(p for folder in (annotations, annotations / "refer") if folder.is_dir()
                                for p in folder.iterdir() if p.suffix in (".json", ".jsonl") and p.is_file())
            for path in candidates:
                kind = language_kind(path.stem)
                if kind is None:
                    self.notes.append(f"{name}: ignored {path.relative_to(self.root)} (not a language type pack "
                                      "stores)")
                elif self._wanted(path.stem):
                    out.append((path, *kind))
                else:
                    self.notes.append(f"{name}: skipped {path.relative_to(self.root)} (not selected by --language)")
        return out

    def _wanted(self, stem: str) -> bool:
        if self.language is None:
            return stem not in DEFAULT_LANGUAGE_EXCLUDE
        return any(fnmatch.fnmatchcase(stem, pattern) for pattern in self.language)

    def annotations(self, skipped=None):
        """Every item of the selected language files (`Annotation`s and `Problem`s); `skipped` is
        unused (SceneVerse files have no rows to filter)."""
        for path, kind, grouping in self.language_files():
            if kind == "scene_caption":
                yield from read_scene_captions(path)
            else:
                yield from read_sceneverse_items(path, kind, grouping)


def load_scene(scene_id: str, files: dict[str, str], label_map: str) -> Scene:
    """One SceneVerse scan as a `Scene` (no texts yet)."""
    points_file, labels_file = files["points"], files["labels"]
    if not os.path.isfile(labels_file):
        raise SceneFormatError("instance_id_to_label file is missing", file=labels_file, scene=scene_id,
                               field="instance_id_to_label")
    data = load_pth(points_file)
    if not isinstance(data, (tuple, list)) or len(data) < 3:
        raise SceneFormatError("expected a tuple (xyz, rgb, ..., instance ids)", file=points_file, scene=scene_id,
                               field="pcd")
    xyz, rgb, instance = (np.asarray(a) for a in (data[0], data[1], data[-1]))
    table = load_pth(labels_file)
    if not isinstance(table, dict):
        raise SceneFormatError(f"expected a dict {{instance id: class name}}, got {type(table).__name__}",
                               file=labels_file, scene=scene_id, field="instance_id_to_label")
    labels = {}
    for key, value in table.items():
        try:
            iid = int(key)
        except (TypeError, ValueError):
            raise SceneFormatError(f"instance id {key!r} is not an integer", file=labels_file, scene=scene_id,
                                   field="instance_id_to_label") from None
        if not isinstance(value, str):
            raise SceneFormatError(f"class name of instance {iid} is {type(value).__name__}, not a string",
                                   file=labels_file, scene=scene_id, field="instance_id_to_label")
        labels[iid] = value.strip()
    return assemble_scene(scene_id, xyz, rgb, instance, labels, load_label_map(label_map), points_file)
