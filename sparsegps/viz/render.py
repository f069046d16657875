"""One view of a scene as an image array: points splatted with depth ordering, edge shading, and
object boxes drawn over them, plus where each box's label belongs."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .camera import Camera
from .palette import OUTLINE
from .raster import draw_segments, shade_edges, splat

# corner k of a box has offset sign (x, y, z) = bits of k; edges join corners differing in one bit
_SIGNS = np.array([[(k >> 0) & 1, (k >> 1) & 1, (k >> 2) & 1] for k in range(8)], np.float64) - 0.5
BOX_EDGES = np.array([(a, a | bit) for a in range(8) for bit in (1, 2, 4) if not a & bit], np.int64)  # [12, 2]


def box_corners(center, size) -> np.ndarray:
    """The 8 corners [8, 3] of an axis-aligned box (center, full size)."""
    return np.asarray(center, np.float64) + _SIGNS * np.asarray(size, np.float64)


@dataclass
class BoxMark:
    """A box to draw: where, in which colour, how thick (pixels either side), with what label.
    Labels of higher `priority` are placed first when labels would overlap."""

    center: np.ndarray
    size: np.ndarray
    color: tuple[int, int, int]
    label: str | None = None
    thickness: int = 1
    priority: float = 0.0


@dataclass
class LabelAnchor:
    u: float  # pixel where the label's bottom centre belongs
    v: float
    text: str
    color: tuple[int, int, int]
    priority: float


@dataclass
class Panel:
    image: np.ndarray  # uint8 [H, W, 3]
    camera: Camera
    title: str = ""
    labels: list[LabelAnchor] = field(default_factory=list)


def point_spacing(xyz: np.ndarray, cell: float = 0.1) -> float:
    """Typical distance between neighbouring surface points: sqrt(occupied area / points), with
    the area estimated from the occupied `cell`-sized voxels."""
    if not len(xyz):
        return cell
    grid = np.floor(np.asarray(xyz, np.float64) / cell).astype(np.int64)
    grid -= grid.min(axis=0)
    span = grid.max(axis=0) + 1
    cells = len(np.unique((grid[:, 0] * span[1] + grid[:, 1]) * span[2] + grid[:, 2]))
    return float(np.sqrt(cells * cell * cell / len(xyz)))


def splat_radius(camera: Camera, depth: np.ndarray, world_radius: float, max_radius: int = 8) -> np.ndarray:
    """Disc radius in pixels of points of `world_radius` metres at `depth`: near points are bigger."""
    if camera.projection == "perspective":
        pixels = camera.focal * world_radius / np.maximum(depth, camera.near)
    else:
        pixels = np.full(depth.shape, camera.focal * world_radius)
    return np.clip(np.rint(pixels), 0, max_radius).astype(np.int64)


def render_panel(xyz: np.ndarray, colors: np.ndarray, camera: Camera, boxes: list[BoxMark] = (),
                 title: str = "", spacing: float | None = None, shade: bool = True) -> Panel:
    """Draw points (xyz [N, 3], colors uint8 [N, 3]) seen by `camera`, then `boxes` on top
    (each with a white halo), and note where their labels go (above the box, at its top centre)."""
    u, v, depth = camera.project(xyz)
    spacing = point_spacing(xyz) if spacing is None else spacing
    radius = splat_radius(camera, depth, 0.9 * spacing)
    raster = splat(u, v, depth, colors, camera.width, camera.height, radius)
    image = shade_edges(raster) if shade else raster.image
    labels = []
    for box in boxes:
        corners = box_corners(box.center, box.size)
        cu, cv, _ = camera.project(corners)
        ends = np.stack([cu, cv], axis=1)
        start, end = ends[BOX_EDGES[:, 0]], ends[BOX_EDGES[:, 1]]
        draw_segments(image, start, end, OUTLINE, box.thickness + 1)
        draw_segments(image, start, end, box.color, box.thickness)
        if box.label:
            top = np.asarray(box.center, np.float64) + [0.0, 0.0, float(box.size[2]) / 2]
            tu, _, _ = camera.project(top[None])
            if np.isfinite(tu[0]) and np.isfinite(cv).all():  # above the box's highest corner on screen
                labels.append(LabelAnchor(float(tu[0]), float(cv.min()), box.label, box.color, box.priority))
    return Panel(image, camera, title, labels)
