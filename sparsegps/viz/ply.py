"""Coloured point clouds and box line sets as PLY files (plyfile), for MeshLab, CloudCompare, Open3D.

`write_points_ply` writes a `vertex` element (x, y, z float32; red, green, blue uchar).
`write_boxes_ply` writes 8 corner vertices per box and an `edge` element (vertex1, vertex2 int32;
red, green, blue uchar), the layout Open3D's `read_line_set` and MeshLab read. Both write to a
temporary file and rename it, so a crash never leaves half a file at the final path.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .render import BOX_EDGES, BoxMark, box_corners


def _write(elements: list, path: Path, binary: bool) -> Path:
    from plyfile import PlyData

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    PlyData(elements, text=not binary).write(str(tmp))
    os.replace(tmp, path)
    return path


def write_points_ply(path: str | os.PathLike, xyz: np.ndarray, colors: np.ndarray, binary: bool = True) -> Path:
    """Points [N, 3] with uint8 colours [N, 3] as a coloured PLY point cloud."""
    from plyfile import PlyElement

    xyz, colors = np.asarray(xyz, np.float32), np.asarray(colors, np.uint8)
    if xyz.shape != colors.shape or xyz.ndim != 2 or xyz.shape[1] != 3:
        raise ValueError(f"expected xyz and colors of shape [N, 3], got {xyz.shape} and {colors.shape}")
    vertex = np.empty(len(xyz), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4"),
                                       ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    for k, axis in enumerate("xyz"):
        vertex[axis] = xyz[:, k]
    for k, channel in enumerate(("red", "green", "blue")):
        vertex[channel] = colors[:, k]
    return _write([PlyElement.describe(vertex, "vertex")], Path(path), binary)


def write_boxes_ply(path: str | os.PathLike, boxes: list[BoxMark], binary: bool = True) -> Path:
    """Axis-aligned boxes as a PLY line set: 8 vertices and 12 coloured edges per box."""
    from plyfile import PlyElement

    corners = np.concatenate([box_corners(b.center, b.size) for b in boxes]) if boxes else np.zeros((0, 3))
    vertex = np.empty(len(corners), dtype=[("x", "f4"), ("y", "f4"), ("z", "f4")])
    for k, axis in enumerate("xyz"):
        vertex[axis] = corners[:, k]
    edge = np.empty(12 * len(boxes), dtype=[("vertex1", "i4"), ("vertex2", "i4"),
                                            ("red", "u1"), ("green", "u1"), ("blue", "u1")])
    if boxes:
        pairs = (BOX_EDGES[None] + 8 * np.arange(len(boxes))[:, None, None]).reshape(-1, 2)
        colors = np.repeat(np.array([b.color for b in boxes], np.uint8), 12, axis=0)
        edge["vertex1"], edge["vertex2"] = pairs[:, 0], pairs[:, 1]
        for k, channel in enumerate(("red", "green", "blue")):
            edge[channel] = colors[:, k]
    return _write([PlyElement.describe(vertex, "vertex"), PlyElement.describe(edge, "edge")], Path(path), binary)


def boxes_path(path: str | os.PathLike) -> Path:
    """Where the boxes of the point cloud at `path` go: `scene.ply` -> `scene.boxes.ply`."""
    path = Path(path)
    return path.with_name(path.stem + ".boxes" + (path.suffix or ".ply"))
