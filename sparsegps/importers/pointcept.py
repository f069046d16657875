"""Per-scene `.npy` folders as Pointcept writes them (e.g. its ScanNet preprocessing).

    <scene>/coord.npy       float32 [N, 3]
    <scene>/color.npy       uint8 or float [N, 3], 0-255
    <scene>/segment20.npy   int [N] ScanNet20 class index (-1 ignore)      \\
    <scene>/segment200.npy  int [N] ScanNet200 class index (-1 ignore)      } any of these, or none
    <scene>/segment.npy     int [N] class index in the chosen label map    /
    <scene>/instance.npy    int [N] instance id (-1 none; optional)

Scene folders sit in `<src>/` or one level down (`<src>/train/`, `<src>/val/`, ...). The segment
file that matches the chosen label map is read (segment20 for scannet20, segment200 for
scannet200, else segment.npy), falling back to the others through class names; it gives the points'
classes (`semantic`). Each instance
becomes an object named after the most common class of its points ("unknown" when none of its
points has one). Pointcept's ScanNet instance ids are the aggregation objectIds, so ScanRefer and
ReferIt3D files can be attached, but its points are not axis-aligned.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from sparsegps.data.labels import load_label_map
from sparsegps.data.scene import Scene, SceneFormatError

from .common import assemble_scene
from .scannet import ReferralFiles

FORMAT = "pointcept"
UNKNOWN_CLASS = "unknown"
# segment file -> the label map its indices refer to (None: the label map chosen for the store)
SEGMENT_FILES = {"segment20.npy": "scannet20", "segment200.npy": "scannet200", "segment.npy": None}
_PREFERRED = {"scannet20": "segment20.npy", "synthetic": "segment20.npy", "scannet200": "segment200.npy"}


@dataclass
class PointceptSource:
    """Pointcept scene folders under `root`; `split` keeps those in `root/<split>/`."""

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
        if self.split is None:
            return None
        if not (self.root / self.split).is_dir():
            raise FileNotFoundError(f"no split folder {self.root / self.split}")
        return {p.parent.name for p in (self.root / self.split).glob("*/coord.npy")}

    def scenes(self) -> list[tuple[str, dict[str, str]]]:
        dirs = [p.parent for pattern in ("*/coord.npy", "*/*/coord.npy") for p in self.root.glob(pattern)]
        if not dirs:
            raise FileNotFoundError(f"no scene folders (<scene>/coord.npy) in {self.root} or its subfolders")
        return sorted(((d.name, {"folder": str(d)}) for d in dirs), key=lambda e: e[1]["folder"])

    def language_paths(self) -> list[Path]:
        return self.language.paths()

    def annotations(self, skipped=None):
        return self.language.annotations(skipped)


def _load(path: Path, scene_id: str) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        raise SceneFormatError(f"cannot read .npy ({e})", file=str(path), scene=scene_id) from None


def load_scene(scene_id: str, files: dict[str, str], label_map: str) -> Scene:
    """One Pointcept scene folder as a `Scene` (no texts yet)."""
    folder = Path(files["folder"])
    target = load_label_map(label_map)
    xyz = _load(folder / "coord.npy", scene_id)
    color_file = folder / "color.npy"
    if not color_file.is_file():
        raise SceneFormatError("color.npy is missing", file=str(color_file), scene=scene_id, field="color")
    rgb = _load(color_file, scene_id)
    order = [_PREFERRED.get(label_map, "segment.npy")] + list(SEGMENT_FILES)
    segment_file = next((folder / name for name in dict.fromkeys(order) if (folder / name).is_file()), None)
    n = len(xyz)
    if segment_file is None:
        segment, names = np.full(n, -1, dtype=np.int64), target.names
    else:
        segment = _load(segment_file, scene_id).reshape(-1).astype(np.int64)
        source_map = SEGMENT_FILES[segment_file.name]
        names = load_label_map(source_map).names if source_map else target.names
        if segment.shape != (n,) or (segment >= len(names)).any():
            raise SceneFormatError(f"expected {n} class indices below {len(names)}", file=str(segment_file),
                                   scene=scene_id, field="segment")
    instance_file = folder / "instance.npy"
    instance = (_load(instance_file, scene_id).reshape(-1).astype(np.int64) if instance_file.is_file()
                else np.full(n, -1, dtype=np.int64))
    if instance.shape != (n,):
        raise SceneFormatError(f"expected {n} instance ids, got {instance.shape[0]}", file=str(instance_file),
                               scene=scene_id, field="instance")
    labels = {}
    for iid in np.unique(instance[instance >= 0]):
        classes = segment[(instance == iid) & (segment >= 0)]
        labels[int(iid)] = names[int(np.bincount(classes).argmax())] if classes.size else UNKNOWN_CLASS
    to_target = np.array([target.index(name) for name in names] + [-1], dtype=np.int16)
    semantic = to_target[np.where(segment >= 0, segment, len(names))]
    return assemble_scene(scene_id, xyz, rgb, instance, labels, target, str(folder / "coord.npy"), semantic)
