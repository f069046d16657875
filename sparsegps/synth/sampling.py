"""Surface points of a room layout, sampled like a scanner sees them.

Every visible face of every part of every object becomes a rectangle in world space; the number
of points on it is Poisson with mean area x density, positions are uniform on it, then jittered.
Colours are the object's colour, shaded by the face's orientation, plus per-point noise. Walls
get openings where doors and windows are. All of it is vectorised over the faces of the room.
"""
from __future__ import annotations

import numpy as np

from .catalog import CLASSES, FACES
from .rooms import RoomLayout

# Brightness of a face by its normal: -x, +x, -y, +y, -z (bottom), +z (top).
_SHADE = np.array([0.93, 0.93, 0.93, 0.93, 0.85, 1.0])


def _part_faces(lo: np.ndarray, hi: np.ndarray):
    """Six faces of each box: origin, edge vectors u and v, all [K, 6, 3] (local frame)."""
    k = len(lo)
    d = hi - lo
    zeros = np.zeros(k)
    ex = np.stack([d[:, 0], zeros, zeros], 1)
    ey = np.stack([zeros, d[:, 1], zeros], 1)
    ez = np.stack([zeros, zeros, d[:, 2]], 1)
    origin = np.repeat(lo[:, None, :], 6, axis=1)
    origin[:, 1, 0] = hi[:, 0]
    origin[:, 3, 1] = hi[:, 1]
    origin[:, 5, 2] = hi[:, 2]
    u = np.stack([ey, ey, ex, ex, ex, ex], axis=1)
    v = np.stack([ez, ez, ez, ez, ey, ey], axis=1)
    return origin, u, v


def _rotate_xy(vectors: np.ndarray, yaw: np.ndarray) -> np.ndarray:
    """Turn [..., 3] vectors about z by per-row quarter turns `yaw` (broadcast over axis 0)."""
    angle = yaw * (np.pi / 2)
    c, s = np.round(np.cos(angle)), np.round(np.sin(angle))
    shape = (-1,) + (1,) * (vectors.ndim - 2)
    c, s = c.reshape(shape), s.reshape(shape)
    out = vectors.copy()
    out[..., 0] = c * vectors[..., 0] - s * vectors[..., 1]
    out[..., 1] = s * vectors[..., 0] + c * vectors[..., 1]
    return out


def sample_points(layout: RoomLayout, rng: np.random.Generator, points_per_m2: float, jitter: float,
                  color_noise: float, min_points_per_object: int = 0):
    """Points of `layout`: xyz float32 [N, 3], rgb uint8 [N, 3] and the object index of each point
    (int32 [N], index into `layout.objects`)."""
    lo_parts, hi_parts, masks, owner = [], [], [], []
    for index, obj in enumerate(layout.objects):
        parts = CLASSES[obj.label].variants[obj.variant].parts
        frac_lo = np.array([p.lo for p in parts])
        frac_hi = np.array([p.hi for p in parts])
        offset = np.array([-obj.size[0] / 2, -obj.size[1] / 2, 0.0])
        lo_parts.append(offset + frac_lo * obj.size)
        hi_parts.append(offset + frac_hi * obj.size)
        masks.append(np.array([[f in p.faces for f in FACES] for p in parts]))
        owner.append(np.full(len(parts), index))
    lo, hi = np.concatenate(lo_parts), np.concatenate(hi_parts)
    mask, owner = np.concatenate(masks), np.concatenate(owner)
    origin, u, v = _part_faces(lo, hi)
    yaw = np.array([o.yaw for o in layout.objects])[owner]
    base = np.array([o.base for o in layout.objects])[owner]
    origin = _rotate_xy(origin, yaw) + base[:, None, :]
    u, v = _rotate_xy(u, yaw), _rotate_xy(v, yaw)
    face_kind = np.broadcast_to(np.arange(6), mask.shape)
    face_owner = np.broadcast_to(owner[:, None], mask.shape)
    origin, u, v = origin[mask], u[mask], v[mask]
    face_kind, face_owner = face_kind[mask], face_owner[mask]

    area = np.linalg.norm(u, axis=1) * np.linalg.norm(v, axis=1)
    expected = area * points_per_m2
    per_object = np.bincount(face_owner, weights=expected, minlength=len(layout.objects))
    boost = np.where(per_object < min_points_per_object, min_points_per_object / np.maximum(per_object, 1e-9), 1.0)
    counts = rng.poisson(expected * boost[face_owner])
    face = np.repeat(np.arange(len(area)), counts)
    st = rng.random((len(face), 2))
    xyz = origin[face] + st[:, :1] * u[face] + st[:, 1:] * v[face]
    xyz += rng.normal(0.0, jitter, xyz.shape)
    point_owner = face_owner[face]

    colors = np.array([o.rgb for o in layout.objects])
    rgb = colors[point_owner] * _SHADE[face_kind[face]][:, None] + rng.normal(0.0, color_noise, xyz.shape)
    keep = ~_in_openings(layout, xyz, point_owner)
    return (xyz[keep].astype(np.float32), np.clip(np.rint(rgb[keep]), 0, 255).astype(np.uint8),
            point_owner[keep].astype(np.int32))


def _in_openings(layout: RoomLayout, xyz: np.ndarray, owner: np.ndarray) -> np.ndarray:
    """Wall points behind a door or window: the wall has an opening there."""
    is_wall = np.array([o.label == "wall" for o in layout.objects])
    on_wall = np.nonzero(is_wall[owner])[0]
    wall_xyz = xyz[on_wall]
    hidden = np.zeros(len(on_wall), dtype=bool)
    for o in layout.objects:
        if o.label not in ("door", "window"):
            continue
        lo, hi = o.lo.copy(), o.hi.copy()
        normal_axis = 0 if o.yaw % 2 else 1
        lo[normal_axis] -= 0.15
        hi[normal_axis] += 0.15
        hidden |= ((wall_xyz >= lo) & (wall_xyz <= hi)).all(axis=1)
    out = np.zeros(len(xyz), dtype=bool)
    out[on_wall[hidden]] = True
    return out
