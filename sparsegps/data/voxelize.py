"""Grid sampling of a point cloud: which voxel each point falls in, and the per-voxel means.

`voxelize` is the one implementation behind `transforms.GridSample`. Voxels come out in the order
of their keys (x, then y, then z), each voxel's "first point" is its lowest point index, and
means are computed in point order, so the result is the same as a `np.unique` of the keys
followed by `np.bincount` means, bit for bit, only faster:

- keys are packed with the point index into one int64 (`key << index_bits | index`) and sorted by
  value (numpy's vectorised sort, several times faster than `argsort`); equal keys then come out
  in point order, so a voxel's first point is where its run starts;
- when the packed value does not fit in 63 bits (huge grids), an `argsort` and a minimum over
  each run give the same answer;
- most voxels of a 0.02 m grid hold one point, whose "mean" is the point itself: sums run only
  over the points of voxels with several points.

Axis reductions run on transposed (column-major) copies: numpy reduces a [N, 3] array along its
first axis several times more slowly than a [3, N] one along its second.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_AXIS_CELLS = 1 << 21


@dataclass
class Voxels:
    """Voxels of one point cloud: `coord` [V, 3] int32 grid coordinates (>= 0), `first` [V] the
    lowest point index in each voxel, `inverse` [N] int64 each point's voxel, `counts` [V]."""

    coord: np.ndarray
    first: np.ndarray
    inverse: np.ndarray
    counts: np.ndarray

    def __post_init__(self):
        shared = np.flatnonzero(self.counts > 1)
        slot = np.full(len(self.counts), -1, dtype=np.int64)
        slot[shared] = np.arange(len(shared))
        point_slot = slot[self.inverse]
        #: voxels with several points, the points in them (ascending) and each one's voxel among them
        self.shared_voxels = shared
        self.shared_points = np.flatnonzero(point_slot >= 0)
        self.shared_slot = point_slot[self.shared_points]


def grid_coordinates(xyz: np.ndarray, voxel_size: float) -> np.ndarray:
    """[3, N] int64 cell indices of the points, counted from the cloud's minimum corner.

    The cell is `floor((xyz - min) / voxel_size)` computed in float32, as the points are stored.
    """
    cols = np.ascontiguousarray(np.asarray(xyz, dtype=np.float32).T)
    cols -= cols.min(axis=1, keepdims=True)
    cols /= np.float32(voxel_size)
    return cols.astype(np.int64)  # values are >= 0, so truncation is floor


def voxelize(xyz: np.ndarray, voxel_size: float, *, scene_id: str = "") -> Voxels:
    """One voxel per occupied cell of size `voxel_size` (see the module docstring)."""
    if voxel_size <= 0:
        raise ValueError(f"voxel_size must be positive, got {voxel_size}")
    n = len(xyz)
    if n == 0:
        raise ValueError(f"scene {scene_id!r}: no points to voxelize")
    grid = grid_coordinates(xyz, voxel_size)
    extent = grid.max(axis=1) + 1
    if (extent > MAX_AXIS_CELLS).any():
        raise ValueError(f"scene {scene_id!r}: extent too large for voxel size {voxel_size}")
    # Dense row-major key over the occupied box: ordering by it is ordering by (x, y, z).
    key = grid[0] * int(extent[1] * extent[2])
    key += grid[1] * int(extent[2])
    key += grid[2]
    index_bits = max(1, (n - 1).bit_length())
    key_bits = max(1, int(np.prod(extent, dtype=object) - 1).bit_length())
    if key_bits + index_bits <= 63:
        packed = key << index_bits
        packed |= np.arange(n, dtype=np.int64)
        packed.sort()
        order = packed & ((1 << index_bits) - 1)
        packed >>= index_bits
        sorted_key = packed
    else:
        order = np.argsort(key)
        sorted_key = key[order]
    new_run = np.empty(n, dtype=bool)
    new_run[0] = True
    np.not_equal(sorted_key[1:], sorted_key[:-1], out=new_run[1:])
    starts = np.flatnonzero(new_run)
    if key_bits + index_bits <= 63:
        first = order[starts]
    else:
        first = np.minimum.reduceat(order, starts)
    voxel_of_sorted = np.cumsum(new_run, dtype=np.int64)
    voxel_of_sorted -= 1
    inverse = np.empty(n, dtype=np.int64)
    inverse[order] = voxel_of_sorted
    counts = np.diff(starts, append=n)
    coord = np.ascontiguousarray(np.take(grid, first, axis=1).T, dtype=np.int32)
    return Voxels(coord, first, inverse, counts)


def voxel_means(values: np.ndarray, voxels: Voxels) -> np.ndarray:
    """[V, C] float32 means of the [N, C] `values` over each voxel's points.

    Equal, bit for bit, to `np.bincount(inverse, weights=values[:, c]) / counts` per channel:
    single-point voxels take their point's value, the others are summed in float64 in point order.
    (`np.take` along axis 0 gathers rows several times faster than fancy indexing.)
    """
    values = np.asarray(values)
    out = np.take(values, voxels.first, axis=0).astype(np.float32, copy=False)
    shared = voxels.shared_voxels
    if len(shared):
        cols = np.ascontiguousarray(np.take(values, voxels.shared_points, axis=0).T, dtype=np.float64)
        counts = voxels.counts[shared].astype(np.float64)
        for c in range(values.shape[1]):
            out[shared, c] = np.bincount(voxels.shared_slot, weights=cols[c], minlength=len(shared)) / counts
    return out


# ------------------------------------------------------------------------------- torch (any device)

def voxelize_torch(xyz, voxel_size: float, *, scene_id: str = ""):
    """`voxelize` in torch on `xyz`'s device: (coord int32 [V, 3], first, inverse, counts int64).

    The same voxels in the same order as the numpy version: float32 arithmetic (the division is by
    a tensor, never by a scalar, which torch may turn into a multiplication by its reciprocal) and a
    sort of the packed (key, point index) values, which are unique."""
    import torch

    n = int(xyz.shape[0])
    if n == 0:
        raise ValueError(f"scene {scene_id!r}: no points to voxelize")
    cols = xyz.to(torch.float32).T.contiguous()
    cols -= cols.amin(dim=1, keepdim=True)
    cols = cols / torch.full_like(cols[:, :1], voxel_size)
    grid = cols.to(torch.int64)
    extent = (grid.amax(dim=1) + 1).tolist()
    if max(extent) > MAX_AXIS_CELLS:
        raise ValueError(f"scene {scene_id!r}: extent too large for voxel size {voxel_size}")
    key = grid[0] * (extent[1] * extent[2]) + grid[1] * extent[2] + grid[2]
    index_bits = max(1, (n - 1).bit_length())
    key_bits = max(1, (extent[0] * extent[1] * extent[2] - 1).bit_length())
    points = torch.arange(n, device=xyz.device, dtype=torch.int64)
    if key_bits + index_bits <= 63:
        packed = torch.sort((key << index_bits) | points).values
        order, sorted_key = packed & ((1 << index_bits) - 1), packed >> index_bits
    else:
        sorted_key, order = torch.sort(key, stable=True)
    new_run = torch.ones(n, dtype=torch.bool, device=xyz.device)
    new_run[1:] = sorted_key[1:] != sorted_key[:-1]
    starts = torch.nonzero(new_run).flatten()
    first = order[starts]
    inverse = torch.empty(n, dtype=torch.int64, device=xyz.device)
    inverse[order] = torch.cumsum(new_run, 0) - 1
    counts = torch.diff(starts, append=torch.tensor([n], device=xyz.device))
    coord = grid[:, first].T.to(torch.int32).contiguous()
    return coord, first, inverse, counts


def voxel_means_torch(values, inverse, counts):
    """[V, C] float32 means of [N, C] `values`, summed in float64 as `voxel_means` does.

    Sums of a voxel's float32 values in float64 are exact (their bits span far less than float64's
    53), so the order in which a GPU adds them does not change the result."""
    import torch

    sums = torch.zeros((len(counts), values.shape[1]), dtype=torch.float64, device=values.device)
    sums.index_add_(0, inverse, values.to(torch.float64))
    return (sums / counts.to(torch.float64).unsqueeze(1)).to(torch.float32)
