"""A look-at camera that maps world points (z up, metres) to pixels, and the two views `show` draws.

Camera frame: `right` and `up` span the image plane, `forward` points into the scene. Pixel
coordinates are (u, v) with u to the right and v downwards from the top-left corner of the image:

    perspective:   u = cx + focal * x / z      v = cy - focal * y / z      depth = z
    orthographic:  u = cx + focal * x          v = cy - focal * y          depth = z

where (x, y, z) are the point's coordinates along (right, up, forward) relative to the eye, and
`focal` is in pixels (per metre for orthographic). Points with depth <= `near` are not visible.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np


@dataclass(frozen=True)
class Camera:
    eye: np.ndarray  # float [3], world position (for orthographic: any point on the viewing axis behind the scene)
    forward: np.ndarray  # float [3], unit viewing direction
    up: np.ndarray  # float [3], unit, orthogonal to forward
    width: int  # image size in pixels
    height: int
    focal: float  # pixels (perspective) or pixels per metre (orthographic)
    cx: float  # principal point in pixels
    cy: float
    projection: Literal["perspective", "orthographic"] = "perspective"
    """perspective: a pinhole at `eye`; orthographic: parallel rays along `forward` (maps, top-down)."""
    near: float = 1e-3

    @property
    def right(self) -> np.ndarray:
        return np.cross(self.forward, self.up)

    def to_camera(self, xyz: np.ndarray) -> np.ndarray:
        """World points [N, 3] in the camera frame (right, up, forward) [N, 3], float64."""
        axes = np.stack([self.right, self.up, self.forward])  # rows
        return (np.asarray(xyz, dtype=np.float64) - self.eye) @ axes.T

    def project(self, xyz: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Pixel coordinates u, v (float) and depth of world points [N, 3]."""
        cam = self.to_camera(xyz)
        depth = cam[:, 2]
        if self.projection == "perspective":
            z = np.where(depth > self.near, depth, np.nan)
            x, y = cam[:, 0] / z, cam[:, 1] / z
        else:
            x, y = cam[:, 0], cam[:, 1]
        return self.cx + self.focal * x, self.cy - self.focal * y, depth


def look_at(eye, target, up=(0.0, 0.0, 1.0)) -> tuple[np.ndarray, np.ndarray]:
    """Unit forward and up vectors of a camera at `eye` looking at `target` (up: the world's up)."""
    eye, target, up = (np.asarray(a, dtype=np.float64) for a in (eye, target, up))
    forward = target - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, up)
    if np.linalg.norm(right) < 1e-9:
        raise ValueError("the camera's up vector is parallel to its viewing direction")
    right /= np.linalg.norm(right)
    return forward, np.cross(right, forward)


def fit_camera(xyz: np.ndarray, eye, forward, up, width: int, height: int,
               projection: Literal["perspective", "orthographic"], margin: float = 0.04) -> Camera:
    """A camera with this pose whose focal length and principal point frame `xyz` in the image
    (`margin`: fraction of the image left free on each side), keeping the aspect ratio."""
    probe = Camera(np.asarray(eye, np.float64), np.asarray(forward, np.float64), np.asarray(up, np.float64),
                   width, height, 1.0, 0.0, 0.0, projection)
    u, v, depth = probe.project(xyz)
    ok = np.isfinite(u) & np.isfinite(v)
    if not ok.any():
        raise ValueError("no point lies in front of the camera")
    u, v = u[ok], v[ok]
    span_u, span_v = max(float(u.max() - u.min()), 1e-9), max(float(v.max() - v.min()), 1e-9)
    focal = min(width * (1 - 2 * margin) / span_u, height * (1 - 2 * margin) / span_v)
    cx = width / 2 - focal * (u.max() + u.min()) / 2
    cy = height / 2 - focal * (v.max() + v.min()) / 2
    return Camera(probe.eye, probe.forward, probe.up, width, height, focal, cx, cy, projection)


def oblique_camera(xyz: np.ndarray, width: int, height: int, azimuth: float = -60.0, elevation: float = 50.0,
                   distance: float = 1.8) -> Camera:
    """A perspective view from above one corner: `azimuth` (degrees from +x towards +y) and
    `elevation` (degrees above the horizon) of the eye seen from the scene centre, at `distance`
    times the scene's diagonal."""
    lo, hi = xyz.min(axis=0).astype(np.float64), xyz.max(axis=0).astype(np.float64)
    center = (lo + hi) / 2
    a, e = math.radians(azimuth), math.radians(elevation)
    direction = np.array([math.cos(e) * math.cos(a), math.cos(e) * math.sin(a), math.sin(e)])
    eye = center + direction * distance * max(float(np.linalg.norm(hi - lo)), 1e-3)
    forward, up = look_at(eye, center)
    return fit_camera(xyz, eye, forward, up, width, height, "perspective")


def top_down_camera(xyz: np.ndarray, width: int, height: int) -> Camera:
    """An orthographic map view looking down -z, +y up in the image, +x to the right."""
    lo, hi = xyz.min(axis=0).astype(np.float64), xyz.max(axis=0).astype(np.float64)
    eye = np.array([(lo[0] + hi[0]) / 2, (lo[1] + hi[1]) / 2, hi[2] + 1.0])
    return fit_camera(xyz, eye, np.array([0.0, 0.0, -1.0]), np.array([0.0, 1.0, 0.0]), width, height,
                      "orthographic")
