"""Drawing into image arrays: points splatted with a depth buffer, edge shading, and line segments.

All functions are vectorised numpy. The depth buffer is one `np.minimum.at` over the fragments
(pixels of each point's disc) of the points' depth ranks, so 150k points splatted as discs of a
few pixels take a fraction of a second on one core.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

BACKGROUND = (255, 255, 255)


@dataclass
class Raster:
    """An image with its depth buffer: `image` uint8 [H, W, 3], `depth` float [H, W] (inf where
    no point landed), `index` int64 [H, W] (the point drawn at each pixel, -1 for none)."""

    image: np.ndarray
    depth: np.ndarray
    index: np.ndarray

    @property
    def height(self) -> int:
        return self.image.shape[0]

    @property
    def width(self) -> int:
        return self.image.shape[1]


def _disc(radius: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pixel offsets (dx, dy) of a disc of `radius` pixels and their squared distance."""
    r = np.arange(-radius, radius + 1)
    dx, dy = np.meshgrid(r, r)
    d2 = dx * dx + dy * dy
    keep = d2 <= radius * radius + radius  # rounder than <= r^2 for small discs
    return dx[keep], dy[keep], d2[keep]


def splat(u: np.ndarray, v: np.ndarray, depth: np.ndarray, colors: np.ndarray, width: int, height: int,
          radius: np.ndarray | int = 1, background=BACKGROUND) -> Raster:
    """Draw each point as a disc of `radius` pixels (one value, or one per point) centred at pixel
    (u, v); where discs overlap, the point of smallest `depth` wins (a depth buffer). Points with a
    non-finite position or depth are skipped. `colors` is uint8 [N, 3]."""
    u, v, depth = (np.asarray(a, dtype=np.float64) for a in (u, v, depth))
    colors = np.asarray(colors)
    radius = np.broadcast_to(np.asarray(radius, dtype=np.int64), u.shape)
    image = np.empty((height, width, 3), np.uint8)
    image[:] = background
    zbuf = np.full((height, width), np.inf)
    index = np.full((height, width), -1, np.int64)
    ok = np.isfinite(u) & np.isfinite(v) & np.isfinite(depth)
    if not ok.any():
        return Raster(image, zbuf, index)
    points = np.flatnonzero(ok)
    ui, vi = np.rint(u[ok]).astype(np.int64), np.rint(v[ok]).astype(np.int64)
    rad = radius[ok]
    dx, dy, d2 = _disc(int(rad.max()))
    within = d2[None, :] <= (rad * rad + rad)[:, None]  # [n, K]: offsets inside each point's own disc
    pu, pv = ui[:, None] + dx[None, :], vi[:, None] + dy[None, :]
    keep = within & (pu >= 0) & (pu < width) & (pv >= 0) & (pv < height)
    # depth buffer: each pixel keeps the smallest depth rank of the points whose discs cover it
    n = len(points)
    by_depth = np.argsort(depth[ok], kind="stable")
    rank = np.empty(n, np.int64)
    rank[by_depth] = np.arange(n)
    nearest = np.full(width * height, n, np.int64)
    np.minimum.at(nearest, (pv * width + pu)[keep], np.broadcast_to(rank[:, None], keep.shape)[keep])
    hit = np.flatnonzero(nearest < n)
    drawn = points[by_depth[nearest[hit]]]
    image.reshape(-1, 3)[hit] = colors[drawn]
    zbuf.reshape(-1)[hit] = depth[drawn]
    index.reshape(-1)[hit] = drawn
    return Raster(image, zbuf, index)


def shade_edges(raster: Raster, strength: float = 25.0, tolerance: float = 0.01, step: int = 2) -> np.ndarray:
    """The image darkened where a pixel lies in front of its neighbours by more than `tolerance`
    (relative depth): creases and the outlines of objects against what is behind them, as
    eye-dome lighting does, so shapes read without normals. Returns a new uint8 image."""
    depth = raster.depth
    filled = np.isfinite(depth)
    if not filled.any():
        return raster.image.copy()
    log_d = np.log(np.where(filled, depth, 1.0))
    padded = np.pad(np.where(filled, log_d, -np.inf), step, mode="edge")  # background: no step
    h, w = depth.shape
    response = np.zeros_like(log_d)
    for oy, ox in ((-step, 0), (step, 0), (0, -step), (0, step)):
        neighbour = padded[step + oy:step + oy + h, step + ox:step + ox + w]
        response += np.clip(neighbour - log_d - tolerance, 0.0, 0.1)
    factor = np.where(filled, np.exp(-strength * response), 1.0)
    return np.clip(raster.image * factor[..., None], 0, 255).astype(np.uint8)


def draw_segments(image: np.ndarray, start: np.ndarray, end: np.ndarray, color, thickness: int = 1) -> None:
    """Draw 2D line segments from `start` [K, 2] to `end` [K, 2] (pixel u, v) into `image` in place,
    `thickness` pixels either side of the line. Segments with a non-finite end are skipped."""
    start, end = np.asarray(start, np.float64).reshape(-1, 2), np.asarray(end, np.float64).reshape(-1, 2)
    ok = np.isfinite(start).all(axis=1) & np.isfinite(end).all(axis=1)
    start, end = start[ok], end[ok]
    if not len(start):
        return
    h, w = image.shape[:2]
    length = np.linalg.norm(end - start, axis=1)
    steps = np.minimum(np.ceil(length).astype(np.int64) + 1, 4 * (h + w))
    seg = np.repeat(np.arange(len(start)), steps)
    t = (np.arange(len(seg)) - np.repeat(np.cumsum(steps) - steps, steps)) / np.maximum(np.repeat(steps, steps) - 1, 1)
    points = start[seg] + (end - start)[seg] * t[:, None]
    dx, dy, _ = _disc(max(int(thickness), 0))
    pu = (np.rint(points[:, 0])[:, None] + dx[None, :]).ravel().astype(np.int64)
    pv = (np.rint(points[:, 1])[:, None] + dy[None, :]).ravel().astype(np.int64)
    inside = (pu >= 0) & (pu < w) & (pv >= 0) & (pv < h)
    image[pv[inside], pu[inside]] = np.asarray(color, np.uint8)
